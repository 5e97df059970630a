"""Storage keeps an event of a data subject only with their `store` consent (issue 17): without it
the event is counted (per agent, type and UTC day), and nothing of it (payload, tags, id, the
subject) reaches a file. Real consent registry, real `loom consent` processes, real SQLite; every
byte under the root is scanned for the canaries."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from harness import WAIT_LIMIT_S, MsClock, T0_MS
from loom_ros.agents.memory import EpisodicMemory, SemanticMemory
from loom_ros.agents.state import AgentStore
from loom_ros.bus.event import Event
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY
from loom_ros.security.audit import AuditLog
from loom_ros.storage.backend.local import LocalObjectStore
from loom_ros.storage.consent import ConsentCache, ConsentRegistry, SubjectRefs, consent_path
from loom_ros.storage.embedding import HashEmbedder
from loom_ros.storage.erasure import forget
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.lifecycle import Lifecycle, LifecycleParams, TierPolicy
from loom_ros.storage.storage import Storage, StorageConfig

T0 = T0_MS
Clock = MsClock


def event(subject: str | None, text: str, i: int = 0) -> Event:
    metadata = {SUBJECT_METADATA_KEY: subject} if subject is not None else {}
    return Event(type='speech.utterance', source='mic', id=f'e-{uuid.uuid4().hex[:8]}',
                 timestamp_ms=T0 + i, payload=json.dumps({'text': text}).encode(),
                 tags=[f'tag-{text}'], metadata=metadata)


def canary() -> str:
    return f'CANARY{uuid.uuid4().hex}'


def every_byte(root: Path) -> bytes:
    return b''.join(p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file())


def consent_cli(root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'loom_ros.cli.consent', *args, '--root',
                           str(root)], capture_output=True, text=True, timeout=WAIT_LIMIT_S)


def registry(root: Path) -> tuple[ConsentRegistry, AuditLog]:
    audit = AuditLog(root / 'audit.db')
    return ConsentRegistry(consent_path(root), audit=audit,
                           refs=SubjectRefs.at(root / 'keys')), audit


def payloads(storage: Storage) -> list[str]:
    return [r['payload'] for r in storage.query('select payload from episodes order by id')]


def test_without_store_consent_only_a_count_is_kept(tmp_path):
    consent, audit = registry(tmp_path)
    consent.grant('bob', 'store', 'cli:test')
    # The storage opens the root's registry itself (read-only, shipped defaults: no consent).
    storage = Storage(StorageConfig(root=str(tmp_path), unit='host'), clock=lambda: T0)
    secret = {name: canary() for name in ('alice', 'invalid', 'committed', 'carol')}
    try:
        episodes = storage.episodes
        episodes.record('a1', event('alice', secret['alice'])).wait(WAIT_LIMIT_S)
        episodes.record('a1', event('bad id!', secret['invalid'])).wait(WAIT_LIMIT_S)
        episodes.record('a1', event('bob', 'bob-kept')).wait(WAIT_LIMIT_S)
        episodes.record('a1', event(None, 'anonymous-kept')).wait(WAIT_LIMIT_S)
        # through an agent's commit (state + episodes in one write) too
        agent = AgentStore(storage, 'a2')
        agent.record(event('carol', secret['carol']))
        agent.record(event(None, 'anonymous-2'))
        memory = EpisodicMemory(agent)
        waiting = [json.loads(r['payload'])['text'] for r in memory.query()]
        assert waiting == ['anonymous-2']          # never shown, even before its commit
        agent.commit({'n': 2}, 2, 'x').wait(WAIT_LIMIT_S)
        assert [json.loads(p)['text'] for p in payloads(storage)] == [
            'bob-kept', 'anonymous-kept', 'anonymous-2']
        assert storage.query('select subject from episodes order by id')[0]['subject'] == 'bob'
        rows = [dict(r) for r in storage.query('select * from withheld order by agent_id')]
        assert rows == [{'agent_id': 'a1', 'type': 'speech.utterance', 'day': '2023-11-14',
                         'events': 2},
                        {'agent_id': 'a2', 'type': 'speech.utterance', 'day': '2023-11-14',
                         'events': 1}]
        assert storage.withheld == 3 and episodes.withheld() == 3
        # the agent's state was still made from carol's event: noted, so erasing carol finds it
        assert [tuple(r) for r in storage.query('select * from kv_subjects')] == [
            ('agent_state', 'a2', 'carol')]
        assert episodes.recent('a1', 10**12) and all(
            SUBJECT_METADATA_KEY not in e.metadata or e.metadata[SUBJECT_METADATA_KEY] == 'bob'
            for e in episodes.recent('a1', 10**12))
        # counted in the storage stats (the storage node publishes every tier of usage())
        storage.flush()
        lifecycle = Lifecycle(storage.layout, 'host', LocalObjectStore(storage.layout.objects),
                              HashEmbedder(), read_only=True)
        try:
            assert lifecycle.usage()['withheld']['rows'] == 3
        finally:
            lifecycle.close()
    finally:
        storage.close()
        consent.close()
        audit.close()
    data = every_byte(tmp_path)
    for name, text in secret.items():
        assert text.encode() not in data, name
    assert b'alice' not in data        # not even the subject id (carol's: in kv_subjects)
    assert b'bob-kept' in data                              # the scan does see what is kept


def test_a_withdrawal_holds_for_every_write_after_it_returns(tmp_path):
    """Answers are cached per subject and dropped whenever the registry changes, in this process
    or another: a grant or a withdrawal by `loom consent` holds from the next event."""
    consent, audit = registry(tmp_path)
    storage = Storage(StorageConfig(root=str(tmp_path), unit='host'), clock=lambda: T0)
    try:
        episodes = storage.episodes
        texts = []

        def record(text: str) -> None:
            texts.append(text)
            episodes.record('a', event('alice', text)).wait(WAIT_LIMIT_S)

        record('before-any-consent')
        consent.grant('alice', 'store', 'app:setup')          # another connection, this process
        record('granted-1')
        record('granted-2')
        assert storage.consent.hits >= 1                      # the second answer was cached
        done = consent_cli(tmp_path, 'withdraw', 'alice', 'store')   # another process
        assert done.returncode == 0, done.stderr
        record('after-cli-withdrawal')
        assert consent_cli(tmp_path, 'grant', 'alice', 'store').returncode == 0
        record('granted-again')
        consent.withdraw('alice', 'store', 'app:setup')
        record('after-withdrawal')
        kept = [json.loads(p)['text'] for p in payloads(storage)]
        assert kept == ['granted-1', 'granted-2', 'granted-again']
        assert episodes.withheld() == 3
    finally:
        storage.close()
        consent.close()
        audit.close()


def test_the_cache_is_bounded_and_fails_closed(tmp_path):
    consent, audit = registry(tmp_path)
    try:
        for n in range(5):
            consent.grant(f's{n}', 'store', 'cli:test')
        cache = ConsentCache(consent, 'store', max_entries=2)
        assert all(cache.allows(f's{n}') for n in range(5))
        assert len(cache._answers) <= 2
        assert not cache.allows('../etc') and not cache.allows('nobody')
        assert cache.errors == 1                       # the invalid id, not cached
        version = consent.version()
        consent.withdraw('s0', 'store', 'cli:test')    # our own change moves the version
        assert consent.version() != version and not cache.allows('s0')
    finally:
        consent.close()
        audit.close()
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'consent.db').write_bytes(b'not a database at all' * 100)
    reader = ConsentRegistry(consent_path(broken), read_only=True)
    try:
        assert not ConsentCache(reader, 'store').allows('alice')   # unreadable: not granted
    finally:
        reader.close()


def test_facts_follow_the_subject_and_consent_of_their_event(tmp_path):
    """A fact made from an event inherits its data subject (found by erasure once the event
    left the warm tier) and is not stored when storage may not keep the event."""
    consent, audit = registry(tmp_path)
    consent.grant('bob', 'store', 'cli:test')
    clock = Clock()
    storage = Storage(StorageConfig(root=str(tmp_path), unit='host'), clock=clock)
    try:
        agent = AgentStore(storage, 'a')
        semantic = SemanticMemory(storage, 'a', HashEmbedder())
        secret = canary()
        told = {}
        for who in ('bob', 'carol'):
            e = event(who, f'{who} likes tea')
            agent.record(e)                      # as the runtime does before the handler
            told[who] = semantic.add_fact(f'{who}-{secret}' if who == 'carol' else 'bob',
                                          'likes', 'tea', provenance=e.id)
        agent.commit({}, 2, 'x').wait(WAIT_LIMIT_S)
        assert told['carol'] == 0 and told['bob'] > 0
        assert [tuple(r) for r in storage.query('select subject, data_subject from facts')] == \
            [('bob', 'bob')]
        assert storage.withheld == 2              # carol's episode and her fact
        # bob's events leave the warm tier: the fact is still his
        lifecycle = Lifecycle(storage.layout, 'host', LocalObjectStore(storage.layout.objects),
                              HashEmbedder(), LifecycleParams(default=TierPolicy(warm_s=60)),
                              clock=clock)
        clock.ms = T0 + 120_000
        assert lifecycle.move_warm().condensed == 1
        lifecycle.close()
    finally:
        storage.close()
        consent.close()
        audit.close()
    receipt = forget(StorageLayout.at(tmp_path), 'bob')
    assert receipt.counts['facts'] == 1 and receipt.counts['cold'] == 1
    assert secret.encode() not in every_byte(tmp_path)


def test_a_withdrawal_between_two_agents_of_one_delivery_holds_for_the_second(tmp_path):
    """Agents of one broadcast note the same arrival object (its subject is read once); the
    consent is asked at every note, so bob's withdrawal between the first agent's note and the
    second's keeps the second agent's fact from being stored under him."""
    consent, audit = registry(tmp_path)
    consent.grant('bob', 'store', 'cli:test')
    storage = Storage(StorageConfig(root=str(tmp_path), unit='host'), consent=consent)
    try:
        arrived = event('bob', 'bob likes tea')
        first, second = AgentStore(storage, 'a'), AgentStore(storage, 'b')
        first.record(arrived)
        assert storage.episodes.origin(arrived.id) == 'bob'
        assert SemanticMemory(storage, 'a', HashEmbedder()).add_fact(
            'bob', 'likes', 'tea', provenance=arrived.id) > 0
        consent.withdraw('bob', 'store', 'cli:test')
        second.record(arrived)                    # the same object, as a broadcast delivers it
        assert storage.episodes.origin(arrived.id) is None
        assert SemanticMemory(storage, 'b', HashEmbedder()).add_fact(
            'bob', 'likes', 'tea', provenance=arrived.id) == 0
    finally:
        storage.close()
        consent.close()
        audit.close()


def test_every_agent_of_one_delivery_files_its_fact_under_the_events_subject(tmp_path):
    """The agents of one broadcast share its arrival copy, which is noted once (the later
    agents return at once): each agent's fact from it is still bob's, also when another
    delivery was noted in between (its arrival is then noted again), and none is anonymous."""
    consent, audit = registry(tmp_path)
    consent.grant('bob', 'store', 'cli:test')
    storage = Storage(StorageConfig(root=str(tmp_path), unit='host'), consent=consent)
    try:
        arrived, other = event('bob', 'bob likes tea'), event(None, 'the kettle is on', 1)
        agents = [AgentStore(storage, name) for name in ('a', 'b', 'c')]
        agents[0].record(arrived)
        agents[1].record(arrived)          # the same object: noted once already
        agents[0].record(other)            # another delivery in between
        agents[2].record(arrived)
        for store in agents:
            assert SemanticMemory(storage, store.agent_id, HashEmbedder()).add_fact(
                'bob', 'likes', 'tea', provenance=arrived.id) > 0
        assert [tuple(r) for r in storage.query(
            'select agent_id, data_subject from facts order by agent_id')] == [
            ('a', 'bob'), ('b', 'bob'), ('c', 'bob')]
    finally:
        storage.close()
        consent.close()
        audit.close()


def test_a_fact_made_while_handling_a_persons_event_is_theirs(tmp_path):
    """A fact whose provenance is anonymous or unknown (an id storage never saw), made while the
    agent handles alice's event, is filed under alice (her erasure removes it); one whose
    provenance is bob's while alice's event is handled, or made while several people's events
    are held ('..'), is two people's and not stored (counted)."""
    consent, audit = registry(tmp_path)
    for who in ('alice', 'bob'):
        consent.grant(who, 'store', 'cli:test')
    storage = Storage(StorageConfig(root=str(tmp_path), unit='host'), consent=consent)
    holding = ['alice']
    try:
        agent = AgentStore(storage, 'a')
        semantic = SemanticMemory(storage, 'a', HashEmbedder(),
                                  held=lambda: (None, holding[0]))
        anonymous, of_bob = event(None, 'the weather'), event('bob', 'bob likes tea')
        agent.record(anonymous)
        agent.record(of_bob)
        made = {'anonymous': semantic.add_fact('rain', 'is', 'likely', provenance=anonymous.id),
                'unknown': semantic.add_fact('sun', 'is', 'rare', provenance='never-seen'),
                'bob': semantic.add_fact('bob', 'likes', 'tea', provenance=of_bob.id)}
        holding[0] = '..'
        made['several'] = semantic.add_fact('tea', 'is', 'hot', provenance=anonymous.id)
        holding[0] = ''
        made['none'] = semantic.add_fact('tea', 'is', 'green', provenance=anonymous.id)
        agent.commit({}, 2, 'x').wait(WAIT_LIMIT_S)
        assert made['bob'] == made['several'] == 0
        assert [tuple(r) for r in storage.query(
            'select object, data_subject from facts order by id')] == [
            ('likely', 'alice'), ('rare', 'alice'), ('green', '')]
        withheld = storage.withheld
    finally:
        storage.close()
        consent.close()
        audit.close()
    assert withheld == 2
    receipt = forget(StorageLayout.at(tmp_path), 'alice')
    assert receipt.counts['facts'] == 2


def test_after_a_restart_a_fact_finds_its_events_subject_through_the_event_index(tmp_path):
    """A fact citing an event this process did not note (handled before a restart) is filed
    under that event's subject, read from its episode through the partial episodes_event index
    (the named episodes only), not by scanning the warm tier: an anonymous episode and an id
    storage never saw both answer '' (the fact then follows the event being handled)."""
    consent, audit = registry(tmp_path)
    consent.grant('bob', 'store', 'cli:test')
    bobs, anonymous = event('bob', 'bob likes tea'), event(None, 'it rained')
    with Storage(StorageConfig(root=str(tmp_path), unit='host'), consent=consent) as storage:
        store = AgentStore(storage, 'a')
        store.record(bobs)
        store.record(anonymous)
        store.commit({}, 2, anonymous.id).wait(WAIT_LIMIT_S)
    with Storage(StorageConfig(root=str(tmp_path), unit='host'), consent=consent) as storage:
        episodes = storage.episodes
        assert episodes.origin(bobs.id) == 'bob'
        assert episodes.origin(anonymous.id) == ''
        assert episodes.origin('never-seen') == ''
        plan = ' '.join(str(tuple(r)) for r in storage.query(
            'explain query plan ' + episodes.ORIGIN, (bobs.id,)))
        assert 'episodes_event' in plan and 'SCAN episodes' not in plan
        fact_id = SemanticMemory(storage, 'b', HashEmbedder()).add_fact(
            'bob', 'likes', 'tea', provenance=bobs.id)
        storage.writer.flush()
        assert storage.query('select data_subject from facts where id = ?',
                             (fact_id,))[0][0] == 'bob'
        indexed = storage.query("select count(*) from episodes indexed by episodes_event "
                                "where event_id is not null and subject != ''")[0][0]
        assert indexed == 1
    consent.close()
    audit.close()
