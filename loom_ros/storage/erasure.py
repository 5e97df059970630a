"""The right to erasure and the right of access on one robot (issue 17): `forget` erases
physically everything held about a data subject under a storage root, `export` writes it into
one archive a person can read. The fleet / cloud tier is not covered here (see docs/privacy.md).

What names a subject: the `subject` column of episodes, cold memories and router decisions
(filled from the event's `loom.subject` metadata), consent rows, the subject's data key, object
keys under `subjects/<subject>/`, archive records with a `subject` field, trace lines and MCAP
Event messages whose metadata names it (in any of its `loom.subject` entries), KV rows (an
agent's state) an event of the subject wrote to (`kv_subjects`), and plugin files under
`<root>/plugins/<plugin>/subjects/<subject>/`. Physical: every SQLite file is written with
`secure_delete=on`, then checkpointed (`wal_checkpoint(TRUNCATE)`) and VACUUMed, so neither
free pages nor the WAL keep a copy; archives, traces and recordings are rewritten to a temporary
file and renamed over the old one (recordings stored in the object store, `blobs/recordings/`,
are rewritten there). A recording is streamed, a message read and written at a time, into a new
temporary file beside it (`.<name>.<random>.erasing`, `.part` in the object folder: never taken
for a recording), renamed over it only once whole; one a running `loom record` still writes (its
lock held) is left alone and said. The audit log keeps only a tombstone (a keyed hash of the
subject, when, who asked, counts per tier).

Unit databases are erased under the locks their writers take (Storage's `<unit>.db.lock`, the
lifecycle's `cold/<unit>.lock`): while an agent host or the storage node holds one, `forget`
refuses (ErasureError naming it) and changes nothing in that unit; stop them first."""
from __future__ import annotations

import fcntl
import gzip
import io
import json
import os
import re
import secrets
import shutil
import sqlite3
import stat
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from loom_ros.bus.privacy import (SUBJECT_METADATA_KEY, SUBJECTS_JSON_KEY, check_subject,
                                  json_split, json_subject_fields)
from loom_ros.replay.mcap_source import (Limits, McapSource, RecordingError, UnfinishedError,
                                         open_regular)
from loom_ros.security.keyring import KEYRING_FILE, Keyring, KeyringError, ShreddedError
from loom_ros.storage.backend.encrypted import EncryptedObjectStore
from loom_ros.storage.backend.local import TMP_SUFFIX, LocalObjectStore
from loom_ros.storage.cold import MAGIC as COLD_MAGIC, IndexParams
from loom_ros.storage.consent import (ConsentRegistry, SubjectRefs, check_source,
                                      consent_path)
from loom_ros.storage.errors import IndexMismatchError, StorageError
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.lifecycle import Lifecycle
from loom_ros.storage.rowcipher import RowCipher, cold_context, episode_context
from loom_ros.storage.schema import bounded_ms
from loom_ros.storage.sqlite import open_database

SUBJECT_OBJECTS = 'subjects'         # object keys subjects/<subject>/... belong to that subject
MAX_TRACE_LINE = 1 << 20             # longer lines are kept out of an export, dropped by forget
MAX_TRACE_BYTES = 512 * 1024 * 1024  # a trace file larger than this is refused, not read
TIERS = ('episodes', 'cold', 'facts', 'decisions', 'outcomes', 'consent', 'keys', 'archive_records',
         'archive_files', 'blobs', 'trace_lines', 'recording_messages', 'state', 'plugin_files')
STORED_RECORDINGS = 'blobs/recordings/'   # recordings in the object store (blobs.store_recording)
PLUGIN_SUBJECTS = 'subjects'   # <root>/plugins/<plugin>/subjects/<subject>/: a plugin's files
                               # about one subject (docs/storage.md)
# Recordings are read through the replay's bounded reader (its per-file budget included): a file
# planted under the root cannot make forget, which holds every storage lock, or export allocate
# what its lengths claim. Every message a record can hold is checked, not only playable sizes.
RECORDING_LIMITS = Limits(max_message_bytes=Limits.max_record_bytes)
# A recording's rewrite is written to `.<name>.<16 hex>` + this beside it (TMP_SUFFIX in the
# object folder, whose listing skips it), and renamed over it once whole.
REWRITE_SUFFIX = '.erasing'
REWRITE_NAME_CHARS = 200   # of the recording's name in its rewrite's (the whole within NAME_MAX)


class ErasureError(StorageError):
    """Erasure or export cannot run (a unit held by a running process, a bad argument)."""


@dataclass
class Receipt:
    """What `forget` erased, per tier; `subject_ref` is the keyed hash the tombstone names."""

    subject_ref: str
    requested_by: str
    at_ms: int
    counts: dict = field(default_factory=lambda: {t: 0 for t in TIERS})
    files: int = 0               # files rewritten or deleted
    not_covered: list = field(default_factory=list)
    audit_id: int = 0

    def as_dict(self) -> dict:
        return {'subject_ref': self.subject_ref, 'requested_by': self.requested_by,
                'at_ms': self.at_ms, 'counts': dict(self.counts), 'files': self.files,
                'not_covered': list(self.not_covered), 'audit_id': self.audit_id}


# What forget cannot trace to a subject, said in every receipt (and docs/privacy.md).
NOT_COVERED = [
    'agent state written before its subjects were noted (kv rows without kv_subjects)',
    'plugin data outside <root>/plugins/<plugin>/subjects/<subject>/',
    'facts stored before facts had a data_subject column, derived from an event already '
    'condensed to cold (their provenance event id is gone)',
    'archive records written before the subject column existed (no subject field)',
    'agents\' own files from before the storage layer (<root>/agents/*.db)',
    'records in the append-only audit log other than consent changes (which name a keyed hash)',
    'text log files (e.g. <root>/logs/*.log of a demo: Loom logs name no subject, but an event '
    'monitor printing whole events would)',
    'the fleet / cloud tier and the bridge outbox',
    'recorded messages that name no subject: rviz markers (loom/ui/markers, recorded only when '
    'asked for) and ui states recorded before they listed loom.subjects',
]


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@contextmanager
def _flock(path: Path, what: str):
    """The lock a writer of the storage layer holds; refused (ErasureError) while one runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ErasureError(f'{what} is held by a running process ({path}); stop the nodes '
                               'that write this storage root (agent hosts, the storage node) and '
                               'run it again: nothing of this unit was changed') from None
        yield
    finally:
        os.close(fd)


def _index_dim(path: Path) -> int:
    """The dimensions of a unit's persisted cold index (384 when there is none)."""
    try:
        with open(path, 'rb') as stream:
            head = stream.read(12)
            if head[:8] != COLD_MAGIC:
                return 384
            size = struct.unpack_from('<I', head, 8)[0]
            return int(json.loads(stream.read(min(size, 4096)))['dim'])
    except (OSError, ValueError, KeyError, struct.error):
        return 384


def _scrub(conn: sqlite3.Connection, path) -> bool:
    """Checkpoint the WAL into the file, VACUUM (no free page keeps an old row), checkpoint and
    truncate the WAL again. False when a reader kept a checkpoint from completing."""
    try:
        conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')
        conn.execute('VACUUM')
        busy = conn.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()[0]
    except sqlite3.Error as exc:
        raise ErasureError(f'{path}: cannot vacuum after erasure: {exc}') from None
    return busy == 0


def _delete(conn: sqlite3.Connection, sql: str, args=()) -> int:
    return conn.execute(sql, args).rowcount


def _has(conn: sqlite3.Connection, table: str, column: str = '') -> bool:
    cols = {r[1] for r in conn.execute(f'pragma table_info({table})')}
    return bool(cols) and (not column or column in cols)


def _objects(layout: StorageLayout, keyring: Keyring | None, inner=None):
    """The object store as the storage node writes it: `inner` (the configured backend, S3
    or the local folder; default the local folder), encrypting through `keyring`."""
    inner = inner if inner is not None else LocalObjectStore(layout.objects)
    return EncryptedObjectStore(inner, keyring) if keyring is not None else inner


def _head(store, layout: StorageLayout, key: str) -> bytes:
    """An object's first bytes (an encrypted one's header names its key): read from the
    file for the local folder, else the object (bounded by the backend's own size limit)."""
    if isinstance(store, LocalObjectStore):
        with open(layout.objects / key, 'rb') as stream:
            return stream.read(64)
    return store.get(key)[:64]


def _discard(path) -> None:
    """Remove a half-written file (a failed rewrite's), whatever is left of it."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _atomic_write(path: Path, write: Callable) -> None:
    """`write(stream)` into a temporary file beside `path`, fsync, rename over it."""
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.erasing', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


# -- finding what names the subject -------------------------------------------------------------
def _names(value, subject: str, depth: int = 0) -> bool:
    """Whether a decoded JSON value holds the subject id as a whole string anywhere."""
    if isinstance(value, str):
        return value == subject
    if depth > 32:
        return False
    if isinstance(value, dict):
        return any(_names(k, subject, depth + 1) or _names(v, subject, depth + 1)
                   for k, v in value.items())
    if isinstance(value, list):
        return any(_names(v, subject, depth + 1) for v in value)
    return False


def _trace_line_names(line: bytes, subject: str) -> bool:
    """A trace line names the subject when its JSON holds the id as a whole string; a line that
    is not JSON (or too long to parse) is judged by the bytes of the id."""
    if len(line) > MAX_TRACE_LINE:
        return subject.encode() in line
    try:
        return _names(json.loads(line), subject)
    except ValueError:
        return subject.encode() in line


def trace_files(layout: StorageLayout) -> list[Path]:
    """`<root>/traces/*.jsonl*` (rotated files too) and JSON-lines files at the root (the
    demo's trace.jsonl); compressed ones are not rewritten (see docs/privacy.md)."""
    found = []
    if layout.traces.is_dir():
        found += sorted(layout.traces.glob('*.jsonl*'))
    if layout.root.is_dir():
        found += sorted(layout.root.glob('*.jsonl*'))
    return [p for p in found if _plain_file(p) and not p.name.endswith('.gz')
            and not p.name.endswith('.erasing')]


def _plain_file(path: Path) -> bool:
    """A regular file, not a link: a link planted under the root is never followed (it would
    read, and rewrite, a file outside it)."""
    return path.is_file() and not path.is_symlink()


def reaches(layout: StorageLayout, path: Path) -> bool:
    """Whether recording_files would find a recording at `path` (existing or not yet): a .mcap
    under <root>/recordings or directly in <root>. The recorder warns when it writes elsewhere."""
    if path.suffix != '.mcap':
        return False
    folder = Path(os.path.abspath(path)).parent.resolve()
    return folder == layout.root.resolve() or folder.is_relative_to(layout.recordings.resolve())


def recording_files(layout: StorageLayout) -> list[Path]:
    found = []
    if layout.recordings.is_dir():
        found += sorted(layout.recordings.rglob('*.mcap'))
    if layout.root.is_dir():
        found += sorted(layout.root.glob('*.mcap'))
    return [p for p in found if _plain_file(p)]


EVENT_TYPES = ('loom_msgs/msg/Event', 'loom_msgs/Event')
BATCH_TYPES = ('loom_msgs/msg/EventBatch', 'loom_msgs/EventBatch')
# A routing decision names the data subject of the event it decided (`subject`, router/decisions)
DECISION_TYPES = ('loom_msgs/msg/RouteDecision', 'loom_msgs/RouteDecision')
# A JSON text (the ui plugin's screen state) lists whose data it holds (privacy.SUBJECTS_JSON_KEY)
TEXT_TYPES = ('std_msgs/msg/String', 'std_msgs/String')


def _names_subject(msg, subject: str) -> bool:
    """Whether any `loom.subject` entry of an Event names `subject`: the bus keeps the last
    entry, the recorder's consent hook checks every one, so erasure matches every one."""
    return any(kv.key == SUBJECT_METADATA_KEY and kv.value == subject for kv in msg.metadata)


def _json(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(',', ':'))


def _event_decoder():
    """(Event, EventBatch, RouteDecision, String, deserialize, serialize): rclpy's CDR."""
    from rclpy.serialization import deserialize_message, serialize_message
    from loom_msgs.msg import Event, EventBatch, RouteDecision
    from std_msgs.msg import String
    return Event, EventBatch, RouteDecision, String, deserialize_message, serialize_message


def split_message(schema, data: bytes, subject: str, decoder) -> tuple[bytes | None, bytes | None,
                                                                         int]:
    """(what stays, what is the subject's, events of the subject) of one recorded message: an
    Event or a RouteDecision naming the subject goes whole; an EventBatch loses the subject's
    events (re-encoded, dropped when none is left) and a JSON text saying whose its fields are
    (SUBJECTS_JSON_KEY: the ui plugin's screen state) the subject's fields (marked erased);
    anything else stays. A message that cannot be
    decoded stays (it names no one Loom can tell)."""
    name = getattr(schema, 'name', '')
    if name not in EVENT_TYPES + BATCH_TYPES + DECISION_TYPES + TEXT_TYPES:
        return data, None, 0
    event_cls, batch_cls, decision_cls, text_cls, deserialize, serialize = decoder
    if name in TEXT_TYPES and SUBJECTS_JSON_KEY.encode() not in data:
        return data, None, 0   # no list of subjects: not decoded
    try:
        msg = deserialize(data, event_cls if name in EVENT_TYPES else
                          decision_cls if name in DECISION_TYPES else
                          text_cls if name in TEXT_TYPES else batch_cls)
    except Exception:   # a damaged message
        return data, None, 0
    if name in TEXT_TYPES:
        read = json_subject_fields(msg.data)
        if read is None:   # says it has a map but cannot be read: gone if it holds the id
            named = f'"{subject}"' in msg.data   # as a whole JSON string, not a substring
            return (None, None, 1) if named else (data, None, 0)
        if subject not in read[1].values():
            return data, None, 0
        kept, theirs = json_split(*read, {subject}, 'erased')
        return (serialize(text_cls(data=_json(kept))), serialize(text_cls(data=_json(theirs))),
                1)
    if name in DECISION_TYPES:
        return (None, data, 1) if msg.subject == subject else (data, None, 0)
    if name in EVENT_TYPES:
        return (None, data, 1) if _names_subject(msg, subject) else (data, None, 0)
    theirs = [e for e in msg.events if _names_subject(e, subject)]
    if not theirs:
        return data, None, 0
    others = [e for e in msg.events if not _names_subject(e, subject)]
    mine = batch_cls(header=msg.header, bus_id=msg.bus_id, first_seq=msg.first_seq, events=theirs)
    if not others:
        return None, serialize(mine), len(theirs)
    msg.events = others
    return serialize(msg), serialize(mine), len(theirs)


def _recording(path: Path | bytes, name: str = 'recording') -> McapSource:
    """A recording (a file, or the bytes of one read from the object store, named `name`) read
    bounded, every channel whatever its topic or encodings (forget copies what it cannot play)."""
    if isinstance(path, bytes):
        return McapSource(name, None, RECORDING_LIMITS, data=path)
    return McapSource(path, None, RECORDING_LIMITS)


def _recording_messages(path: Path | bytes) -> Iterator:
    """(None, schema, channel, message) of each message of a recording, read bounded (a
    RecordingError past its limits); the first slot held mcap's summary before."""
    for message in _recording(path).messages():
        yield None, message.channel.schema, message.channel, message


def _messages(source: McapSource) -> Iterator:
    """The messages of a recording to its end; an unfinished one (a recorder killed: every
    record read, no data end) is whole here (RecordingError: not read whole)."""
    try:
        yield from source.messages()
    except UnfinishedError:
        return


def _subject_events(source: McapSource, subject: str, decoder) -> int:
    """How many of the subject's events a recording holds (RecordingError: not read whole)."""
    return sum(split_message(m.channel.schema, m.data, subject, decoder)[2]
               for m in _messages(source))


def _unread(source: McapSource) -> str:
    """What the bounded reader left out of a recording (never checked), as '<reason> <n>, ...'."""
    return ', '.join(f'{reason} {n}' for reason, n in sorted(source.skipped.items()))


def _why(exc: Exception, source: McapSource) -> str:
    """Why a recording was not read, without the path a RecordingError starts with (the receipt
    names the file)."""
    return str(exc).removeprefix(f'{source.path}: ')[:160]


# -- forget -------------------------------------------------------------------------------------
def forget(layout: StorageLayout, subject: str, *, requested_by: str = 'cli',
           keyring: Keyring | None = None, audit=None, refs: SubjectRefs | None = None,
           clock: Callable[[], int] = _wall_ms, objects=None) -> Receipt:
    """Erase everything held about `subject` under `layout.root` (see the module's docstring).
    `audit`: the audit log (an AuditLog: `append(plugin, kind, ts_ms, **fields)`), `refs`: the
    subject-hash key (default: <root>/keys/subject_ref.key), `keyring`: the key table opened
    with its master key, to read encrypted archives (without it the subject's data key is still
    destroyed and its objects deleted by their key id); `objects`: the configured object-store
    backend (storage.objects: S3, or by default the local folder), unencrypted: archives and
    blobs are erased where they are. The request is audited first: if the
    audit log cannot take it, nothing is erased. Raises ErasureError / SubjectError."""
    check_subject(subject)
    check_source(requested_by)
    refs = refs or SubjectRefs.at(layout.keys)
    receipt = Receipt(refs.ref(subject), requested_by, int(clock()))
    receipt.not_covered = list(NOT_COVERED)
    units = layout.databases()
    backend = objects if objects is not None else LocalObjectStore(layout.objects)
    objects = _objects(layout, keyring, backend)
    with ExitStack() as locks:
        erasers = []
        for db in units:   # all or nothing: every lock taken before anything is touched
            locks.enter_context(_flock(db.with_name(db.name + '.lock'),
                                       f'storage unit {db.stem!r}'))
            erasers.append((db, locks.enter_context(_UnitEraser.open(layout, db.stem, objects))))
        if audit is not None:
            audit.append('erasure', 'erasure_requested', receipt.at_ms,
                         subject_ref=receipt.subject_ref, requested_by=requested_by)
        key_ids = _subject_key_ids(layout, subject)
        for db, eraser in erasers:
            _forget_unit(eraser, db, subject, key_ids, receipt)
        _forget_router(layout.router_history, subject, receipt)
        _forget_consent(layout, subject, audit, refs, receipt)
        _forget_objects(layout, subject, key_ids, receipt, backend)
        _forget_plugin_data(layout, subject, receipt)
        _forget_key(layout, subject, keyring, receipt)
        for path in trace_files(layout):
            _forget_trace(path, subject, receipt)
        recordings = recording_files(layout)
        if recordings:
            decoder = _event_decoder()
            for path in recordings:
                _forget_recording(path, subject, decoder, receipt)
        _forget_stored_recordings(backend, objects, [e for _db, e in erasers], subject, receipt)
    if audit is not None:
        receipt.audit_id = audit.append('erasure', 'subject_erased', int(clock()),
                                        subject_ref=receipt.subject_ref,
                                        requested_by=requested_by, at_ms=receipt.at_ms,
                                        counts=dict(receipt.counts))
    return receipt


def _subject_key_ids(layout: StorageLayout, subject: str) -> set[bytes]:
    """The ids of the subject's data keys (readable without the master key)."""
    path = layout.keys / KEYRING_FILE
    if not path.is_file():
        return set()
    conn = open_database(path, read_only=True)
    try:
        return {bytes(r[0]) for r in conn.execute(
            "select key_id from data_keys where kind = 'subject' and name = ?", (subject,))}
    except sqlite3.Error:
        return set()
    finally:
        conn.close()


def _forget_unit(lifecycle: '_UnitEraser', db: Path, subject: str, key_ids,
                 receipt: Receipt) -> None:
    """One unit database: facts traceable to the subject's events, episodes, cold memories (with
    their index entries, through the lifecycle's own removal), router rows, archive records,
    subject blobs; then vacuumed. The caller holds the unit's locks."""
    conn = lifecycle.conn
    counts = receipt.counts
    try:
        conn.execute('PRAGMA secure_delete=ON')
        conn.execute('BEGIN IMMEDIATE')
        try:
            if _has(conn, 'facts'):
                counts['facts'] += _delete(
                    conn, 'delete from facts where subject = ?1 or object = ?1 or provenance in '
                    '(select event_id from episodes where subject = ?1)'
                    + (' or data_subject = ?1' if _has(conn, 'facts', 'data_subject') else ''),
                    (subject,))
            counts['episodes'] += _delete(conn, 'delete from episodes where subject = ?',
                                          (subject,))
            lifecycle.clamp_ids(conn)   # ids above the newest left may be given again
            if _has(conn, 'kv_subjects'):   # state an event of the subject wrote to
                written = conn.execute('select ns, key from kv_subjects where subject = ?',
                                       (subject,)).fetchall()
                for ns, key in written:
                    counts['state'] += _delete(conn, 'delete from kv where ns = ? and key = ?',
                                               (ns, key))
                    conn.execute('delete from kv_subjects where ns = ? and key = ?', (ns, key))
            if _has(conn, 'decisions', 'subject'):
                counts['outcomes'] += _delete(
                    conn, 'delete from outcomes where decision_id in (select id from decisions '
                    'where subject = ?)', (subject,))
                counts['decisions'] += _delete(conn, 'delete from decisions where subject = ?',
                                               (subject,))
            # By exact prefix: LIKE ignores ASCII case and takes `_` (valid in a subject id) as
            # any character, so forget('bob_1') deleted the blob rows of BOB_1 and bobX1 too.
            prefix = f'{SUBJECT_OBJECTS}/{subject}/'
            blobs = [r[0] for r in conn.execute('select key from blobs where substr(key, 1, ?) '
                                                '= ?', (len(prefix), prefix))]
            conn.executemany('delete from blobs where key = ?', [(k,) for k in blobs])
            counts['blobs'] += len(blobs)
            conn.execute('COMMIT')
        except BaseException:
            conn.execute('ROLLBACK')
            raise
        ids = [r[0] for r in conn.execute('select id from cold where subject = ?', (subject,))]
        if ids:
            lifecycle.delete_cold(ids)
            counts['cold'] += len(ids)
        _forget_archives(lifecycle, subject, key_ids, receipt)
    finally:
        lifecycle.save_index(force=True)
    _scrub(conn, db)


class _UnitEraser(Lifecycle):
    """The lifecycle of one unit, opened for erasure (it takes the unit's lifecycle lock): its
    cold removal (row, log entry and index entry in one transaction) and its archive reading."""

    @classmethod
    def open(cls, layout, unit: str, objects) -> '_UnitEraser':
        params = IndexParams(dim=_index_dim(layout.cold_index(unit)))
        try:
            # no quick check on open (it reads the whole file): the VACUUM that ends the
            # erasure reads every page and fails on a damaged file the same way
            try:
                return cls(layout, unit, objects, embedder=None, index_params=params,
                           check=False)
            except IndexMismatchError:   # a stale index must not block an erasure: rebuilt
                return cls(layout, unit, objects, embedder=None, index_params=params,  # from rows
                           rebuild=True, check=False)
        except StorageError as exc:
            if 'runs its lifecycle' in str(exc):
                raise ErasureError(f'the lifecycle of storage unit {unit!r} is run by another '
                                   'process (the storage node?); stop it and run it again: '
                                   'nothing was changed') from None
            raise

    def _check_encryption(self) -> None:
        """Erasure only deletes (and rewrites archives through the keyring it was given): it
        runs on a database with encrypted rows without the master key too."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def delete_cold(self, ids: list[int]) -> None:
        for start in range(0, len(ids), 500):
            self._delete_cold(ids[start:start + 500])
        self.unsaved += len(ids)


def _forget_archives(lifecycle: Lifecycle, subject: str, key_ids, receipt: Receipt) -> None:
    """Rewrite each archive file holding records of the subject without them (atomically, same
    key); delete a file left empty, or an encrypted one under the subject's key."""
    conn, objects = lifecycle.conn, lifecycle.objects
    inner = objects.inner if isinstance(objects, EncryptedObjectStore) else objects
    for key, tier, rows in conn.execute(
            "select key, tier, rows from archive where state = 'done'").fetchall():
        try:
            blob = inner.get(key)
        except StorageError as exc:
            receipt.not_covered.append(f'archive {key[:80]!r}: unreadable ({str(exc)[:120]})')
            continue
        if key_ids and Keyring.key_id_of(blob) in key_ids:   # the subject's own file
            receipt.counts['archive_records'] += int(rows)
            _drop_archive(conn, objects, key, receipt)
            continue
        if not isinstance(objects, EncryptedObjectStore) and blob[:3] == b'LKE':
            continue   # encrypted and no keyring given: only the subject's key files are known
        try:
            records = lifecycle.read_archive(key)
        except ShreddedError:
            continue   # a destroyed key: nothing in it can be read by anyone
        except StorageError as exc:
            receipt.not_covered.append(_damaged_archive(key, exc, 'not rewritten'))
            continue
        keep = [r for r in records if r.get('subject') != subject]
        gone = len(records) - len(keep)
        if not gone:
            continue
        receipt.counts['archive_records'] += gone
        if not keep:
            _drop_archive(conn, objects, key, receipt)
            continue
        body = gzip.compress(b''.join(json.dumps(r, separators=(',', ':')).encode() + b'\n'
                                      for r in keep), compresslevel=6)
        if isinstance(objects, EncryptedObjectStore):
            # the day the lifecycle filed it under (a stamp bounded as it was: schema)
            objects.put(key, body, time_ms=max(bounded_ms(r.get('last_ms')) for r in keep))
        else:
            objects.put(key, body)
        conn.execute('update archive set rows = ?, bytes = ? where key = ?',
                     (len(keep), len(body), key))
        receipt.files += 1


def _damaged_archive(key: str, exc: Exception, what: str) -> str:
    """The `not_covered` line of an archive file that is damaged, truncated or tampered: part of
    it may still be read by other means and may hold the subject's records."""
    return f'archive {key[:80]!r}: damaged, {what} ({str(exc)[:120]})'


def _drop_archive(conn, objects, key: str, receipt: Receipt) -> None:
    conn.execute('delete from archive where key = ?', (key,))
    objects.delete(key)
    receipt.counts['archive_files'] += 1
    receipt.files += 1


def _sqlite_erase(path: Path, statements: list[tuple[str, tuple]]) -> list[int]:
    """Run deletes on a shared file (secure_delete, one transaction), then scrub it."""
    conn = open_database(path)
    try:
        conn.execute('PRAGMA secure_delete=ON')
        conn.execute('BEGIN IMMEDIATE')
        try:
            counts = [conn.execute(sql, args).rowcount for sql, args in statements]
            conn.execute('COMMIT')
        except BaseException:
            conn.execute('ROLLBACK')
            raise
        _scrub(conn, path)
        return counts
    except sqlite3.Error as exc:
        raise ErasureError(f'{path}: cannot erase: {exc}') from None
    finally:
        conn.close()


def _forget_router(path: Path, subject: str, receipt: Receipt) -> None:
    if not path.is_file():
        return
    conn = open_database(path, read_only=True)
    try:
        has = _has(conn, 'decisions', 'subject')
    finally:
        conn.close()
    if not has:
        receipt.not_covered.append(f'{path.name}: written before decisions had a subject column')
        return
    outcomes, decisions = _sqlite_erase(path, [
        ('delete from outcomes where decision_id in (select id from decisions where '
         'subject = ?)', (subject,)),
        ('delete from decisions where subject = ?', (subject,))])
    receipt.counts['outcomes'] += outcomes
    receipt.counts['decisions'] += decisions


def _forget_consent(layout, subject: str, audit, refs, receipt: Receipt) -> None:
    path = consent_path(layout.root)
    if not path.is_file():
        return
    if audit is not None:
        registry = ConsentRegistry(path, audit=audit, refs=refs)
        try:
            receipt.counts['consent'] += registry.erase(subject)
        finally:
            registry.close()
        _sqlite_erase(path, [])
    else:
        receipt.counts['consent'] += _sqlite_erase(path, [
            ('delete from consent where subject = ?', (subject,))])[0]


def _forget_objects(layout, subject: str, key_ids, receipt: Receipt, store) -> None:
    """Objects under subjects/<subject>/ and any object sealed under the subject's key, in
    `store` (the backend, unencrypted view)."""
    for key, _size in store.list(f'{SUBJECT_OBJECTS}/{subject}/'):
        store.delete(key)
        receipt.files += 1
    if not key_ids:
        return
    for key, _size in store.list(''):
        if key.startswith('archive/'):
            continue   # their rows are handled with their unit
        try:
            head = _head(store, layout, key)   # an encrypted object's header names its key
        except (OSError, StorageError):
            receipt.not_covered.append(f'object {key[:80]!r}: unreadable, not checked')
            continue
        try:
            if Keyring.key_id_of(head) in key_ids:
                store.delete(key)
                receipt.counts['blobs'] += 1
                receipt.files += 1
        except StorageError:
            continue


def plugin_subject_dirs(layout: StorageLayout, subject: str) -> list[Path]:
    """`<root>/plugins/<plugin>/subjects/<subject>/` of every plugin: where a plugin keeps its
    files about one data subject. Links are never followed (neither a plugin folder, its
    `subjects` folder nor the subject's folder may be one)."""
    plugins = layout.root / 'plugins'
    if not plugins.is_dir() or plugins.is_symlink():
        return []
    found = []
    for plugin in sorted(plugins.iterdir()):
        folder = plugin / PLUGIN_SUBJECTS / subject
        if all(p.is_dir() and not p.is_symlink() for p in (plugin, plugin / PLUGIN_SUBJECTS,
                                                            folder)):
            found.append(folder)
    return found


def _plugin_files(folder: Path) -> list[Path]:
    """Files under `folder`, links included as files (never followed)."""
    out = []
    for top, dirs, files in os.walk(folder, followlinks=False):
        out += [Path(top) / name for name in files]
        out += [Path(top) / name for name in dirs if (Path(top) / name).is_symlink()]
    return sorted(out)


def _forget_plugin_data(layout, subject: str, receipt: Receipt) -> None:
    """A plugin's files about the subject: each overwritten with zeros (best effort: a
    journaling or copy-on-write file system, an SSD, may keep old blocks), then the folder
    removed (links are removed, never followed)."""
    for folder in plugin_subject_dirs(layout, subject):
        for path in _plugin_files(folder):
            _zero(path)
            receipt.counts['plugin_files'] += 1
            receipt.files += 1
        shutil.rmtree(folder)


def _zero(path: Path) -> None:
    """Overwrite a regular file with zeros: never through a link (O_NOFOLLOW), never blocking
    on a FIFO or device planted there (O_NONBLOCK, then only a regular file is written)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return   # a link, a FIFO without a reader, gone: removed with its folder
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return
        block, left = b'\0' * (1 << 20), info.st_size
        while left > 0:
            left -= os.write(fd, block[:min(left, len(block))])
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _forget_key(layout, subject: str, keyring: Keyring | None, receipt: Receipt) -> None:
    """Crypto-shredding: the subject's data key goes (Keyring.destroy; without the master key
    the same delete, secure_delete and checkpoint, on the key table itself)."""
    path = layout.keys / KEYRING_FILE
    if keyring is not None:
        receipt.counts['keys'] += keyring.destroy(subject)['keys']
    elif path.is_file():
        receipt.counts['keys'] += _sqlite_erase(path, [
            ("insert or ignore into shredded select key_id, kind, ? from data_keys where "
             "kind = 'subject' and name = ?", (receipt.at_ms, subject)),
            ("delete from data_keys where kind = 'subject' and name = ?", (subject,))])[1]
    if path.is_file() and keyring is not None:
        _sqlite_erase(path, [])


def _forget_trace(path: Path, subject: str, receipt: Receipt) -> None:
    size = path.stat().st_size
    if size > MAX_TRACE_BYTES:
        receipt.not_covered.append(f'{path.name}: {size} bytes, more than {MAX_TRACE_BYTES}; '
                                   'not read')
        return
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    keep = [line for line in lines if not _trace_line_names(line.rstrip(b'\r\n'), subject)]
    if len(keep) == len(lines):
        return
    receipt.counts['trace_lines'] += len(lines) - len(keep)
    _atomic_write(path, lambda out: out.writelines(keep))
    receipt.files += 1


def _copy_recording(source: McapSource, out, subject: str, decoder, keep: bool,
                    library: str) -> int:
    """Write to `out` an MCAP of `source`'s messages without (keep) or with only (not keep) what
    is the subject's; same schemas, channels and their metadata (its first 64 entries). Returns
    the subject's events; RecordingError when the recording cannot be read whole."""
    from mcap.writer import CompressionType, Writer
    writer = Writer(out, compression=CompressionType.ZSTD)
    writer.start(profile='ros2', library=library)
    schemas, channels, count = {}, {}, 0
    for message in _messages(source):
        info, schema = message.channel, message.channel.schema
        stays, theirs, n = split_message(schema, message.data, subject, decoder)
        count += n
        data = stays if keep else theirs
        if data is None:
            continue
        if info.id not in channels or channels[info.id][0] is not info:   # new, or redefined
            schema_key = (schema.name, schema.encoding, schema.data) \
                if schema is not None else None
            if schema_key is not None and schema_key not in schemas:
                schemas[schema_key] = writer.register_schema(*schema_key)
            channels[info.id] = info, writer.register_channel(
                info.topic, info.message_encoding, schemas.get(schema_key, 0),
                dict(info.metadata))
        writer.add_message(channels[info.id][1], message.log_time_ns, data,
                           message.publish_time_ns, message.sequence)
    writer.finish()
    return count


class _Busy(OSError):
    """A recording locked by the `loom record` that still writes it (open_output's flock)."""


def _open_recording(path: Path):
    """The recording at `path`, open for reading under a shared lock: never through a link
    (O_NOFOLLOW), never blocking on a FIFO (O_NONBLOCK), a regular file (fstat on the open
    file, so nothing swapped in after recording_files looked is read). _Busy while a recorder
    holds it; OSError when it cannot be read."""
    stream = open_regular(path, follow=False)
    try:
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise _Busy(f'{path}: locked') from None
        return stream
    except BaseException:
        stream.close()
        raise


def _rewrite_name(path: Path, suffix: str) -> re.Pattern:
    """The names of `path`'s rewrites (_rewrite_recording): `.<name>.<16 hex><suffix>`."""
    return re.compile(re.escape(f'.{path.name[:REWRITE_NAME_CHARS]}.') + '[0-9a-f]{16}'
                      + re.escape(suffix) + r'\Z')


def _remove_stale_rewrites(path: Path, suffix: str) -> int:
    """Remove what a forget killed mid-rewrite left beside `path` (its rewrites: a copy of
    other subjects' data no later forget would reach); one still locked by a running rewrite
    is left. Links and anything not a plain file are never opened. Returns how many went."""
    pattern, removed = _rewrite_name(path, suffix), 0
    try:
        with os.scandir(path.parent) as entries:
            names = [e.name for e in entries if pattern.match(e.name)]
    except OSError:
        return 0
    for name in names:
        stale = path.parent / name
        try:
            fd = os.open(stale, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(info, os.lstat(stale)):
                os.unlink(stale)
                removed += 1
        except OSError:
            continue   # locked: a rewrite in progress
        finally:
            os.close(fd)
    return removed


def _rewrite_recording(path: Path, original: os.stat_result, write: Callable,
                       suffix: str) -> int:
    """`write(out)` streamed into a new file beside `path`, renamed over it once whole; its new
    size. The file is created new (O_CREAT | O_EXCL | O_NOFOLLOW, mode 0600, a random name
    _rewrite_name matches, which no reader takes for a recording), locked while written (so
    _remove_stale_rewrites leaves it), fsynced, given the original's mode, and renamed only over
    the file that was read (`original`: RecordingError if it was replaced meanwhile). A failure
    or a kill before the rename leaves `path` as it was; a failure removes the new file, a kill
    leaves it to the next forget."""
    tmp = path.with_name(f'.{path.name[:REWRITE_NAME_CHARS]}.{secrets.token_hex(8)}{suffix}')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with os.fdopen(fd, 'wb', closefd=False) as out:
            write(out)
        os.fsync(fd)
        os.fchmod(fd, original.st_mode & 0o777)
        if not os.path.samestat(original, os.lstat(path)):
            raise RecordingError(f'{path}: replaced while it was rewritten')
        os.replace(tmp, path)
        size = os.fstat(fd).st_size
    except BaseException:
        _discard(tmp)
        raise
    finally:
        os.close(fd)
    folder = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return size


def _forget_recording(path: Path, subject: str, decoder, receipt: Receipt, label: str = '',
                      suffix: str = REWRITE_SUFFIX, max_bytes: int | None = None
                      ) -> tuple[int, bool] | None:
    """Rewrite an MCAP file without the subject's events (Event messages naming it, its events
    in EventBatch messages): one pass to count, one streamed into the rewrite
    (_rewrite_recording), both from the one file opened (_open_recording). A file the bounded
    reader cannot read whole (over its budget, damaged), or over `max_bytes`, is left as it is
    and said in the receipt under `label` (default: its name); records it skipped are said too
    (the rewrite leaves them out). An unfinished file (a recorder killed) is read whole; one a
    running recorder still holds is left and said. (its size after, whether it was rewritten),
    or None when it was not read."""
    label = label or path.name
    _remove_stale_rewrites(path, suffix)
    try:
        stream = _open_recording(path)
    except _Busy:
        receipt.not_covered.append(f'{label}: being written by a running loom record (its lock '
                                   'is held); not read, not changed: forget again once it ends')
        return None
    except OSError as exc:
        receipt.not_covered.append(f'{label}: not read, not changed ({exc.strerror or exc})')
        return None
    with stream:
        original = os.fstat(stream.fileno())
        if max_bytes is not None and original.st_size > max_bytes:
            receipt.not_covered.append(f'{label}: unreadable, not checked ({original.st_size} '
                                       f'bytes, more than {max_bytes})')
            return None
        source = McapSource(path, None, RECORDING_LIMITS, stream=stream)
        try:
            drop = _subject_events(source, subject, decoder)
        except (RecordingError, OSError) as exc:
            receipt.not_covered.append(f'{label}: not read, not changed ({_why(exc, source)})')
            return None
        unread = _unread(source)
        if not drop:
            if unread:
                receipt.not_covered.append(f'{label}: records not readable, not checked '
                                           f'({unread})')
            return original.st_size, False
        try:
            size = _rewrite_recording(path, original, lambda out: _copy_recording(
                McapSource(path, None, RECORDING_LIMITS, stream=stream), out, subject, decoder,
                True, 'loom forget'), suffix)
        except RecordingError as exc:   # changed since the first pass
            receipt.not_covered.append(f'{label}: not rewritten ({_why(exc, source)})')
            return None
    receipt.counts['recording_messages'] += drop
    receipt.files += 1
    if unread:
        receipt.not_covered.append(f'{label}: rewritten without records it could not read '
                                   f'({unread})')
    return size, True


def _stored_recordings(backend) -> list[str]:
    return [key for key, _size in backend.list(STORED_RECORDINGS) if key.endswith('.mcap')]


def _forget_stored_recordings(backend, store, erasers, subject: str, receipt: Receipt) -> None:
    """Recordings in the object store (`loom record --store`), rewritten there without the
    subject's events (read through `store`, the encrypting view when there is a keyring), and
    the length in their index rows brought in line. One that cannot be read is said in the
    receipt's not-covered list."""
    keys = _stored_recordings(backend)
    decoder = _event_decoder() if keys else None
    for key in keys:
        if store is backend and isinstance(backend, LocalObjectStore):
            _forget_stored_file(backend, erasers, key, subject, decoder, receipt)
            continue
        # Encrypted (sealed whole) or S3 (put whole): read and written as one object, at most
        # the store's object size.
        try:
            data = store.get(key)
        except StorageError as exc:
            receipt.not_covered.append(f'object {key[:80]!r}: unreadable, not checked '
                                       f'({str(exc)[:80]})')
            continue
        source = _recording(data, key)
        try:
            drop = _subject_events(source, subject, decoder)
        except RecordingError as exc:
            receipt.not_covered.append(f'object {key[:80]!r}: not read, not changed '
                                       f'({_why(exc, source)})')
            continue
        unread = _unread(source)
        if unread:
            receipt.not_covered.append(
                f'object {key[:80]!r}: ' + (f'rewritten without records it could not read '
                                            f'({unread})' if drop else
                                            f'records not readable, not checked ({unread})'))
        if not drop:
            # nothing of the subject: still bring the index rows to the object's length, so a
            # forget cut off between a rewrite and its rows' update is mended by running again
            mended = sum(eraser.conn.execute(
                'update blobs set bytes = ? where key = ? and bytes != ?',
                (len(data), key, len(data))).rowcount for eraser in erasers)
            if mended:   # said, so a recording changed by someone else does not pass unseen
                receipt.not_covered.append(f'object {key[:80]!r}: its index said another '
                                           f'length; now {len(data)} bytes (an earlier forget '
                                           'cut off, or the object was replaced)')
            continue
        out = io.BytesIO()
        _copy_recording(_recording(data, key), out, subject, decoder, True, 'loom forget')
        body = out.getvalue()
        created = [r[0] for e in erasers for r in e.conn.execute(
            'select created_ms from blobs where key = ?', (key,))]
        if isinstance(store, EncryptedObjectStore):   # anonymous: under its day's key again
            store.put(key, body, time_ms=created[0] if created else None)
        else:
            store.put(key, body)
        for eraser in erasers:
            eraser.conn.execute('update blobs set bytes = ? where key = ?', (len(body), key))
        receipt.counts['recording_messages'] += drop
        receipt.files += 1


def _forget_stored_file(backend: LocalObjectStore, erasers, key: str, subject: str, decoder,
                        receipt: Receipt) -> None:
    """A stored recording in the local object folder, unencrypted: streamed like a file under
    the root (_forget_recording; its rewrite named to be skipped by the folder's listing),
    never loaded whole; then its index rows given its length."""
    label = f'object {key[:80]!r}'
    try:
        path = backend._check_folders(key)   # no link between the object root and it
    except StorageError as exc:
        receipt.not_covered.append(f'{label}: unreadable, not checked ({str(exc)[:80]})')
        return
    done = _forget_recording(path, subject, decoder, receipt, label, TMP_SUFFIX,
                             backend.max_bytes)
    if done is None:
        return
    size, rewritten = done
    mended = sum(eraser.conn.execute('update blobs set bytes = ? where key = ? and bytes != ?',
                                     (size, key, size)).rowcount for eraser in erasers)
    if mended and not rewritten:   # said, so a recording changed by someone else is seen
        receipt.not_covered.append(f'{label}: its index said another length; now {size} bytes '
                                   '(an earlier forget cut off, or the object was replaced)')


# -- export -------------------------------------------------------------------------------------
def export(layout: StorageLayout, subject: str, out_path: str | os.PathLike, *,
           keyring: Keyring | None = None, objects=None) -> dict:
    """Write everything held about `subject` into one zip a person can read: `subject.json`
    (episodes, cold memories, facts, router decisions and outcomes, consent history, archive
    records, trace lines) and `media/` (the subject's objects and an MCAP of its recorded
    events). Read-only on the stores. `objects`: the configured object-store backend (as
    `forget`'s). Returns the counts per tier."""
    check_subject(subject)
    backend = objects if objects is not None else LocalObjectStore(layout.objects)
    out_path = Path(out_path)
    data: dict = {'subject': subject, 'exported_ms': _wall_ms(), 'root': str(layout.root)}
    counts: dict = {}

    def add(tier: str, rows: list) -> None:
        data.setdefault(tier, []).extend(rows)
        counts[tier] = counts.get(tier, 0) + len(rows)

    cipher = RowCipher(keyring)
    for db in layout.databases():
        conn = open_database(db, read_only=True)
        conn.row_factory = sqlite3.Row
        try:
            if _has(conn, 'episodes', 'subject'):
                add('episodes', [{**r, 'unit': db.stem} for r in _opened(
                    cipher, db, 'payload', lambda r: episode_context(
                        r['agent_id'], r['event_id'], r['time_ms'], subject), conn.execute(
                        'select agent_id, event_id, time_ms, type, source, tags, payload from '
                        'episodes where subject = ? order by time_ms', (subject,)))])
            if _has(conn, 'cold', 'subject'):
                add('cold', [{**r, 'unit': db.stem} for r in _opened(
                    cipher, db, 'summary', lambda r: cold_context(
                        r['agent_id'], r['type'], r['source'], r['first_ms'], r['last_ms'],
                        subject), conn.execute(
                        'select agent_id, type, source, first_ms, last_ms, count, summary from '
                        'cold where subject = ? order by first_ms', (subject,)))])
            if _has(conn, 'facts'):
                # Facts filed under another data subject (made from their events, even when
                # they mention this one) are theirs: counted, not shown.
                owner = 'data_subject' if _has(conn, 'facts', 'data_subject') else "''"
                rows = [dict(r) for r in conn.execute(
                    f'select agent_id, subject, relation, object, provenance, time_ms, '
                    f'{owner} as owner from facts where subject = ?1 or object = ?1'
                    + (' or provenance in (select event_id from episodes where subject = ?1)'
                       if _has(conn, 'episodes', 'subject') else '')
                    + (' or data_subject = ?1' if owner == 'data_subject' else ''),
                    (subject,))]
                add('facts', [{**{k: v for k, v in r.items() if k != 'owner'}, 'unit': db.stem}
                              for r in rows if r['owner'] in ('', subject)])
                _withheld(data, 'facts', sum(1 for r in rows if r['owner'] not in ('', subject)))
            if _has(conn, 'kv_subjects'):
                # State written by this subject's events alone; state that others' events
                # wrote too cannot be split per person: named (where), its value not shown.
                rows = conn.execute(
                    'select kv.ns, kv.key, kv.schema, kv.value, (select count(*) from '
                    'kv_subjects o where o.ns = kv.ns and o.key = kv.key and o.subject != ?1) '
                    'as others from kv join kv_subjects s on s.ns = kv.ns and s.key = kv.key '
                    'where s.subject = ?1', (subject,)).fetchall()
                add('state', [{'ns': r['ns'], 'key': r['key'], 'schema': r['schema'],
                               'value': _json_or_text(r['value']), 'unit': db.stem}
                              for r in rows if not r['others']])
                shared = [{'ns': r['ns'], 'key': r['key'], 'unit': db.stem,
                           'value': 'not shown: written by other data subjects\' events too'}
                          for r in rows if r['others']]
                if shared:
                    add('state_shared', shared)
            if _has(conn, 'decisions', 'subject'):
                _export_router(conn, subject, add)
            archives = [r[0] for r in conn.execute(
                "select key from archive where state = 'done'")]
        finally:
            conn.close()
        if archives:
            add('archive', _export_archives(layout, db.stem, archives, subject, keyring,
                                            backend, data.setdefault('not_covered', [])))
    if layout.router_history.is_file():
        conn = open_database(layout.router_history, read_only=True)
        conn.row_factory = sqlite3.Row
        try:
            if _has(conn, 'decisions', 'subject'):
                _export_router(conn, subject, add)
        finally:
            conn.close()
    path = consent_path(layout.root)
    if path.is_file():
        conn = open_database(path, read_only=True)
        conn.row_factory = sqlite3.Row
        try:
            add('consent', [dict(r) for r in conn.execute(
                'select purpose, granted, source, changed_ms from consent where subject = ? '
                'order by id', (subject,))])
        finally:
            conn.close()
    for trace in trace_files(layout):
        if trace.stat().st_size > MAX_TRACE_BYTES:
            continue
        lines = []
        for line in trace.read_bytes().splitlines():
            if len(line) <= MAX_TRACE_LINE and _trace_line_names(line, subject):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    lines.append(line.decode('utf-8', 'replace'))
        add('trace', [{'file': trace.name, 'line': x} for x in lines])
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write(stream) -> None:
        with zipfile.ZipFile(stream, 'w', zipfile.ZIP_DEFLATED) as archive:
            store = _objects(layout, keyring, backend)
            inner = backend
            for key, _size in inner.list(f'{SUBJECT_OBJECTS}/{subject}/'):
                try:
                    archive.writestr(f'media/{key[len(SUBJECT_OBJECTS) + len(subject) + 2:]}',
                                     store.get(key))
                    counts['media'] = counts.get('media', 0) + 1
                except StorageError:
                    continue
            for folder in plugin_subject_dirs(layout, subject):
                plugin = folder.parent.parent.name
                for path in _plugin_files(folder):
                    if path.is_symlink() or not path.is_file() or \
                            path.stat().st_size > MAX_TRACE_BYTES:
                        continue   # a link, a FIFO or device (never read), or too large
                    archive.writestr(f'media/plugins/{plugin}/{path.relative_to(folder)}',
                                     path.read_bytes())
                    counts['plugin_files'] = counts.get('plugin_files', 0) + 1
            unread: list[str] = []   # recordings (or parts) not read: the export is not whole
            for recording in recording_files(layout):
                n = _export_recording(recording, subject, archive, unread)
                if n:
                    counts['recording_messages'] = counts.get('recording_messages', 0) + n
            for key in _stored_recordings(inner):
                try:
                    recording = store.get(key)
                except StorageError:
                    continue
                n = _export_recording(recording, subject, archive, unread,
                                      f'media/recordings/{key.rsplit("/", 1)[-1]}', key)
                if n:
                    counts['recording_messages'] = counts.get('recording_messages', 0) + n
            if unread:
                data.setdefault('not_covered', []).extend(unread)
            data['counts'] = counts
            archive.writestr('subject.json', json.dumps(data, indent=1, default=str))
            archive.writestr('README.txt', f'Everything Loom held about data subject {subject} '
                             'under its storage root on one robot: subject.json (one list per '
                             'store) and media/ (files and recorded events, MCAP).\n')

    fd, tmp = tempfile.mkstemp(prefix=f'.{out_path.name}.', dir=out_path.parent)
    try:
        with os.fdopen(fd, 'wb') as stream:
            write(stream)
        os.replace(tmp, out_path)
    except BaseException:
        _discard(tmp)
        raise
    return counts


def _withheld(data: dict, tier: str, n: int) -> None:
    """Count `n` rows of `tier` an export leaves out because they are another subject's."""
    if n:
        withheld = data.setdefault('withheld_other_subjects', {})
        withheld[tier] = withheld.get(tier, 0) + n

def _json_or_text(value: str):
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def _opened(cipher: RowCipher, db: Path, column: str, context, rows) -> list[dict]:
    """Rows as dicts with `column` decrypted (encryption at rest); a row whose key was destroyed
    is left out; ciphertext without the master key is an ErasureError (never exported as it
    is)."""
    out = []
    for row in rows:
        row = dict(row)
        try:
            text = cipher.open_or_none(row[column], context(row))
        except KeyringError as exc:
            raise ErasureError(f'{db}: {exc} (give the master key: --master-key-file)') from None
        if text is not None:
            row[column] = text
            out.append(row)
    return out


def _export_router(conn, subject: str, add) -> None:
    add('decisions', [dict(r) for r in conn.execute(
        'select id, time, event_id, event_type, agent_id, privacy, route, rule, confidence '
        'from decisions where subject = ?', (subject,))])
    add('outcomes', [dict(r) for r in conn.execute(
        'select o.* from outcomes o join decisions d on o.decision_id = d.id where '
        'd.subject = ?', (subject,))])


def _export_archives(layout, unit: str, keys: list[str], subject: str,
                     keyring: Keyring | None, backend=None,
                     not_covered: list | None = None) -> list[dict]:
    """The subject's archive records of `unit`; a damaged file is named in `not_covered` (it
    may hold some: the export says it is not complete), a shredded one is not (nobody can read
    it)."""
    not_covered = [] if not_covered is None else not_covered
    reader = Lifecycle(layout, unit, _objects(layout, keyring, backend), embedder=None,
                       read_only=True,
                       index_params=IndexParams(dim=_index_dim(layout.cold_index(unit))))
    out = []
    try:
        for key in keys:
            try:
                out += [{**r, 'archive': key} for r in reader.read_archive(key)
                        if r.get('subject') == subject]
            except ShreddedError:
                continue
            except StorageError as exc:
                not_covered.append(_damaged_archive(key, exc, 'not read'))
    finally:
        reader.close()
    return out


def _export_recording(path: Path | bytes, subject: str, archive: zipfile.ZipFile,
                      unread: list, name: str = '', key: str = '') -> int:
    """The subject's recorded events of one recording (a file, or the bytes of object `key`,
    exported as `name`), as an MCAP in the export. A recording the bounded reader cannot read
    whole is left out, and what it could not read is said in `unread`."""
    label = f'object {key[:80]!r}' if key else path.name
    source = _recording(path, key)
    buffer = io.BytesIO()
    try:
        count = _copy_recording(source, buffer, subject, _event_decoder(), False, 'loom export')
    except (RecordingError, OSError) as exc:
        unread.append(f'recording {label}: not read, left out ({_why(exc, source)})')
        return 0
    if source.skipped:
        unread.append(f'recording {label}: records not readable, not checked '
                      f'({_unread(source)})')
    if count:
        archive.writestr(name or f'media/{path.name}', buffer.getvalue())
    return count
