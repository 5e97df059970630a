"""Encryption at rest: a master key (from a 0600 file or the environment, never the config), one
random AES-256-GCM data key per data subject and one per UTC day for anonymous data, kept wrapped
by the master key in a small SQLite key table under the storage root. Destroying a data key
(`destroy(subject)`, `destroy_day(day)`) makes every copy of what it encrypted unreadable at
once, archives and backups of the data included (crypto-shredding): the wrapped key is deleted
with secure_delete and the WAL checkpointed, so it is physically gone from the key table. The
master key rotates without downtime (`rotate`): every data key is rewrapped under the new master
in small transactions while the old one still opens what is not rewrapped yet.

Ciphertext layout, version 1 (every field bounded before it is used):

    b'LKE' | version (1 byte) | key id length n (1 byte, 16) | key id (n bytes) | nonce (12)
    | AES-GCM ciphertext + tag (16)

The associated data is the header plus the caller's context (an object key, a row's identity),
so a ciphertext moved to another key or given another key id fails to decrypt. See
docs/encryption.md.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from loom_ros.bus.privacy import SubjectError, check_subject
from loom_ros.storage.durable import write_atomic
from loom_ros.storage.errors import StorageError
from loom_ros.storage.sqlite import make_folders, open_database

MASTER_KEY_ENV = 'LOOM_STORAGE_MASTER_KEY'
KEYRING_FILE = 'datakeys.db'          # under <root>/keys
MAGIC = b'LKE'
VERSION = 1
KEY_ID_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + 2 + KEY_ID_BYTES + NONCE_BYTES
OVERHEAD = HEADER_BYTES + TAG_BYTES
MAX_PLAINTEXT_BYTES = 512 * 1024 * 1024    # one object or payload; longer is refused unread
MAX_CONTEXT_BYTES = 4096
MAX_KEY_FILE_BYTES = 4096
MAX_MASTER_KEYS = 4                         # current + those still accepted during a rotation
MAX_CACHED_KEYS = 4096
_DAY = re.compile(r'\d{4}-\d{2}-\d{2}\Z')
_ID_INFO = b'loom storage master key id v1'
_VERIFIER = b'loom keyring master key check v1'

DDL = [
    # Master keys known to this key table: one 'current' (wraps new data keys), and during a
    # rotation the 'retiring' ones whose data keys are not rewrapped yet. The verifier is a
    # constant encrypted under the master: a wrong key fails at start, before any data.
    'create table if not exists masters (id text primary key, state text not null, '
    'verifier blob not null, created_ms int not null)',
    # One row per live data key: wrapped (AES-GCM) by the master named in master_id.
    'create table if not exists data_keys (key_id blob primary key, kind text not null, '
    'name text not null, master_id text not null, wrapped blob not null, created_ms int not null, '
    'unique (kind, name))',
    # Ids of destroyed keys (no name, no key material): a clear "shredded" instead of "unknown".
    'create table if not exists shredded (key_id blob primary key, kind text not null, '
    'destroyed_ms int not null)',
]


class KeyringError(StorageError):
    """A master key or key table that cannot be used; encryption never falls back to plaintext."""


class DecryptError(KeyringError):
    """A ciphertext that is refused: bad header, unknown or destroyed key, or tampered bytes."""


class ShreddedError(DecryptError):
    """The data key of this ciphertext was destroyed (crypto-shredded): it can never be read."""


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, repr=False)
class MasterKey:
    """A 256-bit master key and its id (a keyed hash of it: names it without revealing it)."""

    key: bytes

    @property
    def id(self) -> str:
        return hmac.new(self.key, _ID_INFO, hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:
        return f'MasterKey(id={self.id})'

    @classmethod
    def generate(cls) -> 'MasterKey':
        return cls(secrets.token_bytes(32))

    def encoded(self) -> str:
        return base64.b64encode(self.key).decode()


def parse_master_keys(text: str, where: str) -> list[MasterKey]:
    """Master keys from text: base64 of 32 bytes each, one a line or comma separated, '#'
    comments ignored. The key material never appears in an error."""
    keys = []
    for n, item in enumerate(re.split(r'[\n,]', text)):
        item = item.split('#', 1)[0].strip()
        if not item:
            continue
        try:
            raw = base64.b64decode(item, validate=True)
        except ValueError:
            raw = b''
        if len(raw) != 32:
            raise KeyringError(f'{where}: entry {n + 1} is not a 256-bit key (base64 of 32 '
                               'bytes, as `loom storage keygen` writes)')
        keys.append(MasterKey(raw))
    if not keys:
        raise KeyringError(f'{where}: holds no master key')
    if len(keys) > MAX_MASTER_KEYS:
        raise KeyringError(f'{where}: more than {MAX_MASTER_KEYS} master keys')
    return keys


def read_key_file(path: str | os.PathLike) -> list[MasterKey]:
    """The master keys in `path`: a regular file of this user (or root) that neither group nor
    others may read or write (chmod 600), at most 4 KiB."""
    path = Path(os.path.expanduser(str(path)))
    # Only a regular file is opened at all (a FIFO blocked open() forever, a device may act on
    # being opened), and non-blocking, should it be swapped for one meanwhile: what was opened
    # is checked again below. A symbolic link is followed (secret mounts are made of them): its
    # target must pass every check.
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise KeyringError(f'master key file {path}: not a regular file')
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0))
    except OSError as exc:
        raise KeyringError(f'master key file {path}: cannot open: {exc.strerror}') from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyringError(f'master key file {path}: not a regular file')
        if info.st_mode & 0o077:
            raise KeyringError(f'master key file {path}: mode {stat.S_IMODE(info.st_mode):04o} '
                               'lets group or others at it; refusing it (chmod 600)')
        if info.st_uid not in (os.getuid(), 0):
            raise KeyringError(f'master key file {path}: owned by uid {info.st_uid}, not this '
                               'user; refusing it')
        if info.st_size > MAX_KEY_FILE_BYTES:
            raise KeyringError(f'master key file {path}: larger than {MAX_KEY_FILE_BYTES} bytes')
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    try:
        text = data.decode('ascii')
    except UnicodeDecodeError:
        raise KeyringError(f'master key file {path}: not base64 text') from None
    return parse_master_keys(text, f'master key file {path}')


def write_key_file(path: str | os.PathLike, keys: list[MasterKey], replace: bool = False) -> None:
    """Write `keys` (mode 0600, fsynced, renamed into place: never half a key file). Refuses to
    overwrite unless `replace` (a rotation)."""
    path = Path(os.path.expanduser(str(path)))
    if not replace and (path.exists() or path.is_symlink()):
        raise KeyringError(f'{path}: exists; refusing to overwrite a master key')
    tmp = path.with_name(f'.{path.name}.{secrets.token_hex(4)}.tmp')
    body = ''.join(f'{k.encoded()}\n' for k in keys).encode()
    try:
        write_atomic(path, body, tmp, exclusive=True, dir_mode=0o700)
    except OSError as exc:
        raise KeyringError(f'{path}: cannot write the master key: {exc.strerror}') from None


_env_lock = threading.Lock()
_env_taken: str | None = None    # LOOM_STORAGE_MASTER_KEY as taken out of os.environ


def env_master_key(env: Mapping[str, str]) -> str:
    """LOOM_STORAGE_MASTER_KEY in `env` ('' when unset). From the process environment
    (`env` is os.environ) it is taken out at its first read and kept here for this process's
    later keyrings (every agent of a host opens its own), as the heartbeat key is
    (agents/supervisor.take_env_key): plugins loaded afterwards and processes started afterwards
    do not find it in the environment. Bring-up hands it only to the nodes that open storage
    (bringup/nodes.py SECRET_ENV). A value set again later replaces the one kept."""
    global _env_taken
    if env is not os.environ:
        return env.get(MASTER_KEY_ENV, '') or ''
    with _env_lock:
        value = os.environ.pop(MASTER_KEY_ENV, None)
        if value is not None:
            _env_taken = value
        return _env_taken or ''


def env_master_key_given(env: Mapping[str, str] = os.environ) -> bool:
    """Whether LOOM_STORAGE_MASTER_KEY was given to this process (or is set in `env`), also once
    a keyring took it out of os.environ (a check of os.environ alone would say no then)."""
    return bool(env_master_key(env))


@dataclass(frozen=True)
class MasterKeySource:
    """Where the master keys come from: a file (storage.encryption.master_key_file) or the
    LOOM_STORAGE_MASTER_KEY environment variable; never a parameter value."""

    file: str = ''
    env_value: str = ''

    @classmethod
    def of(cls, key_file: str, env: Mapping[str, str]) -> 'MasterKeySource':
        value = env_master_key(env)
        if key_file and value:
            raise KeyringError(f'both storage.encryption.master_key_file and {MASTER_KEY_ENV} '
                               'are set; use one')
        if not key_file and not value:
            raise KeyringError('storage.encryption.enabled is true but there is no master key: '
                               'set storage.encryption.master_key_file to a 0600 file made by '
                               f'`loom storage keygen FILE`, or {MASTER_KEY_ENV}')
        return cls(str(key_file), value)

    def load(self) -> list[MasterKey]:
        if self.file:
            return read_key_file(self.file)
        return parse_master_keys(self.env_value, MASTER_KEY_ENV)

    def describe(self) -> str:
        return f'master key file {self.file}' if self.file else MASTER_KEY_ENV


@dataclass(frozen=True)
class EncryptionSettings:
    """The storage node's `storage.encryption.*` parameters."""

    enabled: bool = False
    master_key_file: str = ''


def encryption_settings(params: Mapping, prefix: str = 'storage.encryption.') -> \
        EncryptionSettings:
    """EncryptionSettings from flat parameters (absent keys: encryption off)."""
    enabled = params.get(prefix + 'enabled', False)
    if not isinstance(enabled, bool):
        raise KeyringError(f'{prefix}enabled must be true or false, got {enabled!r}')
    key_file = params.get(prefix + 'master_key_file', '')
    if not isinstance(key_file, str):
        raise KeyringError(f'{prefix}master_key_file must be a path')
    return EncryptionSettings(enabled, key_file)


def day_of(time_ms: int) -> str:
    """The UTC day ('YYYY-MM-DD') anonymous data of `time_ms` is encrypted under."""
    return datetime.datetime.fromtimestamp(int(time_ms) / 1000, datetime.timezone.utc) \
        .strftime('%Y-%m-%d')


def _check_day(day: str) -> str:
    if not isinstance(day, str) or not _DAY.match(day):
        raise KeyringError(f'day {str(day)[:40]!r}: expected YYYY-MM-DD')
    try:
        datetime.date.fromisoformat(day)
    except ValueError:
        raise KeyringError(f'day {day!r}: not a date') from None
    return day


def _check_subject(subject: str) -> str:
    """The one rule for subject ids (bus/privacy.check_subject), so a key exists for exactly
    the subjects consent, storage and erasure know."""
    try:
        return check_subject(subject)
    except SubjectError as exc:
        raise KeyringError(str(exc)) from None


@dataclass(frozen=True)
class DataKey:
    key_id: bytes
    aead: AESGCM


def _wrap_aad(key_id: bytes, kind: str, name: str, master_id: str) -> bytes:
    return b'loom data key v1\x00' + key_id + b'\x00' + kind.encode() + b'\x00' + \
        name.encode('utf-8') + b'\x00' + master_id.encode()


class Keyring:
    """Data keys of one storage root. Thread-safe; several processes may share the key table."""

    def __init__(self, path: str | os.PathLike, source: MasterKeySource,
                 clock: Callable[[], int] = _wall_ms):
        self.path, self.source, self.clock = Path(path), source, clock
        self.rejected: Counter = Counter()    # refused ciphertexts by reason
        self.created = self.destroyed = 0
        self._lock = threading.Lock()
        self._by_id: dict[bytes, DataKey] = {}
        self._by_name: dict[tuple[str, str], bytes] = {}
        self._masters: dict[str, MasterKey] = {}
        given = source.load()    # a missing or unreadable key stops us before any file is made
        try:
            make_folders(self.path.parent)    # 0700, and so is a root it has to make
        except OSError as exc:
            raise KeyringError(f'{self.path.parent}: cannot create: {exc.strerror}') from None
        self.conn = open_database(self.path, synchronous='FULL')
        try:
            os.chmod(self.path, 0o600)     # wrapped keys: nobody else's business
        except OSError:
            pass                           # not ours to change (another user's table)
        try:
            self.conn.execute('PRAGMA secure_delete=ON')
            self.conn.execute('BEGIN IMMEDIATE')
            try:
                for statement in DDL:
                    self.conn.execute(statement)
                self.conn.execute('COMMIT')
            except BaseException:
                self.conn.execute('ROLLBACK')
                raise
            self._data_version = self._version()
            self._load_masters(given)
        except sqlite3.Error as exc:
            self.conn.close()
            raise KeyringError(f'{self.path}: cannot open the key table: {exc}') from None
        except BaseException:
            self.conn.close()
            raise

    @classmethod
    def open(cls, root: str | os.PathLike, settings: EncryptionSettings,
             env: Mapping[str, str], clock: Callable[[], int] = _wall_ms) -> 'Keyring':
        """The key table at <root>/keys/datakeys.db with the configured master key; a missing
        or wrong master key is a KeyringError here, at start."""
        root = Path(os.path.expanduser(str(root)))
        return cls(root / 'keys' / KEYRING_FILE, MasterKeySource.of(settings.master_key_file, env),
                   clock)

    # -- master keys -----------------------------------------------------------------------------
    def _version(self) -> int:
        return self.conn.execute('PRAGMA data_version').fetchone()[0]

    def _load_masters(self, keys: list[MasterKey] | None = None) -> None:
        """(Re)read the master keys from their source and check them against the key table. The
        table's current master must be among them; a fresh table takes the first one."""
        given = {k.id: k for k in (self.source.load() if keys is None else keys)}
        rows = self.conn.execute('select id, state, verifier from masters').fetchall()
        if not rows:
            if self.conn.execute('select count(*) from data_keys').fetchone()[0]:
                raise KeyringError(f'{self.path}: data keys without a master key record; the key '
                                   'table was tampered with')
            master = next(iter(given.values()))
            nonce = secrets.token_bytes(NONCE_BYTES)
            verifier = nonce + AESGCM(master.key).encrypt(nonce, _VERIFIER, master.id.encode())
            self.conn.execute("insert or ignore into masters values (?, 'current', ?, ?)",
                              (master.id, verifier, self.clock()))
            rows = self.conn.execute('select id, state, verifier from masters').fetchall()
        current = [r[0] for r in rows if r[1] == 'current']
        if len(current) != 1:
            raise KeyringError(f'{self.path}: {len(current)} current master keys recorded; the '
                               'key table was tampered with')
        if current[0] not in given:
            retiring = [r[0] for r in rows if r[1] != 'current']
            raise KeyringError(
                f'{self.source.describe()}: wrong master key for {self.path} (given key id(s) '
                f'{", ".join(sorted(given))}; this key table needs {current[0]}'
                + (f' (with {", ".join(retiring)} while a rotation finishes)' if retiring else '')
                + '). Nothing was decrypted or written.')
        for master_id, _state, verifier in rows:
            master = given.get(master_id)
            if master is None:
                continue
            try:
                AESGCM(master.key).decrypt(verifier[:NONCE_BYTES], verifier[NONCE_BYTES:],
                                           master_id.encode())
            except (InvalidTag, ValueError, TypeError):
                raise KeyringError(f'{self.path}: master key {master_id} fails its check; the '
                                   'key table was tampered with') from None
        self._current = current[0]
        # Keys given but not recorded yet (a rotation's new key before it starts) are kept too.
        self._masters = {**self._masters, **given}

    @property
    def master_id(self) -> str:
        """The id of the master key that wraps new data keys."""
        return self._current

    def _master(self, master_id: str) -> MasterKey:
        master = self._masters.get(master_id)
        if master is None:   # a rotation may have started since: the file may hold the new key
            self._load_masters()
            master = self._masters.get(master_id)
        if master is None:
            raise KeyringError(f'data keys wrapped under master key {master_id}, which '
                               f'{self.source.describe()} does not hold (a key rotation?); '
                               'restart with the current master key')
        return master

    # -- data keys -------------------------------------------------------------------------------
    def _fresh(self) -> None:
        """Drop cached keys when another process changed the key table (a destroy, a rotation):
        PRAGMA data_version changes exactly then."""
        version = self._version()
        if version != self._data_version:
            self._data_version = version
            self._by_id.clear()
            self._by_name.clear()

    def _cache(self, key_id: bytes, kind: str, name: str, raw: bytes) -> DataKey:
        if len(self._by_id) >= MAX_CACHED_KEYS:
            self._by_id.clear()
            self._by_name.clear()
        data_key = DataKey(key_id, AESGCM(raw))
        self._by_id[key_id] = data_key
        self._by_name[(kind, name)] = key_id
        return data_key

    def _unwrap(self, key_id: bytes, kind: str, name: str, master_id: str, wrapped: bytes) -> bytes:
        master = self._master(master_id)
        if not isinstance(wrapped, bytes) or len(wrapped) != NONCE_BYTES + 32 + TAG_BYTES:
            raise KeyringError(f'{self.path}: data key {key_id.hex()} is damaged')
        try:
            return AESGCM(master.key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:],
                                              _wrap_aad(key_id, kind, name, master_id))
        except InvalidTag:
            raise KeyringError(f'{self.path}: data key {key_id.hex()} does not open with master '
                               f'key {master_id}; the key table was tampered with') from None

    def _wrap(self, key_id: bytes, kind: str, name: str, master: MasterKey, raw: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + AESGCM(master.key).encrypt(nonce, raw, _wrap_aad(key_id, kind, name,
                                                                           master.id))

    def _key(self, kind: str, name: str, create: bool) -> DataKey:
        with self._lock:
            self._fresh()
            key_id = self._by_name.get((kind, name))
            if key_id is not None:
                return self._by_id[key_id]
            row = self.conn.execute('select key_id, master_id, wrapped from data_keys where '
                                    'kind = ? and name = ?', (kind, name)).fetchone()
            if row is None and create:
                row = self._create(kind, name)
            if row is None:
                raise KeyringError(f'no data key for {kind} {name[:40]!r}')
            return self._cache(row[0], kind, name, self._unwrap(row[0], kind, name, row[1], row[2]))

    def _create(self, kind: str, name: str):
        """A new random data key wrapped under the table's current master, inserted only while
        that master is still current (a rotation may be changing it)."""
        for _attempt in range(2):
            master = self._master(self._current)
            key_id, raw = secrets.token_bytes(KEY_ID_BYTES), secrets.token_bytes(32)
            wrapped = self._wrap(key_id, kind, name, master, raw)
            try:
                self.conn.execute('BEGIN IMMEDIATE')
                try:
                    self.conn.execute(
                        'insert or ignore into data_keys select ?, ?, ?, ?, ?, ? where exists '
                        "(select 1 from masters where id = ? and state = 'current')",
                        (key_id, kind, name, master.id, wrapped, self.clock(), master.id))
                    row = self.conn.execute('select key_id, master_id, wrapped from data_keys '
                                            'where kind = ? and name = ?', (kind, name)).fetchone()
                    self.conn.execute('COMMIT')
                except BaseException:
                    self.conn.execute('ROLLBACK')
                    raise
            except sqlite3.Error as exc:
                raise KeyringError(f'{self.path}: cannot store a data key: {exc}') from None
            if row is not None:
                if row[0] == key_id:
                    self.created += 1
                return row
            self._load_masters()     # the current master changed under us: a rotation
        raise KeyringError(f'{self.path}: the current master key changed twice while creating a '
                           'data key')

    def subject_key(self, subject: str, create: bool = True) -> DataKey:
        return self._key('subject', _check_subject(subject), create)

    def day_key(self, time_ms: int, create: bool = True) -> DataKey:
        return self._key('day', day_of(time_ms), create)

    def key_for(self, subject: str | None, time_ms: int | None = None) -> DataKey:
        """The subject's key, or for anonymous data the key of the day of `time_ms` (now)."""
        if subject:
            return self.subject_key(subject)
        return self.day_key(self.clock() if time_ms is None else time_ms)

    def by_id(self, key_id: bytes) -> DataKey:
        with self._lock:
            self._fresh()
            found = self._by_id.get(key_id)
            if found is not None:
                return found
            row = self.conn.execute('select kind, name, master_id, wrapped from data_keys '
                                    'where key_id = ?', (key_id,)).fetchone()
            if row is None:
                gone = self.conn.execute('select kind, destroyed_ms from shredded where '
                                         'key_id = ?', (key_id,)).fetchone()
                if gone is not None:
                    self.rejected['shredded'] += 1
                    raise ShreddedError(f'data key {key_id.hex()} ({gone[0]}) was destroyed at '
                                        f'{gone[1]} ms (crypto-shredded): this can never be read')
                self.rejected['unknown_key'] += 1
                raise DecryptError(f'data key {key_id.hex()} is not in {self.path} (a forged '
                                   'header, or data from another key table)')
            kind, name, master_id, wrapped = row
            return self._cache(key_id, kind, name,
                               self._unwrap(key_id, kind, name, master_id, wrapped))

    # -- encrypting ------------------------------------------------------------------------------
    def encrypt(self, plaintext: bytes, context: bytes, subject: str | None = None,
                time_ms: int | None = None) -> bytes:
        """`plaintext` under the subject's (or the day's) key, bound to `context`."""
        if not isinstance(plaintext, (bytes, bytearray, memoryview)) \
                or len(plaintext) > MAX_PLAINTEXT_BYTES:
            raise KeyringError(f'plaintext missing or longer than {MAX_PLAINTEXT_BYTES} bytes')
        context = self._context(context)
        key = self.key_for(subject, time_ms)
        header = MAGIC + bytes((VERSION, KEY_ID_BYTES)) + key.key_id + \
            secrets.token_bytes(NONCE_BYTES)
        return header + key.aead.encrypt(header[-NONCE_BYTES:], plaintext,
                                         header + b'\x00' + context)

    def decrypt(self, blob: bytes, context: bytes) -> bytes:
        """The plaintext of `blob`, or DecryptError (counted in `rejected`) saying why."""
        context = self._context(context)
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            self.rejected['not_bytes'] += 1
            raise DecryptError('ciphertext is not bytes')
        size = len(blob)
        if size > MAX_PLAINTEXT_BYTES + OVERHEAD:
            self.rejected['oversize'] += 1
            raise DecryptError(f'ciphertext of {size} bytes is longer than allowed '
                               f'({MAX_PLAINTEXT_BYTES + OVERHEAD})')
        if size < len(MAGIC) + 2 or bytes(blob[:len(MAGIC)]) != MAGIC:
            self.rejected['bad_magic'] += 1
            raise DecryptError('not a Loom ciphertext (no LKE header): refusing to read it as '
                               'plaintext')
        version, id_len = blob[len(MAGIC)], blob[len(MAGIC) + 1]
        if version != VERSION:
            self.rejected['bad_version'] += 1
            raise DecryptError(f'ciphertext version {version} (this Loom reads {VERSION})')
        if id_len != KEY_ID_BYTES:
            self.rejected['bad_header'] += 1
            raise DecryptError(f'ciphertext header: key id length {id_len} (must be '
                               f'{KEY_ID_BYTES})')
        if size < OVERHEAD:
            self.rejected['truncated'] += 1
            raise DecryptError(f'ciphertext of {size} bytes is shorter than its header and tag')
        view = memoryview(blob)      # no copy of a large object before it is authenticated
        header = bytes(view[:HEADER_BYTES])
        key_id = header[len(MAGIC) + 2:len(MAGIC) + 2 + KEY_ID_BYTES]
        key = self.by_id(key_id)
        try:
            return key.aead.decrypt(header[-NONCE_BYTES:], view[HEADER_BYTES:],
                                    header + b'\x00' + context)
        except InvalidTag:
            self.rejected['tampered'] += 1
            raise DecryptError(f'ciphertext under key {key_id.hex()} fails authentication: '
                               'tampered, truncated, or moved from another place') from None

    def _context(self, context: bytes) -> bytes:
        if isinstance(context, str):
            context = context.encode('utf-8')
        if not isinstance(context, bytes) or len(context) > MAX_CONTEXT_BYTES:
            raise KeyringError(f'context missing or longer than {MAX_CONTEXT_BYTES} bytes')
        return context

    @staticmethod
    def key_id_of(blob: bytes) -> bytes | None:
        """The key id named in a ciphertext's header (no decryption), or None."""
        if len(blob) < HEADER_BYTES or blob[:len(MAGIC)] != MAGIC \
                or blob[len(MAGIC) + 1] != KEY_ID_BYTES:
            return None
        return bytes(blob[len(MAGIC) + 2:len(MAGIC) + 2 + KEY_ID_BYTES])

    # -- crypto-shredding ------------------------------------------------------------------------
    def destroy(self, subject: str) -> dict:
        """Destroy the subject's data key: everything encrypted under it is unreadable from now
        on, wherever a copy lies. Returns a receipt (keys destroyed, whether the WAL was
        checkpointed so the wrapped key is physically gone from the key table)."""
        return self._destroy("kind = 'subject' and name = ?", (_check_subject(subject),))

    def destroy_day(self, day: str) -> dict:
        """Destroy the data key of anonymous data of one UTC day ('YYYY-MM-DD')."""
        return self._destroy("kind = 'day' and name = ?", (_check_day(day),))

    def destroy_days_before(self, time_ms: int) -> dict:
        """Destroy the day keys of every UTC day that ended before `time_ms` (retention)."""
        return self._destroy("kind = 'day' and name < ?", (day_of(time_ms),))

    def _destroy(self, where: str, args: tuple) -> dict:
        with self._lock:
            try:
                self.conn.execute('BEGIN IMMEDIATE')
                try:
                    rows = self.conn.execute(f'select key_id, kind from data_keys where {where}',
                                             args).fetchall()
                    now = self.clock()
                    self.conn.executemany('insert or ignore into shredded values (?, ?, ?)',
                                          [(r[0], r[1], now) for r in rows])
                    self.conn.execute(f'delete from data_keys where {where}', args)
                    self.conn.execute('COMMIT')
                except BaseException:
                    self.conn.execute('ROLLBACK')
                    raise
                checkpointed = self._checkpoint()
            except sqlite3.Error as exc:
                raise KeyringError(f'{self.path}: cannot destroy data keys: {exc}') from None
            for key_id, _kind in rows:
                self._by_id.pop(key_id, None)
            self._by_name = {n: k for n, k in self._by_name.items() if k in self._by_id}
            self.destroyed += len(rows)
            return {'keys': len(rows), 'key_ids': [r[0].hex() for r in rows],
                    'checkpointed': checkpointed}

    def _checkpoint(self) -> bool:
        """Copy the WAL into the file and truncate it, so deleted (secure_delete: zeroed) key
        rows leave no old page image behind. False when a reader kept it from completing."""
        busy = self.conn.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()[0]
        return busy == 0

    # -- rotation --------------------------------------------------------------------------------
    def rotate(self, new: MasterKey | None = None, batch: int = 500,
               max_batches: int = 0) -> dict:
        """Rewrap every data key under `new` and retire the old master(s), without downtime:
        `new` becomes current first (new data keys are wrapped under it from then on), then the
        rows are rewrapped a batch per transaction while the old master still opens those not
        done yet; a rotation cut short is resumed by calling again with the same key (or none:
        the current one). `max_batches` (0: all) stops early, resumable: 'done' says which."""
        rewrapped = 0
        try:
            with self._lock:
                if new is None:
                    new = self._master(self._current)
                self._masters[new.id] = new
                if new.id != self._current:
                    nonce = secrets.token_bytes(NONCE_BYTES)
                    verifier = nonce + AESGCM(new.key).encrypt(nonce, _VERIFIER, new.id.encode())
                    self._transaction([
                        ("update masters set state = 'retiring' where state = 'current'", ()),
                        ("insert or replace into masters values (?, 'current', ?, ?)",
                         (new.id, verifier, self.clock()))])
                    self._current = new.id
            retired, batches = None, 0
            while not max_batches or batches < max_batches:
                batches += 1
                with self._lock:   # one batch per transaction; other threads run in between
                    rows = self.conn.execute(
                        'select key_id, kind, name, master_id, wrapped from data_keys where '
                        'master_id != ? limit ?', (new.id, max(1, int(batch)))).fetchall()
                    if not rows:
                        retired = self._retire(new.id)
                        if retired is not None:
                            break
                        continue
                    updates = [(new.id, self._wrap(r[0], r[1], r[2], new, self._unwrap(*r)),
                                r[0], r[3]) for r in rows]
                    self._transaction([('update data_keys set master_id = ?, wrapped = ? where '
                                        'key_id = ? and master_id = ?', u) for u in updates])
                    rewrapped += len(rows)
            with self._lock:
                checkpointed = self._checkpoint()
        except sqlite3.Error as exc:
            raise KeyringError(f'{self.path}: key rotation stopped (run it again to resume): '
                               f'{exc}') from None
        return {'master_id': new.id, 'rewrapped': rewrapped, 'retired': retired or [],
                'done': retired is not None, 'checkpointed': checkpointed}

    def _retire(self, master_id: str) -> list[str] | None:
        """Delete every master but `master_id` if no data key is wrapped under another (one
        transaction); None when a key was wrapped under a retiring master meanwhile."""
        self.conn.execute('BEGIN IMMEDIATE')
        try:
            left = self.conn.execute('select count(*) from data_keys where master_id != ?',
                                     (master_id,)).fetchone()[0]
            retired = None
            if not left:
                retired = [r[0] for r in self.conn.execute(
                    'select id from masters where id != ? order by id', (master_id,))]
                self.conn.execute('delete from masters where id != ?', (master_id,))
            self.conn.execute('COMMIT')
        except BaseException:
            self.conn.execute('ROLLBACK')
            raise
        return retired

    def _transaction(self, statements: list[tuple[str, tuple]]) -> None:
        self.conn.execute('BEGIN IMMEDIATE')
        try:
            for sql, args in statements:
                self.conn.execute(sql, args)
            self.conn.execute('COMMIT')
        except BaseException:
            self.conn.execute('ROLLBACK')
            raise

    def rotating(self) -> list[str]:
        """Ids of retiring master keys (a rotation under way or cut short)."""
        with self._lock:
            return [r[0] for r in self.conn.execute(
                "select id from masters where state = 'retiring' order by id")]

    # -- state -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            kinds = dict(self.conn.execute('select kind, count(*) from data_keys group by kind')
                         .fetchall())
            shredded = self.conn.execute('select count(*) from shredded').fetchone()[0]
        return {'master_id': self._current, 'subject_keys': kinds.get('subject', 0),
                'day_keys': kinds.get('day', 0), 'shredded': shredded,
                'rejected': dict(self.rejected), 'rejected_total': sum(self.rejected.values())}

    def close(self) -> None:
        with self._lock:
            self._by_id.clear()
            self._by_name.clear()
            self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
