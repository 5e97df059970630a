"""The tool plugins, run through the plugin host (grants and the in-process guard apply) on real
files: an ICS calendar and an SQLite one, a database the query tool must not change, an agent's
memory written by the agent's own classes with the real embedding model, the weather table."""
import hashlib
import json
import os
import resource
import sqlite3
from pathlib import Path

import pytest
import yaml

from harness import old_agent_file
from loom_ros.bus.event import Event
from loom_ros.plugins.host import PluginHost, parse_specs

ICS = """BEGIN:VCALENDAR\r
VERSION:2.0\r
PRODID:-//Loom//test//EN\r
BEGIN:VEVENT\r
UID:standup\r
SUMMARY:Stand-up\\, team robots\r
DTSTART:20261124T090000\r
DTEND:20261124T091500\r
LOCATION:Lab 2\r
END:VEVENT\r
BEGIN:VEVENT\r
UID:review\r
SUMMARY:Design review of the pl\r
 ugin host\r
DESCRIPTION:Bring the audit log\\nand the tests\r
DTSTART:20261124T140000Z\r
DURATION:PT1H30M\r
RRULE:FREQ=WEEKLY\r
END:VEVENT\r
BEGIN:VEVENT\r
UID:holiday\r
SUMMARY:Lab closed\r
DTSTART;VALUE=DATE:20261125\r
END:VEVENT\r
END:VCALENDAR\r
"""


@pytest.fixture
def run_tool():
    hosts = []

    def start(name, config, grants=()):
        host = PluginHost(parse_specs([{'name': name, 'config': config, 'grants': list(grants)}]))
        failed = host.start()
        hosts.append(host)
        if failed:
            raise AssertionError(failed[name])

        def call(event_type, query):
            return host.handle(name, Event.with_json(event_type, query))
        call.host = host
        return call
    yield start
    for host in hosts:
        host.stop()


def result(response):
    assert response.ok, response.error
    (event,) = response.events
    return event.json()


# -- calendar -----------------------------------------------------------------------------------
def test_calendar_answers_days_and_ranges_from_an_ics_file(run_tool, tmp_path):
    ics = tmp_path / 'cal.ics'
    ics.write_text(ICS, newline='')
    call = run_tool('calendar', {'ics': str(ics)}, ['storage.read'])
    day = result(call('tool.calendar.query', {'date': '2026-11-24'}))
    assert [(e['uid'], e['start'], e['end']) for e in day['events']] == [
        ('standup', '2026-11-24T09:00:00', '2026-11-24T09:15:00'),
        ('review', '2026-11-24T14:00:00', '2026-11-24T15:30:00')]
    assert day['events'][0]['summary'] == 'Stand-up, team robots'
    assert day['events'][1]['summary'] == 'Design review of the plugin host'     # unfolded
    assert day['events'][1]['description'] == 'Bring the audit log\nand the tests'
    assert day['events'][1]['recurring'] is True
    morning = result(call('tool.calendar.query', {'start': '2026-11-24T09:10',
                                                  'end': '2026-11-24T12:00'}))
    assert [e['uid'] for e in morning['events']] == ['standup']
    closed = result(call('tool.calendar.query', {'date': '2026-11-25'}))
    assert closed['events'][0] == {**closed['events'][0], 'uid': 'holiday', 'all_day': True,
                                   'start': '2026-11-25', 'end': '2026-11-26'}
    assert call.host.health('calendar').details['recurring_first_only'] == '1'

    ics.write_text(ICS.replace('Lab closed', 'Lab open after all'), newline='')  # re-read
    reopened = result(call('tool.calendar.query', {'date': '2026-11-25'}))
    assert reopened['events'][0]['summary'] == 'Lab open after all'

    for query, why in [({'date': '24/11/2026'}, 'date must be YYYY-MM-DD'),
                       ({'start': '2026-11-24T10:00', 'end': '2026-11-24T09:00'},
                        'end must be after start'),
                       ({}, 'give "date"')]:
        bad = call('tool.calendar.query', query)
        assert not bad.ok and why in bad.error
    wrong = call('tool.weather.query', {'date': '2026-11-24'})
    assert not wrong.ok and "expected a 'tool.calendar.query' event" in wrong.error


def test_calendar_refuses_a_broken_file_or_a_missing_grant(run_tool, tmp_path):
    ics = tmp_path / 'broken.ics'
    ics.write_text(ICS.replace('DTSTART:20261124T090000', 'DTSTART:tomorrow'))
    with pytest.raises(AssertionError, match=r"line 7: bad date or time 'tomorrow'"):
        run_tool('calendar', {'ics': str(ics)}, ['storage.read'])
    ics.write_text(ICS.replace('END:VEVENT\r\nBEGIN:VEVENT\r\nUID:holiday',
                               'BEGIN:VEVENT\r\nUID:holiday'))
    with pytest.raises(AssertionError, match='VEVENT inside VEVENT'):
        run_tool('calendar', {'ics': str(ics)}, ['storage.read'])
    with pytest.raises(AssertionError, match="may not use 'storage.read'"):
        run_tool('calendar', {'ics': str(ics)})   # declared, not granted


def test_calendar_reads_an_sqlite_table_read_only(run_tool, tmp_path):
    db = tmp_path / 'cal.db'
    with sqlite3.connect(db) as conn:
        conn.execute('create table events (uid, summary, start, "end", location, description)')
        conn.executemany('insert into events values (?, ?, ?, ?, ?, ?)', [
            ('a', 'Charge batteries', '2026-11-24T18:00:00', '2026-11-24T19:00:00', '', ''),
            ('b', 'Inventory', '2026-11-24', None, 'Store', ''),
            ('c', 'Other day', '2026-11-26T10:00:00', '2026-11-26T11:00:00', '', '')])
    conn.close()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    call = run_tool('calendar', {'sqlite': str(db)}, ['storage.read'])
    day = result(call('tool.calendar.query', {'date': '2026-11-24'}))
    assert [(e['uid'], e['all_day']) for e in day['events']] == [('b', True), ('a', False)]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


# -- db_query -----------------------------------------------------------------------------------
@pytest.fixture
def database(tmp_path):
    db = tmp_path / 'robots.db'
    with sqlite3.connect(db) as conn:
        conn.execute('create table robots (id integer primary key, name text, battery real)')
        conn.executemany('insert into robots (name, battery) values (?, ?)',
                         [(f'r{i}', i / 10) for i in range(25)])
    conn.close()
    return db


def test_db_query_reads_with_bounded_rows(run_tool, database):
    call = run_tool('db_query', {'database': str(database), 'max_rows': 10}, ['storage.read'])
    out = result(call('tool.db.query', {'sql': 'select name, battery from robots where '
                                               'battery >= ? order by id', 'params': [0.5]}))
    assert out['columns'] == ['name', 'battery'] and out['rows'][0] == ['r5', 0.5]
    assert len(out['rows']) == 10 and out['truncated'] is True
    small = result(call('tool.db.query', {'sql': 'select count(*) as n from robots where '
                                                 'name = :name', 'params': {'name': 'r3'}}))
    assert small == {'columns': ['n'], 'rows': [[1]], 'truncated': False}


def test_db_query_refuses_writes_and_escapes_and_stops_long_queries(run_tool, database,
                                                                   tmp_path):
    before = hashlib.sha256(database.read_bytes()).hexdigest()
    call = run_tool('db_query', {'database': str(database), 'timeout_ms': 200},
                    ['storage.read'])
    for sql, why in [
            ("insert into robots (name) values ('evil')", 'read-only: refused INSERT robots'),
            ('update robots set battery = 0', 'read-only: refused UPDATE robots'),
            ('delete from robots', 'read-only: refused DELETE robots'),
            ('drop table robots', 'read-only: refused'),
            (f"attach database '{tmp_path / 'x.db'}' as x", 'read-only: refused ATTACH'),
            ('pragma journal_mode = delete', 'read-only: refused PRAGMA'),
            ('select 1; delete from robots', 'one statement at a time'),
            ('select * from nowhere', 'no such table: nowhere'),
            ('with recursive n(i) as (select 1 union all select i + 1 from n) '
             'select count(*) from n', 'stopped after the 200 ms limit')]:
        response = call('tool.db.query', {'sql': sql})
        assert not response.ok and why in response.error, (sql, response.error)
    assert not (tmp_path / 'x.db').exists()
    assert hashlib.sha256(database.read_bytes()).hexdigest() == before
    assert result(call('tool.db.query', {'sql': 'select count(*) from robots'}))['rows'] == [[25]]
    assert call.host.health('db_query').details['refused'] == '9'


def test_db_query_hostile_queries_stop_within_their_bounds(run_tool, database):
    """Issue 13, fault 11: a query could overrun its time limit and take 1 GB."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB
    call = run_tool('db_query', {'database': str(database), 'timeout_ms': 300,
                                 'max_value_bytes': 1 << 20, 'max_result_bytes': 3 << 20},
                    ['storage.read'])
    forever = 'with recursive n(i) as (select 1 union all select i + 1 from n) '
    for sql, why in [
            (forever + 'select i from n order by i desc', 'stopped after the 300 ms limit'),
            (forever + 'select group_concat(i) from n', 'limit'),   # one ever-growing string
            ('select randomblob(1000000000)', 'exceed the 1048576 byte limit'),
            ('select zeroblob(500000000)', 'exceed the 1048576 byte limit'),
            ("select printf('%.*c', 2000000000, 'x')", 'refused FUNCTION printf'),
            ("select 'a' like '" + '%a' * 200 + "'", 'LIKE or GLOB pattern too complex'),
            ('select ' + ' + '.join(['1'] * 6000), 'exceeds 10000'),
            ('select ' + ', '.join(['1'] * 200), 'too many columns')]:
        response = call('tool.db.query', {'sql': sql})
        assert not response.ok and why in response.error, (sql[:80], response.error)
    unbounded = result(call('tool.db.query', {'sql': forever + 'select i from n'}))
    assert len(unbounded['rows']) == 1000 and unbounded['truncated'] is True
    wide = result(call('tool.db.query', {'sql': forever + 'select hex(randomblob(400000)) '
                                                         'from n'}))   # 800 KB a row
    assert len(wide['rows']) == 3 and wide['truncated'] is True
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 200, f'peak memory grew {grown_mib:.0f} MiB'
    assert result(call('tool.db.query', {'sql': 'select count(*) from robots'}))['rows'] == [[25]]
    assert call.host.health('db_query').details['refused'] == '8'


# -- memory_search ------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def agent_memory(tmp_path_factory):
    """An agent's memory written through the storage layer as an agent host writes it (one unit
    database under the root), with the real embedding model for its facts."""
    from loom_ros.agents.embedding import MiniLMEmbedder
    from loom_ros.storage.storage import Storage, StorageConfig
    root = tmp_path_factory.mktemp('root')   # a storage root: the host writes <root>/db/<unit>.db
    storage = Storage(StorageConfig(str(root), unit='agent_helper'))
    episodes = [Event.with_json(kind, {'text': text}, id=f'e{i}', source='mic',
                                timestamp_ms=1000 * (i + 1), tags=tags)
                for i, (kind, text, tags) in enumerate([
                    ('speech.utterance', 'bring me the red cup', ['cmd']),
                    ('face.detected', 'alice smiles', ['face']),
                    ('speech.utterance', 'what is the weather', ['cmd'])])]
    storage.agent_state.commit('helper', {}, 3, 'e2', episodes=episodes).wait(30)
    facts = storage.facts('helper', MiniLMEmbedder())
    for fact in [('alice', 'likes', 'green tea', 'e1'), ('red cup', 'is_in', 'kitchen', 'e0'),
                 ('bob', 'works_at', 'the lab', 'e2')]:
        facts.add(*fact)[1].wait(30)
    yield root, storage   # left open: the agent keeps writing while the tool reads
    storage.close()


def test_memory_search_reads_episodes_facts_and_meaning_read_only(run_tool, agent_memory):
    root, _store = agent_memory
    db = root / 'db' / 'agent_helper.db'
    call = run_tool('memory_search', {'storage_root': str(root)}, ['memory.read'])
    speech = result(call('tool.memory.search', {'agent': 'helper', 'mode': 'episodic',
                                                'type': 'speech.utterance'}))
    assert [r['event_id'] for r in speech['results']] == ['e0', 'e2']
    assert result(call('tool.memory.search', {'agent': 'helper', 'tag': 'face'}))['results'][0][
        'event_id'] == 'e1'
    found = result(call('tool.memory.search', {'agent': 'helper', 'text': 'RED CUP'}))
    assert [r['event_id'] for r in found['results']] == ['e0']
    window = result(call('tool.memory.search', {'agent': 'helper', 'start_ms': 1500,
                                                'end_ms': 3000}))
    assert [r['event_id'] for r in window['results']] == ['e1', 'e2']
    facts = result(call('tool.memory.search', {'agent': 'helper', 'mode': 'facts',
                                               'entity': 'alice'}))
    assert [(f['relation'], f['object']) for f in facts['results']] == [('likes', 'green tea')]
    similar = result(call('tool.memory.search', {'agent': 'helper', 'mode': 'similar',
                                                 'query': 'where is the cup?', 'k': 2}))
    assert similar['results'][0]['subject'] == 'red cup'
    assert similar['results'][0]['score'] > similar['results'][1]['score']

    for query, why in [({'agent': 'nobody'}, "no memory for agent 'nobody'"),
                       ({'agent': '../etc/passwd'}, 'agent must be an agent id'),
                       ({'agent': 'helper', 'mode': 'dream'}, 'mode must be episodic'),
                       ({'agent': 'helper', 'limit': -1}, 'limit must be an integer'),
                       ({'agent': 'helper', 'mode': 'similar'}, 'needs a non-empty "query"')]:
        bad = call('tool.memory.search', query)
        assert not bad.ok and why in bad.error, bad.error
    with sqlite3.connect(f'file:{db}?mode=ro', uri=True) as conn:  # nothing was written
        assert conn.execute('select count(*) from episodes').fetchone()[0] == 3


def test_memory_search_needs_its_grant_and_honours_the_agent_list(run_tool, agent_memory):
    root, _store = agent_memory
    with pytest.raises(AssertionError, match="may not use 'memory.read'"):
        run_tool('memory_search', {'storage_root': str(root)})
    call = run_tool('memory_search', {'storage_root': str(root), 'agents': ['other']},
                    ['memory.read'])
    refused = call('tool.memory.search', {'agent': 'helper'})
    assert not refused.ok and "agent 'helper' is not searchable here" in refused.error


def test_memory_search_merges_an_agents_own_file_with_the_storage_units(run_tool, tmp_path):
    """An agent hosted on the storage layer keeps its memory in its host's unit database
    (<root>/db/<unit>.db); the tool finds it there, merged in time order with what the agent's
    own file (<root>/agents/<id>.db) already held, and names where it looked when neither has it."""
    from loom_ros.storage.storage import Storage, StorageConfig
    old_agent_file(tmp_path / 'agents' / 'walker.db',
                   [('walker', 2, json.dumps({}), 1, 'old-1')],
                   [('walker', 'old-1', 1000, 'step', '', '[]', json.dumps({'n': 1}))])
    with Storage(StorageConfig(root=str(tmp_path), unit='host')) as storage:
        storage.agent_state.commit('walker', {'n': 3}, 3, 'new-3', episodes=[
            Event.with_json('step', {'n': n}, id=f'new-{n}', timestamp_ms=500 * n)
            for n in (2, 3)]).wait(10)
        storage.agent_state.commit('other', {}, 1, 'x', episodes=[
            Event.with_json('step', {}, id='x', timestamp_ms=1)]).wait(10)
        call = run_tool('memory_search', {'storage_root': str(tmp_path)}, ['memory.read'])
        found = result(call('tool.memory.search', {'agent': 'walker', 'type': 'step'}))
        assert [r['event_id'] for r in found['results']] == ['old-1', 'new-2', 'new-3']
        assert [r['event_id'] for r in result(call('tool.memory.search', {
            'agent': 'walker', 'limit': 2}))['results']] == ['old-1', 'new-2']
        missing = call('tool.memory.search', {'agent': 'nobody'})
        assert not missing.ok and str(tmp_path / 'db') in missing.error


class _GrantAll:
    @staticmethod
    def lookup(subject: str, purpose: str):
        from loom_ros.bus.privacy import ConsentState
        return ConsentState(purpose, True, True, 'test')


def test_memory_search_answers_a_person_only_with_their_own_and_anonymous_memories(run_tool,
                                                                                  tmp_path):
    """One agent remembers alice, bob and no one: a question about alice gets alice's and the
    anonymous rows (episodes, facts and meaning), never bob's; the answer is Private, about
    alice; the rows left out are not counted."""
    from loom_ros.agents.embedding import MiniLMEmbedder
    from loom_ros.bus.event import Privacy
    from loom_ros.storage.storage import Storage, StorageConfig
    with Storage(StorageConfig(root=str(tmp_path), unit='host'), consent=_GrantAll) as storage:
        said = [('alice', 'alice: my pin is 1234'), ('bob', 'bob: my pin is 9876'),
                (None, 'the cup is red')]
        storage.agent_state.commit('helper', {}, 3, 'e2', episodes=[
            Event.with_json('speech.heard', {'text': text}, id=f'e{i}', timestamp_ms=1000 + i,
                            metadata={'loom.subject': who} if who else {})
            for i, (who, text) in enumerate(said)]).wait(30)
        facts = storage.facts('helper', MiniLMEmbedder())
        for fact in [('alice', 'has_pin', '1234', 'e0'), ('bob', 'has_pin', '9876', 'e1'),
                     ('cup', 'is', 'red', 'e2')]:
            facts.add(*fact)[1].wait(30)
        call = run_tool('memory_search', {'storage_root': str(tmp_path)}, ['memory.read'])

        def ask(query, **metadata):
            response = call.host.handle('memory_search', Event.with_json(
                'tool.memory.search', {'agent': 'helper', **query}, metadata=metadata))
            (answer,) = response.events
            return answer, answer.json()['results']

        answer, rows = ask({}, **{'loom.subject': 'alice'})
        assert [r['event_id'] for r in rows] == ['e0', 'e2']
        assert answer.privacy == Privacy.PRIVATE and answer.metadata['loom.subject'] == 'alice'
        assert all('data_subject' not in r for r in rows)
        _answer, rows = ask({'mode': 'facts'}, **{'loom.subject': 'alice'})
        assert sorted(r['object'] for r in rows) == ['1234', 'red']
        _answer, rows = ask({'mode': 'similar', 'query': 'what is the pin', 'k': 3},
                            **{'loom.subject': 'bob'})
        assert sorted(r['object'] for r in rows) == ['9876', 'red']
        _answer, rows = ask({})                                    # anonymous question
        assert [r['event_id'] for r in rows] == ['e2']
        _answer, rows = ask({}, **{'loom.subject': 'no such id!'})  # invalid: no one's
        assert [r['event_id'] for r in rows] == ['e2']
        assert 'withheld' not in call.host.health('memory_search').details   # no count of them
        empty, rows = ask({'type': 'nothing.of.this'})
        assert rows == [] and empty.privacy == Privacy.PUBLIC


def _memory_of_three(root: Path, alice_matches: bool) -> None:
    """Five memories each (episodes and facts) of alice, bob and no one, alice's first (earliest
    in time, lowest fact ids), then bob's, then the anonymous ones; all mention 'plum' except
    alice's when `alice_matches` is False."""
    from loom_ros.storage.embedding import HashEmbedder
    from loom_ros.storage.storage import Storage, StorageConfig
    with Storage(StorageConfig(root=str(root), unit='host'), consent=_GrantAll) as storage:
        people = [('alice', 1000, 'plum' if alice_matches else 'pear'), ('bob', 2000, 'plum'),
                  (None, 3000, 'plum')]
        storage.agent_state.commit('helper', {}, 1, 'x', episodes=[
            Event.with_json('speech.heard', {'text': f'{who or "anon"} {i} likes {fruit}'},
                            id=f'{who or "anon"}-{i}', timestamp_ms=at + i,
                            metadata={'loom.subject': who} if who else {})
            for who, at, fruit in people for i in range(5)]).wait(30)
        facts = storage.facts('helper', HashEmbedder())
        for who, _at, fruit in people:
            for i in range(5):
                facts.add(f'{who or "anon"}{i}', 'likes', fruit, f'{who or "anon"}-{i}')[1].wait(30)


def test_memory_search_limits_fill_with_the_askers_rows_and_others_leave_no_trace(run_tool,
                                                                                 tmp_path):
    """Attack review #7: rows were filtered by subject after the SQL match and limit, and the
    rows left out counted in health: an asker learnt whether another person's memories match a
    text (short answers, a moving count). Now the limit (and similar's top k) fills with rows
    the asker may see, and answers and health are the same whether alice's rows match or not."""
    from loom_ros.storage.embedding import HashEmbedder
    seen = {}
    for alice_matches in (True, False):
        root = tmp_path / str(alice_matches)
        _memory_of_three(root, alice_matches)
        call = run_tool('memory_search', {'storage_root': str(root)}, ['memory.read'])
        plugin = call.host.slots['memory_search'].plugin
        plugin.embedder = HashEmbedder()   # the embedding the facts were stored with
        answers = []
        for metadata in ({}, {'loom.subject': 'bob'}, {'loom.subject': 'not valid!'}):
            for query in ({'text': 'plum', 'limit': 3}, {'mode': 'facts', 'text': 'plum',
                                                         'limit': 3},
                          {'mode': 'similar', 'query': 'likes plum', 'k': 3}):
                response = call.host.handle('memory_search', Event.with_json(
                    'tool.memory.search', {'agent': 'helper', **query}, metadata=metadata))
                (answer,) = response.events
                rows = answer.json()['results']
                whose = {r.get('event_id', r.get('provenance')).split('-')[0] for r in rows}
                own = 'bob' if metadata.get('loom.subject') == 'bob' else 'anon'
                assert len(rows) == 3 and whose == {own}, (metadata, query, rows)
                answers.append([{k: v for k, v in r.items() if 'event_id' in r or k != 'time_ms'}
                                for r in rows])   # a fact's time_ms is when it was written
        health = dict(call.host.health('memory_search').details)
        assert health.pop('agents_dir') == str(root / 'agents')
        health.pop('mean_latency_ms')   # the host's timing: no count of anyone's rows
        seen[alice_matches] = answers, health
    assert seen[True] == seen[False]
    assert 'withheld' not in seen[True][1]


def _shipped_memory_search() -> dict:
    from loom_ros.config.params import config_dir
    entries = yaml.safe_load((config_dir() / 'plugins.yaml').read_text())['plugins']
    (entry,) = [e for e in entries if e['name'] == 'memory_search']
    return entry


def test_memory_search_and_the_agents_agree_on_one_folder_in_the_demo_config(tmp_path):
    """`loom demo` moves every file under its output folder with one setting, storage.root:
    the agent hosts' databases and the plugin host's data_dir derive from it. The shipped
    memory_search entry (no folder of its own) must then read exactly what the demo's agents
    wrote."""
    from loom_ros.agents.agent_node import unit_name
    from loom_ros.cli.demo import _params
    from loom_ros.config.params import config_dir
    from loom_ros.storage.layout import StorageLayout, derived
    from loom_ros.storage.storage import Storage, StorageConfig
    out = tmp_path / 'demo_output'
    out.mkdir()
    params = yaml.safe_load(_params(str(config_dir() / 'loom.yaml'), out).read_text())
    layout = StorageLayout.at(params['/**']['ros__parameters']['storage']['root'])
    assert layout.root == out.absolute()
    # What the demo's agent host writes (its unit database) and where its plugin host puts data.
    with Storage(StorageConfig(str(layout.root), unit=unit_name('/agent_host_0'))) as storage:
        storage.agent_state.commit('counter', {'n': 7}, 1, 'imu-7', episodes=[Event.with_json(
            'sensor.imu', {'n': 7}, id='imu-7', source='imu', timestamp_ms=1234)]).wait(30)
    data_dir = derived(params['/**/plugin_host']['ros__parameters']['data_dir'],
                       layout.root / 'plugins')
    host = PluginHost(parse_specs([_shipped_memory_search()]), data_dir=data_dir)
    try:
        assert not host.start()
        found = result(host.handle('memory_search', Event.with_json(
            'tool.memory.search', {'agent': 'counter'})))
        assert [(r['event_id'], r['time_ms']) for r in found['results']] == [('imu-7', 1234)]
        assert host.health('memory_search').details['agents_dir'] == str(layout.agents)
    finally:
        host.stop()


def test_memory_search_reads_the_shipped_agents_folder_by_default():
    """The shipped config: everything under storage.root, the host's data_dir <root>/plugins;
    the tool, with no setting, reads that root's agents."""
    from loom_ros.config.params import node_defaults
    from loom_ros.storage.layout import StorageLayout, derived
    layout = StorageLayout.at(node_defaults('agent')['storage.root'])
    assert node_defaults('lifecycle_manager')['storage.root'] == \
        node_defaults('plugin_host')['storage.root']
    host = PluginHost(parse_specs([_shipped_memory_search()]), data_dir=derived(
        node_defaults('plugin_host')['data_dir'], layout.root / 'plugins'))
    try:
        assert not host.start()
        assert host.health('memory_search').details['agents_dir'] == str(layout.agents)
    finally:
        host.stop()


def test_memory_search_refuses_a_folder_setting_of_its_own(run_tool, tmp_path):
    with pytest.raises(AssertionError, match="'state_dir' is gone"):
        run_tool('memory_search', {'state_dir': str(tmp_path)}, ['memory.read'])


# -- weather ------------------------------------------------------------------------------------
def test_weather_answers_from_the_config_table(run_tool):
    config = {'default_city': 'Lisbon', 'forecasts': {
        'Lisbon': [{'summary': 'sunny', 'high_c': 24, 'low_c': 15, 'rain_pct': 5},
                   {'summary': 'cloudy', 'high_c': 21, 'low_c': 14}],
        'New York': [{'summary': 'snow', 'high_c': -1, 'low_c': -6, 'rain_pct': 90}]}}
    call = run_tool('weather', config)
    out = result(call('tool.weather.query', {'text': "what's the weather in new york?"}))
    assert out['city'] == 'New York'
    assert out['text'] == 'New York: snow, high -1 degrees, low -6, 90% chance of rain.'
    assert result(call('tool.weather.query', {'text': 'and tomorrow?', 'days': 2}))[
        'forecast'][1]['summary'] == 'cloudy'                       # default city, two days
    for query, why in [({'city': 'Paris'}, "no forecast for city 'Paris'"),
                       ({'city': 'Lisbon', 'days': 0}, 'days must be a positive integer')]:
        bad = call('tool.weather.query', query)
        assert not bad.ok and why in bad.error
    with pytest.raises(AssertionError, match='weather config: forecasts'):
        run_tool('weather', {'forecasts': {}})
    with pytest.raises(AssertionError, match="default_city 'Oslo' has no forecast"):
        run_tool('weather', {**config, 'default_city': 'Oslo'})
