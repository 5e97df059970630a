"""The audit log: append-only rows in SQLite (WAL), queried by plugin, kind and time, written
from many threads at once, usable as a PluginContext's audit sink, surviving a reopen."""
import sqlite3
import threading

import pytest

from loom_ros.plugins.contract import CapabilityDenied, PluginContext
from loom_ros.security.audit import AuditError, AuditLog


@pytest.fixture
def path(tmp_path):
    return tmp_path / 'audit' / 'audit.db'   # the folder is created on open


def test_append_and_query_by_plugin_kind_and_time(path):
    log = AuditLog(path)
    log.append('arm', 'actuator_command', ts_ms=1000, event_id='e1', target={'x': 1})
    log.append('arm', 'capability_denied', ts_ms=2000, capability='network')
    log.append('face', 'capability_denied', ts_ms=3000, capability='storage.write')
    assert [r['fields'] for r in log.query(plugin='arm')] == [
        {'event_id': 'e1', 'target': {'x': 1}}, {'capability': 'network'}]
    assert [r['plugin'] for r in log.query(kind='capability_denied')] == ['arm', 'face']
    assert [r['ts_ms'] for r in log.query(since_ms=1500, until_ms=3000)] == [2000, 3000]
    assert log.query(plugin='arm', kind='capability_denied')[0]['ts_ms'] == 2000
    assert len(log.query(limit=2)) == 2 and log.count() == 3
    with pytest.raises(AuditError, match='has no kind'):
        log.append('arm', '')
    log.close()


def test_rows_cannot_be_changed_or_deleted_and_survive_a_reopen(path):
    log = AuditLog(path)
    log.append('arm', 'actuator_command', event_id='e1')
    log.close()
    with sqlite3.connect(path) as other:   # even a direct connection cannot rewrite history
        assert other.execute('pragma journal_mode').fetchone()[0] == 'wal'
        for sql in ("update audit set kind = 'nothing'", 'delete from audit'):
            with pytest.raises(sqlite3.IntegrityError, match='append-only'):
                other.execute(sql)
    reopened = AuditLog(path)
    assert [(r['plugin'], r['kind']) for r in reopened.query()] == [('arm', 'actuator_command')]
    reopened.close()


def test_many_threads_append_at_once(path):
    log = AuditLog(path)
    threads = [threading.Thread(target=lambda t=t: [log.append(f'p{t}', 'tick', i=i)
                                                    for i in range(200)]) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = log.query(limit=10**6)
    assert len(rows) == 1600 and len({r['id'] for r in rows}) == 1600
    assert [r['fields']['i'] for r in log.query(plugin='p3', limit=10**6)] == list(range(200))
    log.close()


def test_is_a_plugin_context_audit_sink(path):
    log = AuditLog(path)
    ctx = PluginContext(plugin='greedy', granted=frozenset({'storage.read'}), audit_sink=log)
    ctx.require('storage.read')                     # granted: nothing recorded
    with pytest.raises(CapabilityDenied, match="'greedy' may not use 'network'"):
        ctx.require('network', detail='https://example.org')
    ctx.audit('actuator_command', event_id='m1')
    rows = log.query()
    assert [(r['plugin'], r['kind']) for r in rows] == [('greedy', 'capability_denied'),
                                                        ('greedy', 'actuator_command')]
    assert rows[0]['fields'] == {'capability': 'network', 'detail': 'https://example.org'}
    log.close()


def test_an_unusable_file_is_a_clear_error(tmp_path):
    (tmp_path / 'adir').mkdir()
    with pytest.raises(AuditError, match='adir: cannot open'):
        AuditLog(tmp_path / 'adir')
    garbage = tmp_path / 'garbage.db'
    garbage.write_bytes(b'this is not a database' * 100)
    with pytest.raises(AuditError, match='garbage.db: cannot open'):
        AuditLog(garbage)


WRITER = """
import sys
from loom_ros.security.audit import AuditLog
log = AuditLog(sys.argv[1])
for i in range(int(sys.argv[3])):
    log.append(sys.argv[2], 'tick', i=i)
log.close()
"""


def test_processes_share_one_audit_file(path):
    """Plugin host, agents and bridge each open the same audit_db: every record of every process
    is kept, each with its own id, still append-only."""
    import subprocess
    import sys
    AuditLog(path).close()
    procs = [subprocess.Popen([sys.executable, '-c', WRITER, str(path), f'proc{n}', '300'])
             for n in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    log = AuditLog(path)
    rows = log.query(limit=10**6)
    assert len(rows) == 900 and len({r['id'] for r in rows}) == 900
    for n in range(3):
        assert [r['fields']['i'] for r in log.query(plugin=f'proc{n}', limit=10**6)] == \
            list(range(300))
    log.close()
    with sqlite3.connect(path) as other:
        with pytest.raises(sqlite3.IntegrityError, match='append-only'):
            other.execute('delete from audit')


def test_a_closed_log_refuses_to_write(path):
    log = AuditLog(path)
    log.close()
    with pytest.raises(AuditError, match='cannot write'):
        log.append('arm', 'actuator_command')
