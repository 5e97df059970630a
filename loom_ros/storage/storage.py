"""Storage: one process's handle on the layer. Opens the unit's database once (the one place the
pragmas are set), runs its group-commit writer, gives read connections that see only committed
data, and hands out the stores. Everything is passed in (root, unit, clock, embedder); nothing
is global."""
from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from loom_ros.config.params import config_dir
from loom_ros.security.keyring import EncryptionSettings, Keyring
from loom_ros.storage import schema
from loom_ros.storage.backend import ObjectSettings
from loom_ros.storage.consent import (ConsentCache, ConsentError, ConsentRegistry, consent_path,
                                      load_defaults)
from loom_ros.storage.errors import StorageError, is_full, StorageFullError
from loom_ros.storage.layout import StorageLayout, check_name
from loom_ros.storage.rowcipher import RowCipher, check_marker
from loom_ros.storage.spans import SpanKeeper
from loom_ros.storage.sqlite import (Checkpointer, open_database, private_folder,
                                     private_path)
from loom_ros.storage.writer import GroupCommitWriter, Ticket


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class StorageConfig:
    """What a process needs to open its storage (the node's `storage.*` parameters)."""

    root: str = '~/.loom'
    unit: str = 'loom'                 # this process's database: <root>/db/<unit>.db
    synchronous: str = 'NORMAL'
    max_delay_ms: float = 2.0          # group commit: longest wait for a batch to fill
    max_batch: int = 20000
    max_db_bytes: int = 0              # hard cap of the database file (0: none)
    hot_max_events: int = 64           # per agent, kept in memory for recent()
    encryption: EncryptionSettings = field(default_factory=EncryptionSettings)
    # defaults of the consent registry Storage opens when none is passed ('' = the shipped
    # config/consent.yaml)
    consent_defaults_file: str = ''
    # the object store of blobs (Storage.blobs) and archives: the same for every process under
    # a root (storage.objects.*; ObjectSettings.from_params), the local folder by default
    objects: ObjectSettings = field(default_factory=ObjectSettings)
    extra: dict = field(default_factory=dict)


class Storage:
    """The unit database of this process, its writer and its stores."""

    def __init__(self, config: StorageConfig, clock: Callable[[], int] = wall_ms,
                 gate: Callable[[], None] | None = None, env: Mapping[str, str] | None = None,
                 consent=None):
        """`consent`: the consent registry (anything with `lookup(subject, purpose)`, and
        `version()` to cache answers) that says which data subjects' events may be kept
        (`store`); None: the registry of this root, read-only, with the configured defaults."""
        self.config, self.clock = config, clock
        self.layout = StorageLayout.at(config.root)
        self.unit = check_name(config.unit, 'storage.unit')
        self.path = self.layout.database(self.unit)
        # 0700, or an existing root open to group or others tightened (this user's) or refused
        # (another user's): sqlite.private_folder; the databases are 0600 (open_database)
        try:
            private_folder(self.layout.root, 'the storage root')
        except StorageError as exc:
            raise StorageError(f'storage.root {exc}') from None
        self._own_consent = None
        if consent is None:
            try:
                consent = self._own_consent = ConsentRegistry(
                    consent_path(self.layout.root), load_defaults(
                        config.consent_defaults_file or config_dir() / 'consent.yaml'),
                    read_only=True)
            except ConsentError as exc:
                raise StorageError(f'storage consent defaults: {exc}') from None
        # Storage keeps an event of a data subject only with their `store` consent; without it
        # the event is counted (stores.EpisodeStore, table `withheld`), never kept.
        self.consent = ConsentCache(consent, 'store')
        self.withheld = 0              # events counted instead of kept, since this open
        self._lock_fd = self._claim()
        self.keyring = None
        try:
            # Encryption at rest (docs/encryption.md): a missing or wrong master key stops us
            # here, before anything is written.
            if config.encryption.enabled:
                self.keyring = Keyring.open(self.layout.root, config.encryption,
                                            os.environ if env is None else env, clock)
            self.objects = config.objects.open(self.layout.objects, keyring=self.keyring)
            self.conn = open_database(self.path, synchronous=config.synchronous,
                                      max_bytes=config.max_db_bytes)
        except BaseException:
            os.close(self._lock_fd)
            if self.keyring is not None:
                self.keyring.close()
            self._close_consent()
            raise
        self.reader = self.checkpointer = None
        self._read_lock = threading.Lock()
        try:
            schema.ensure(self.conn, self.path)
            # rows encrypted before and no key now: refused here, never plaintext beside them
            check_marker(self.conn, self.path, self.keyring is not None)
        except (sqlite3.Error, StorageError) as exc:
            self._release()
            if isinstance(exc, StorageError):
                raise
            if is_full(exc):
                raise StorageFullError(f'{self.path}: disk or budget full: {exc}') from None
            raise StorageError(f'{self.path}: cannot create the tables: {exc}') from None
        # Episode payloads (and, in the lifecycle, cold summaries) under the subject's key.
        self.cipher = RowCipher(self.keyring)
        self._ids_lock = threading.Lock()
        self._ids: dict[str, int] = {}
        try:
            self.reader = open_database(self.path, read_only=True, check=False)
            # checkpoints on their own thread; the writer's automatic one only as a backstop
            # (smaller under a byte cap, and the WAL file cut back to it after each reset)
            Checkpointer.backstop(self.conn, config.max_db_bytes)
            self.checkpointer = Checkpointer(self.path, name=f'storage {self.unit}')
            # every episode's agent span, in the episode's own transaction (spans.py)
            self.spans = SpanKeeper(schema.EPISODE_INSERTS)
            self.writer = GroupCommitWriter(self.conn, f'storage {self.unit}',
                                            max_delay_s=config.max_delay_ms / 1000.0,
                                            max_batch=config.max_batch, gate=gate,
                                            keepers=(self.spans,))
            if hasattr(gate, 'watch'):   # a BudgetGate counts this unit's growth between walks
                gate.watch(self.path, f'{self.path}-wal')
        except BaseException:   # nothing left open behind a failed start (the lock fd least)
            self._release()
            raise
        self._stores: dict = {}

    def _claim(self) -> int:
        """One writing process per unit (ids are handed out here): an flock on <unit>.db.lock,
        released by the kernel when the process dies, even by SIGKILL."""
        lock = self.path.with_name(self.path.name + '.lock')
        private_folder(lock.parent, 'the storage databases')
        private_path(lock, 'the lock of this database', strict=False)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f'{lock}: cannot create: {exc.strerror}') from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StorageError(f'{self.path}: another process writes storage unit {self.unit!r}; '
                               'give each process its own storage.unit') from None
        return fd

    # -- reading ---------------------------------------------------------------------------------
    def query(self, sql: str, params=()) -> list[sqlite3.Row]:
        """Rows committed so far (the reader never sees a batch in flight)."""
        with self._read_lock:
            self.reader.row_factory = sqlite3.Row
            try:
                return self.reader.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise StorageError(f'{self.path}: cannot read: {exc}') from None

    def count_withheld(self, n: int = 1) -> None:
        with self._ids_lock:
            self.withheld += n

    def write(self, sql: str, params=()) -> Ticket:
        """One statement through the group-commit writer (the stores' common write)."""
        return self.writer.execute(sql, params)

    def next_id(self, table: str) -> int:
        """A fresh integer id for `table` (this process is the only writer of its unit)."""
        with self._ids_lock:
            if table not in self._ids:
                row = self.query(f'select coalesce(max(id), 0) from {table}')[0]
                self._ids[table] = int(row[0])
            self._ids[table] += 1
            return self._ids[table]

    # -- stores ----------------------------------------------------------------------------------
    def _store(self, key, factory):
        """The open store `key`, made on first use by `factory`: a callable, or the name of a
        class of stores.py taking this storage (per-event callers: no closure made per call)."""
        store = self._stores.get(key)
        if store is None:
            make = getattr(_stores(), factory) if isinstance(factory, str) else None
            store = self._stores[key] = make(self) if make is not None else factory()
        return store

    # The stores' modules import faiss, which a process that never opens a store need not
    # load: each is imported inside its factory, on first use only (an open store is returned
    # without running an import statement; these are called per event).
    @property
    def kv(self):
        return self._store('kv', 'KVStore')

    @property
    def agent_state(self):
        return self._store('agent_state', 'AgentStateStore')

    @property
    def episodes(self):
        return self._store('episodes', 'EpisodeStore')

    def facts(self, agent_id: str, embedder):
        return self._store(('facts', agent_id),
                           lambda: _stores().FactStore(self, agent_id, embedder))

    def router_history(self, budget_period_s: float):
        return self._store('router', lambda: _stores().RouterHistoryStore(self, budget_period_s))

    @property
    def blobs(self):
        """Large files in the configured object store, indexed here (blobs.py)."""
        def open_blobs():
            from loom_ros.storage.blobs import BlobStore
            return BlobStore(self)
        return self._store('blobs', open_blobs)

    @property
    def audit(self):
        return self._store('audit', 'AuditStore')

    def flush(self, timeout: float = 30.0) -> None:
        self.writer.flush(timeout)

    def close(self) -> None:
        self.writer.close()
        self._release()

    def _release(self) -> None:
        """Close what this Storage holds besides its writer, or what a failed start had opened
        so far: checkpointer, reader, connection, the unit's lock, keyring, consent."""
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.reader is not None:
            with self._read_lock:
                self.reader.close()
        self.conn.close()
        os.close(self._lock_fd)
        if self.keyring is not None:
            self.keyring.close()
        self._close_consent()

    def _close_consent(self) -> None:
        if self._own_consent is not None:
            self._own_consent.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _stores():
    """loom_ros.storage.stores, imported on first use (it imports faiss)."""
    from loom_ros.storage import stores
    return stores
