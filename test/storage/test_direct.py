"""A database written in place (the audit log, the router's history, consent) checkpoints on a
thread of its own, as a unit database does: SQLite's automatic checkpoint ran inside the write
that crossed 1,000 WAL pages (its copy and fsyncs in that COMMIT: every ~300th audit append took
5-38 ms on an idle disk, and the face flow's ui update waited for it)."""
from loom_ros.security.audit import AuditLog
from loom_ros.storage import schema
from loom_ros.storage.direct import DirectDatabase
from loom_ros.storage.sqlite import Checkpointer
from loom_ros.storage.stores import AuditStore


def autocheckpoint(db: DirectDatabase) -> int:
    return db.conn.execute('pragma wal_autocheckpoint').fetchone()[0]


def test_audit_appends_past_a_thousand_pages_leave_the_checkpoint_to_its_thread(tmp_path):
    """1,200 appends write about 4,000 WAL pages: none of them ran SQLite's checkpoint (the WAL
    still holds every frame) until the checkpointer's turn copies them all."""
    db = DirectDatabase(tmp_path / 'audit.db', schema.AUDIT_DDL, checkpoint_s=3600)   # turns here
    try:
        assert autocheckpoint(db) == Checkpointer.BACKSTOP_PAGES
        store = AuditStore(db)
        for i in range(1200):
            store.append('ui', 'actuator_command', None, command='ui_update', frame_ms=i)
        busy, frames, copied = db.checkpointer.run_once()
        assert busy == 0 and frames > 2000 and copied == frames, (busy, frames, copied)
        assert store.count('ui', '') == 1200
    finally:
        db.close()
    assert not db.checkpointer._thread.is_alive()   # closed with the database


def test_an_audit_log_runs_its_checkpointer(tmp_path):
    log = AuditLog(tmp_path / 'audit.db')
    try:
        assert log._db.checkpointer is not None and log._db.checkpointer._thread.is_alive()
        assert autocheckpoint(log._db) == Checkpointer.BACKSTOP_PAGES
        log.append('ui', 'ui_update', emoji='x')
        assert log.verify().ok
    finally:
        log.close()


def test_memory_and_switched_off_keep_sqlites_own(tmp_path):
    memory = DirectDatabase(':memory:', schema.AUDIT_DDL)
    plain = DirectDatabase(tmp_path / 'plain.db', schema.AUDIT_DDL, checkpoint_s=0)
    try:
        assert memory.checkpointer is None and plain.checkpointer is None
        assert autocheckpoint(plain) == 1000
    finally:
        memory.close()
        plain.close()
