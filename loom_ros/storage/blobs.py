"""Blobs: large files (WAV answers, camera frames, recordings...) kept in the configured object
store (storage.objects: the local folder <root>/objects by default, an S3-compatible bucket when
configured; the same for every process under the root), each indexed by a row of its unit
database's `blobs` table (key, bytes, content type, when).

A data subject's blob is keyed `subjects/<subject>/<kind>/<name>`: where `forget` deletes and
`export` copies from, on whichever backend is configured (erasure.py), and its index row goes
with it. It is sealed under the subject's key when encryption is on (so destroying the key
shreds it too), and kept only with the subject's `store` consent, as an episode is: without it
(or for an id that is not valid) nothing is stored and it is counted (`withheld`). Anonymous
blobs are keyed `blobs/<kind>/<name>`, under the key of their UTC day when encrypted.

Bounded before anything is written: kind and name are file-name parts (1-64 letters, digits,
_ . -), a content type is a short `type/subtype`, a blob at most `max_bytes`; a blob read back
must have the length its row says. Every refusal is counted in `rejected`.

Ordered per key: the put, delete, put of one key (from any threads of the process) run one at a
time, each object change and its row committed before the next begins, and a row delete is a
writer barrier (it never runs before a row write submitted ahead of it in the same batch), so
the row and the object agree: put, delete, put leaves the last object and its row.

Recordings (`loom record --store`, store_recording): a finished MCAP goes in as the anonymous blob
`blobs/recordings/<file name>` of the unit `recorder` (a recording mixes subjects; each event's
recording consent was applied while it was written), and the local file is removed; `forget`
rewrites such a recording in the object store without the subject's events and `export` copies
the subject's events out of it, as for files under <root>/recordings. fetch_recording writes one
back to a local file (for `loom play`, `loom view`)."""
from __future__ import annotations

import os
import re
import threading
from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loom_ros.bus.privacy import SubjectError, check_subject
from loom_ros.security.keyring import encryption_settings
from loom_ros.storage.backend import ObjectSettings
from loom_ros.storage.backend.encrypted import EncryptedObjectStore
from loom_ros.storage.durable import NotRegularError, read_regular, write_atomic
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import check_name
from loom_ros.storage.storage import Storage, StorageConfig

SUBJECTS = 'subjects'   # subjects/<subject>/...: erasure.SUBJECT_OBJECTS
ANONYMOUS = 'blobs'
MAX_BLOB_BYTES = 64 * 1024 * 1024
RECORDINGS = 'recordings'       # the blob kind of stored recordings
RECORDER_UNIT = 'recorder'      # the unit database that indexes them
MAX_CONTENT_TYPE_CHARS = 100
_CONTENT_TYPE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9.+-]*/[A-Za-z0-9][A-Za-z0-9.+-]*$')
# A blob's index row (a put); a delete of it is submitted with barrier=True.
PUT_ROW = ('insert or replace into blobs (key, bytes, content_type, created_ms) '
           'values (?, ?, ?, ?)')
DELETE_ROW = 'delete from blobs where key = ?'


@dataclass(frozen=True)
class BlobRef:
    key: str
    bytes: int
    content_type: str
    created_ms: int


class BlobStore:
    """put / get / list / delete of blobs through a Storage's object store and writer."""

    def __init__(self, storage, max_bytes: int = MAX_BLOB_BYTES):
        self.storage, self.max_bytes = storage, int(max_bytes)
        self.rejected: Counter = Counter()   # oversize, bad_name, bad_subject, bad_type, bad_key
        self.withheld = 0                    # blobs of subjects without store consent
        self._keys: dict[str, list] = {}     # key -> [lock, holders]: one change of a key at a time
        self._keys_lock = threading.Lock()

    @contextmanager
    def _one_at_a_time(self, key: str):
        """Hold `key` through its object change and its row's commit: another thread's put or
        delete of it waits, so object and row changes of a key happen in the same order."""
        with self._keys_lock:
            entry = self._keys.get(key)
            if entry is None:
                entry = self._keys[key] = [threading.Lock(), 0]
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._keys_lock:
                entry[1] -= 1
                if not entry[1]:
                    del self._keys[key]

    def _refuse(self, why: str, text: str) -> StorageError:
        self.rejected[why] += 1
        return StorageError(text)

    def key(self, kind: str, name: str, subject: str = '') -> str:
        """Where a blob of `kind` named `name` (of `subject`, '' anonymous) is kept."""
        try:
            check_name(kind, 'blob kind')
            check_name(name, 'blob name')
        except StorageError as exc:
            raise self._refuse('bad_name', str(exc)) from None
        if not subject:
            return f'{ANONYMOUS}/{kind}/{name}'
        try:
            check_subject(subject)
        except SubjectError as exc:
            raise self._refuse('bad_subject', f'blob of a data subject: {exc}') from None
        return f'{SUBJECTS}/{subject}/{kind}/{name}'

    def put(self, kind: str, name: str, data: bytes, *, subject: str = '',
            content_type: str = 'application/octet-stream') -> BlobRef | None:
        """Store `data` (replacing a blob of the same key) and return its ref once the object
        is durable and its row committed; None (counted) when `subject` has not given `store`
        consent."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise self._refuse('bad_type', f'blob data must be bytes, got {type(data).__name__}')
        size = len(data)
        if size > self.max_bytes:
            raise self._refuse('oversize', f'blob {str(name)[:80]!r}: {size} bytes, more than '
                               f'{self.max_bytes}')
        if (not isinstance(content_type, str) or len(content_type) > MAX_CONTENT_TYPE_CHARS
                or not _CONTENT_TYPE.match(content_type)):
            raise self._refuse('bad_type', f'content type {str(content_type)[:80]!r}: '
                               'type/subtype, letters, digits, . + -')
        key = self.key(kind, name, subject)
        if subject and not self.storage.consent.allows(subject):
            self.withheld += 1
            self.storage.count_withheld()
            return None
        with self._one_at_a_time(key):
            created = int(self.storage.clock())
            objects = self.storage.objects
            if isinstance(objects, EncryptedObjectStore):
                objects.put(key, bytes(data), subject=subject or None, time_ms=created)
            else:
                objects.put(key, bytes(data))
            # the object first: a crash before the row leaves an object no row lists (erasure
            # still finds a subject's by its key), never a row without its object
            self.storage.write(PUT_ROW, (key, size, content_type, created)).wait()
        return BlobRef(key, size, content_type, created)

    def _row(self, key: str):
        if not isinstance(key, str) or not key.startswith((f'{SUBJECTS}/', f'{ANONYMOUS}/')):
            raise self._refuse('bad_key', f'{str(key)[:80]!r} is not a blob key')
        rows = self.storage.query('select key, bytes, content_type, created_ms from blobs '
                                  'where key = ?', (key,))
        if not rows:
            raise StorageError(f'blob {key[:120]!r}: not stored (never, or erased)')
        return rows[0]

    def get(self, key: str) -> bytes:
        """A blob's bytes; a StorageError when it is not indexed here, or its object is missing
        or not the length its row says."""
        row = self._row(key)
        data = self.storage.objects.get(key)
        if len(data) != row['bytes']:
            raise StorageError(f'blob {key[:120]!r}: {len(data)} bytes in the object store, '
                               f'{row["bytes"]} recorded; not returned')
        return data

    def ref(self, key: str) -> BlobRef:
        row = self._row(key)
        return BlobRef(row['key'], row['bytes'], row['content_type'], row['created_ms'])

    MAX_LIST = 10000

    def list(self, kind: str = '', subject: str = '', limit: int = 1000) -> list[BlobRef]:
        """Blobs of `kind` ('' any) of `subject` ('' anonymous ones), oldest first; at most
        MAX_LIST. A bad kind or subject is a StorageError, counted like any other refusal."""
        if kind:
            try:
                check_name(kind, 'blob kind')
            except StorageError as exc:
                raise self._refuse('bad_name', str(exc)) from None
        if subject:
            try:
                check_subject(subject)
            except SubjectError as exc:
                raise self._refuse('bad_subject', f'blobs of a data subject: {exc}') from None
        try:
            limit = min(max(1, int(limit)), self.MAX_LIST)
        except (TypeError, ValueError):
            raise self._refuse('bad_type', f'limit {str(limit)[:40]!r} is not a number') from None
        base = f'{SUBJECTS}/{subject}/' if subject else f'{ANONYMOUS}/'
        prefix = f'{base}{kind}/' if kind else base
        rows = self.storage.query(
            'select key, bytes, content_type, created_ms from blobs where substr(key, 1, ?) = ? '
            'order by created_ms, key limit ?', (len(prefix), prefix, limit))
        return [BlobRef(r['key'], r['bytes'], r['content_type'], r['created_ms']) for r in rows]

    def delete(self, key: str) -> None:
        """The object, then its row (a crash between leaves a row whose get says missing). The
        row delete is a barrier: in a batch it runs after the row writes submitted before it
        (grouped with them, it ran after a later put's row and left that put's object
        orphaned)."""
        with self._one_at_a_time(key):
            self._row(key)
            self.storage.objects.delete(key)
            self.storage.writer.submit(((DELETE_ROW, (key,)),), barrier=True).wait()


def store_recording(path: str | os.PathLike, params: Mapping, env: Mapping) -> BlobRef:
    """Move the finished recording at `path` into the object store the flat `storage.*`
    `params` configure (root, objects, encryption; S3 keys and the master key from `env`):
    put, committed, then the local file removed. A StorageError (file left where it is) when
    it is larger than a blob may be, not a plain file, or the store refuses it."""
    path = Path(path)
    try:
        if path.is_symlink() or not path.is_file():
            raise StorageError(f'{path}: not a plain file; not stored')
        size = path.stat().st_size
    except OSError as exc:
        raise StorageError(f'{path}: cannot read: {exc.strerror}') from None
    if size > MAX_BLOB_BYTES:
        raise StorageError(f'{path}: {size} bytes, more than the {MAX_BLOB_BYTES} a blob may '
                           'hold; left where it is')
    name = check_name(path.name, 'recording file name')
    with _recorder(params, env) as storage:
        try:   # the file itself checked again once open: a link or a bigger file swapped
            data = read_regular(path, MAX_BLOB_BYTES)   # in after the checks is refused
        except NotRegularError:
            raise StorageError(f'{path}: not a plain file; not stored') from None
        except OSError as exc:
            raise StorageError(f'{path}: cannot read: {exc.strerror or exc}; left where it '
                               'is') from None
        if len(data) != size:
            raise StorageError(f'{path}: {len(data)} bytes read, {size} when it was checked; '
                               'still being written? left where it is')
        ref = storage.blobs.put(RECORDINGS, name, data, content_type='application/x-mcap')
    try:
        path.unlink()
    except OSError as exc:
        raise StorageError(f'{path}: stored as {ref.key}, but the local file could not be '
                           f'removed: {exc.strerror}') from None
    return ref


def _recorder(params: Mapping, env: Mapping) -> Storage:
    return Storage(StorageConfig(root=str(params['storage.root']), unit=RECORDER_UNIT,
                                 objects=ObjectSettings.from_params(params, env),
                                 encryption=encryption_settings(params)), env=env)


def fetch_recording(name: str, out: str | os.PathLike, params: Mapping,
                    env: Mapping) -> BlobRef:
    """A stored recording (`name`: its file name) written to `out` (atomically, 0600; an
    existing file is refused, never overwritten). A StorageError when it is not stored or does
    not read back whole."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise StorageError(f'{out}: exists; not overwritten')
    with _recorder(params, env) as storage:
        key = storage.blobs.key(RECORDINGS, name)
        ref = storage.blobs.ref(key)
        data = storage.blobs.get(key)
    try:
        write_atomic(out, data, out.with_name(f'.{out.name}.part'), exclusive=True)
    except OSError as exc:
        raise StorageError(f'{out}: cannot write: {exc.strerror}') from None
    return ref
