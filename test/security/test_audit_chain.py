"""The audit log's hash chain on real files: processes appending at once make one chain;
a record edited, deleted or moved with raw sqlite3 (triggers dropped first, as an attacker
would) fails `verify` at that record, in the library and in the CLI (a real process); a cut tail
or a recomputed chain fails against a head noted before; an old file is upgraded on open and its
older records are said to be outside the chain."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from harness import WAIT_LIMIT_S
from loom_ros.security.audit import AuditError, AuditLog, read_head, verify_file
from loom_ros.storage import auditchain
from loom_ros.storage.auditchain import Head, HeadError
from loom_ros.storage.storage import Storage, StorageConfig


def cli(*args: str) -> subprocess.CompletedProcess:
    """`loom audit ...` as a user runs it (the module the loom command registers)."""
    return subprocess.run([sys.executable, '-m', 'loom_ros.cli.audit', *args],
                          capture_output=True, text=True, timeout=WAIT_LIMIT_S)


def raw(path) -> sqlite3.Connection:
    """What someone who opens the file does: drop the triggers, then edit at will."""
    conn = sqlite3.connect(path, isolation_level=None)
    for trigger in ('audit_no_update', 'audit_no_delete', 'audit_meta_no_update',
                    'audit_meta_no_delete'):
        conn.execute(f'drop trigger if exists {trigger}')
    return conn


@pytest.fixture
def log_path(tmp_path):
    path = tmp_path / 'audit.db'
    log = AuditLog(path)
    for i in range(1, 11):
        log.append(f'plugin{i % 3}', 'actuator_command', ts_ms=1000 + i, event_id=f'e{i}')
    log.close()
    return path


WRITER = """
import sys
from loom_ros.security.audit import AuditLog
log = AuditLog(sys.argv[1])
print('ready', flush=True)
sys.stdin.readline()                      # all start together
for i in range(int(sys.argv[3])):
    log.append(sys.argv[2], 'tick', i=i)
log.close()
"""


def test_processes_appending_at_once_make_one_chain(tmp_path):
    path = tmp_path / 'audit.db'
    AuditLog(path).close()
    procs = [subprocess.Popen([sys.executable, '-c', WRITER, str(path), f'proc{n}', '150'],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for n in range(4)]
    for proc in procs:
        assert proc.stdout.readline().strip() == 'ready'
    for proc in procs:
        proc.stdin.write('go\n')
        proc.stdin.flush()
    assert [p.wait(timeout=WAIT_LIMIT_S) for p in procs] == [0, 0, 0, 0]
    log = AuditLog(path)
    rows = log.query(limit=10**6)
    assert sorted(r['id'] for r in rows) == list(range(1, 601))
    for n in range(4):
        assert [r['fields']['i'] for r in log.query(plugin=f'proc{n}', limit=10**6)] == \
            list(range(150))
    verdict = log.verify()
    assert verdict.ok and verdict.checked == 600 and verdict.head == log.head()
    assert log.head().id == 600
    log.close()
    out = cli('verify', '--db', str(path))
    assert out.returncode == 0 and 'audit chain ok: 600 records' in out.stdout, out.stderr
    head = cli('head', '--db', str(path))
    assert head.returncode == 0 and Head.parse(head.stdout.split()[0]) == verdict.head


def test_an_edited_record_fails_at_that_record(log_path):
    conn = raw(log_path)
    conn.execute("update audit set fields = '{\"event_id\":\"forged\"}' where id = 7")
    conn.close()
    verdict = verify_file(log_path)
    assert not verdict.ok and verdict.bad_id == 7 and 'edited' in verdict.reason
    out = cli('verify', '--db', str(log_path))
    assert out.returncode == 1 and 'BROKEN at record 7' in out.stderr, out
    as_json = json.loads(cli('verify', '--db', str(log_path), '--json').stdout)
    assert as_json['ok'] is False and as_json['bad_id'] == 7


def test_a_changed_type_or_time_is_an_edit_too(log_path):
    conn = raw(log_path)
    conn.execute("update audit set ts_ms = '1004' where id = 3")   # same digits, a text value
    conn.execute('update audit set ts_ms = ts_ms + 1 where id = 9')
    conn.close()
    assert verify_file(log_path).bad_id == 3


def test_a_deleted_record_fails_at_the_next_one(log_path):
    conn = raw(log_path)
    conn.execute('delete from audit where id = 4')
    conn.close()
    verdict = verify_file(log_path)
    assert not verdict.ok and verdict.bad_id == 5 and 'record(s) 4 before it are missing' in \
        verdict.reason
    out = cli('verify', '--db', str(log_path))
    assert out.returncode == 1 and 'BROKEN at record 5' in out.stderr


def test_swapped_records_fail_at_the_first_of_them(log_path):
    conn = raw(log_path)
    conn.execute('update audit set id = -1 where id = 5')
    conn.execute('update audit set id = 5 where id = 6')
    conn.execute('update audit set id = 6 where id = -1')
    conn.close()
    verdict = verify_file(log_path)
    assert not verdict.ok and verdict.bad_id == 5 and 'reordered' in verdict.reason


def test_a_cut_tail_or_a_recomputed_chain_fails_against_a_noted_head(log_path):
    noted, count = read_head(log_path)
    assert count == 10 and noted.id == 10
    conn = raw(log_path)
    conn.execute('delete from audit where id > 8')
    conn.close()
    assert verify_file(log_path).ok    # without a head, a cut tail cannot be seen
    verdict = verify_file(log_path, noted)
    assert not verdict.ok and verdict.bad_id == 10 and 'cut from the end' in verdict.reason
    out = cli('verify', '--db', str(log_path), '--head', str(noted))
    assert out.returncode == 1 and 'BROKEN at record 10' in out.stderr
    # the attacker edits record 2 and recomputes every hash after it, then writes 2 more
    conn = raw(log_path)
    conn.execute("update audit set kind = 'nothing' where id = 2")
    prev = conn.execute('select hash from audit where id = 1').fetchone()[0]
    for row in conn.execute('select id, ts_ms, plugin, kind, fields from audit where id >= 2 '
                            'order by id').fetchall():
        prev = auditchain.link(prev, *row)
        conn.execute('update audit set hash = ? where id = ?', (prev, row[0]))
    for i in (9, 10):
        fields = '{}'
        prev = auditchain.link(prev, i, 5000, 'x', 'y', fields)
        conn.execute('insert into audit values (?, 5000, ?, ?, ?, ?)', (i, 'x', 'y', fields, prev))
    conn.close()
    assert verify_file(log_path).ok    # a consistent rewrite: only a noted head shows it
    head_file = log_path.with_name('head.txt')
    head_file.write_text(f'{noted}\n')
    out = cli('verify', '--db', str(log_path), '--head-file', str(head_file))
    assert out.returncode == 1 and 'BROKEN at record 10' in out.stderr and \
        'rewritten' in out.stderr


def test_hashes_or_the_chain_start_removed_are_caught(log_path):
    conn = raw(log_path)
    conn.execute('update audit set hash = null where id = 3')
    conn.close()
    assert verify_file(log_path).bad_id == 3
    conn = raw(log_path)
    conn.execute("update audit_meta set value = '5' where key = 'chain_start'")   # hide 1..4
    conn.close()
    verdict = verify_file(log_path)
    assert verdict.bad_id == 1 and 'chain start was moved' in verdict.reason
    conn = raw(log_path)
    conn.execute('delete from audit_meta')
    conn.close()
    assert 'no chain start' in verify_file(log_path).reason
    assert cli('verify', '--db', str(log_path)).returncode == 1


def test_a_record_written_without_the_chain_is_caught(log_path):
    conn = sqlite3.connect(log_path)   # the triggers allow inserts: an old Loom, or anyone
    with conn:
        conn.execute("insert into audit (ts_ms, plugin, kind, fields) values (1, 'x', 'y', '{}')")
    conn.close()
    verdict = verify_file(log_path)
    assert verdict.bad_id == 11 and 'no chain hash' in verdict.reason


def test_opening_a_log_with_a_broken_tail_is_refused(log_path):
    conn = raw(log_path)
    conn.execute("update audit set plugin = 'someone else' where id = 10")
    conn.close()
    with pytest.raises(AuditError, match=r'refusing to append to a broken chain: the last '
                       r'record \(10\)'):
        AuditLog(log_path)


def test_sqlite_refuses_a_record_below_the_chain_start_or_before_the_last(log_path):
    """Review finding: a record inserted with an id below the chain start was taken (and passed
    verify). A trigger refuses it, and one in a gap of the chain; one at the end is taken."""
    conn = raw(log_path)   # the four older triggers dropped: a record can be deleted
    conn.execute('delete from audit where id = 4')
    for row_id in (0, -1, 4):
        with pytest.raises(sqlite3.IntegrityError, match='append-only'):
            conn.execute("insert into audit values (?, 1, 'x', 'y', '{}', null)", (row_id,))
    conn.execute("insert into audit (ts_ms, plugin, kind, fields) values (1, 'x', 'y', '{}')")
    assert conn.execute('select min(id), max(id), count(*) from audit').fetchone() == (1, 11, 10)
    conn.close()


def test_a_record_planted_before_the_chain_start_fails_verify(log_path):
    """With every trigger dropped, a record planted below the chain start (no hash: outside it)
    passed verify as an 'older record'. A chain from id 1 has none: it fails there."""
    conn = raw(log_path)
    conn.execute('drop trigger if exists audit_append_at_end')
    conn.execute("insert into audit values (0, 900, 'robot', 'actuator_command', "
                 "'{\"event_id\":\"forged\"}', null)")
    conn.close()
    verdict = verify_file(log_path)
    assert not verdict.ok and verdict.bad_id == 0 and 'outside the chain' in verdict.reason
    log = AuditLog(log_path)   # opening does not check it; verify does
    assert log.verify().bad_id == 0
    log.close()
    out = cli('verify', '--db', str(log_path))
    assert out.returncode == 1 and 'BROKEN at record 0' in out.stderr, out


def test_a_record_planted_among_the_older_records_of_an_upgraded_file_fails_verify(tmp_path):
    """An upgraded file's older records are not covered by the chain; how many there were is
    noted when it starts, so one planted in a gap among them fails verify."""
    path = tmp_path / 'old.db'
    conn = sqlite3.connect(path)   # before the chain, with a gap at 3
    with conn:
        conn.execute('create table audit (id integer primary key, ts_ms int not null, '
                     'plugin text not null, kind text not null, fields text not null)')
        conn.executemany("insert into audit values (?, ?, 'old', 'tick', '{}')",
                         [(i, i) for i in (1, 2, 4, 5)])
    conn.close()
    log = AuditLog(path)
    assert (log.chain_start, log.before_chain) == (6, 4)
    log.append('new', 'tick', n=1)
    log.close()
    assert verify_file(path).ok
    conn = raw(path)
    conn.execute('drop trigger if exists audit_append_at_end')
    conn.execute("insert into audit values (3, 3, 'old', 'tick', '{\"forged\":1}', null)")
    conn.close()
    verdict = verify_file(path)
    assert not verdict.ok and '5 records lie before the chain start (6), 4 did' in verdict.reason
    assert not AuditLog(path).verify().ok


def test_an_old_file_is_upgraded_and_its_older_records_are_outside_the_chain(tmp_path):
    path = tmp_path / 'old.db'
    conn = sqlite3.connect(path)   # the table as Loom wrote it before the chain
    with conn:
        conn.execute('create table audit (id integer primary key, ts_ms int not null, '
                     'plugin text not null, kind text not null, fields text not null)')
        conn.executemany('insert into audit (ts_ms, plugin, kind, fields) values (?, ?, ?, ?)',
                         [(i, 'old', 'tick', '{}') for i in range(5)])
    conn.close()
    before = verify_file(path)     # read-only: no upgrade, and no pass
    assert not before.ok and 'no hash chain' in before.reason
    assert cli('verify', '--db', str(path)).returncode == 1
    log = AuditLog(path)
    assert (log.chain_start, log.before_chain) == (6, 5)
    log.append('new', 'tick', n=1)
    log.append('new', 'tick', n=2)
    log.close()
    verdict = verify_file(path)
    assert verdict.ok and (verdict.checked, verdict.before_chain, verdict.chain_start) == (2, 5, 6)
    out = cli('verify', '--db', str(path))
    assert out.returncode == 0 and '5 older records' in out.stdout and 'not covered' in out.stdout
    assert [r['plugin'] for r in AuditLog(path).query()] == ['old'] * 5 + ['new'] * 2


def test_a_unit_database_keeps_the_chain_through_group_commit(tmp_path):
    with Storage(StorageConfig(root=str(tmp_path), unit='host', max_delay_ms=5)) as storage:
        tickets = [storage.audit.append('p', 'k', i=i)[1] for i in range(300)]
        for ticket in tickets:
            ticket.wait(WAIT_LIMIT_S)
        verdict = storage.audit.verify()
        assert verdict.ok and verdict.checked == 300 and verdict.head.id == 300
        assert storage.audit.check_tail() == ''


@pytest.mark.parametrize('text', ['', '12', '12:' + 'g' * 64, 'x:' + 'a' * 64, '1:' + 'a' * 63,
                                  '1:' + 'A' * 64, '9' * 500 + ':' + 'a' * 64, '-1:' + 'a' * 64])
def test_hostile_heads_are_refused(text):
    with pytest.raises(HeadError, match='a chain head is ID:HASH'):
        Head.parse(text)


def test_the_cli_refuses_a_hostile_head(log_path):
    out = cli('verify', '--db', str(log_path), '--head=-1:' + 'a' * 64)
    assert out.returncode == 1 and 'a chain head is ID:HASH' in out.stderr
    huge = log_path.with_name('huge.txt')
    huge.write_text('1' * 10**6)
    out = cli('verify', '--db', str(log_path), '--head-file', str(huge))
    assert out.returncode == 1 and 'a chain head is ID:HASH' in out.stderr


def test_a_missing_or_foreign_file_is_a_clear_error(tmp_path):
    out = cli('verify', '--db', str(tmp_path / 'none.db'))
    assert out.returncode == 1 and 'none.db' in out.stderr
    other = tmp_path / 'other.db'
    sqlite3.connect(other).execute('create table t (x)').connection.close()
    out = cli('head', '--db', str(other))
    assert out.returncode == 1 and 'not an audit log' in out.stderr
