"""Every unit database under one root, seen together: lifecycle rounds, stats, budget checks and
queries across them. Used by the storage node and by `loom storage`; no rclpy here."""
from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field

from loom_ros.security import keyring as keyring_mod
from loom_ros.storage.backend import ObjectSettings
from loom_ros.storage.budget import Budgets, budget_check, root_used_bytes
from loom_ros.storage.cold import IndexParams
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.rowcipher import episode_context
from loom_ros.storage.sqlite import private_folder
from loom_ros.storage.lifecycle import (Lifecycle, LifecycleParams, MoveReport, TierPolicy,
                                        enforce_budgets, load_policies)
from loom_ros.storage.stores import episodes_sql
from loom_ros.telemetry.diagnostics import OK, CheckResult

QUERY_COLUMNS = ('agent_id', 'event_id', 'time_ms', 'type', 'source', 'tags', 'payload', 'subject')
# SQLite virtual-machine steps one unit's episode query may take (about 10 million rows scanned,
# 1-2 s here): warm episodes are indexed by time and agent only, so a query by type or source
# over a long range scans, and the storage node holds its lock meanwhile (its moves wait).
MAX_QUERY_STEPS = 50_000_000
_STEPS_PER_CALL = 10_000

PREFIX = 'storage.'


def default_params(path: str | None = None) -> dict:
    """The storage node's `storage.*` parameters as shipped (config/loom.yaml: `storage.root`
    from the /** section, the rest from /**/storage), flat and dotted."""
    from loom_ros.config.params import DEFAULTS_FILE, config_dir, node_defaults
    values = node_defaults('storage', path or str(config_dir() / DEFAULTS_FILE))
    return {k: v for k, v in values.items() if k.startswith(PREFIX)}


def object_backend(settings: 'Settings', keyring=None):
    """The configured object store (storage.objects: S3, else the local folder under the
    root), encrypting through `keyring` when given; without it the backend as stored (what
    erasure and export walk)."""
    return settings.objects.open(settings.layout.objects, keyring=keyring)


@dataclass
class Settings:
    layout: StorageLayout
    lifecycle: LifecycleParams = field(default_factory=LifecycleParams)
    budgets: Budgets = field(default_factory=Budgets)
    index: IndexParams = field(default_factory=IndexParams)
    objects: ObjectSettings = field(default_factory=ObjectSettings)
    embedder: str = 'minilm'
    max_moves: int = 20
    encryption: keyring_mod.EncryptionSettings = field(
        default_factory=keyring_mod.EncryptionSettings)


def settings_from_params(params: dict, env: dict) -> Settings:
    """Settings from the node's flat `storage.*` parameters; S3 keys from the environment."""
    p = {k[len(PREFIX):]: v for k, v in params.items() if k.startswith(PREFIX)}

    def num(key, minimum=0.0):
        value = p[key]
        # NaN compares false with everything (so passed `< minimum`) and infinity overflows
        # int(): both refused here, by name
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value < minimum):
            raise StorageError(f'storage.{key}: must be a finite number >= {minimum}, '
                               f'got {value!r}'[:200])
        return value

    for key in ('move_period_s', 'stats_period_s'):   # the node's periods, read by the node
        if key in p:
            num(key, 0.001)

    default = TierPolicy(warm_s=float(num('lifecycle.warm_s')), cold_s=float(num('lifecycle.cold_s')),
                         archive_s=float(num('lifecycle.archive_s')))
    lifecycle = LifecycleParams(
        hot_s=float(num('lifecycle.hot_s')), default=default,
        rules=load_policies(str(p['lifecycle.policies_file']), default),
        bucket_s=float(num('lifecycle.bucket_s', 0.001)),
        move_batch=int(num('lifecycle.move_batch', 1)),
        clock_tolerance_s=float(num('lifecycle.clock_tolerance_s', 1.0)),
        clock_settle_s=float(num('lifecycle.clock_settle_s', 1.0)))
    budgets = Budgets(**{f'{t}_bytes': int(num(f'budget.{t}_bytes'))
                         for t in ('total', 'warm', 'cold', 'archive')})
    index = IndexParams(train_at=int(num('index.train_at', 1)), nlist=int(num('index.nlist')),
                        pq_m=int(num('index.pq_m', 1)), nprobe=int(num('index.nprobe', 1)),
                        rerank=int(num('index.rerank', 1)))
    if 384 % index.pq_m:
        raise StorageError(f'storage.index.pq_m {index.pq_m}: must divide 384')
    embedder = str(p['embedder'])
    if embedder not in ('minilm', 'hash'):
        raise StorageError(f'storage.embedder {embedder!r}: minilm or hash')
    objects = ObjectSettings.from_params(params, env)
    return Settings(StorageLayout.at(p['root']), lifecycle, budgets, index, objects, embedder,
                    int(num('max_moves_per_round', 1)), keyring_mod.encryption_settings(params))


class LazyEmbedder:
    """MiniLM loaded at its first use. The storage node is in every bring-up and the model
    costs about 1.5 s of CPU and 100 MB at start, for a cold tier that receives events a day
    later; its files are checked at once, so a missing model is still a clear error at start."""

    def __init__(self):
        from loom_ros.agents.embedding import default_model_files
        default_model_files()
        self._model = None
        self._lock = threading.Lock()

    def embed(self, texts):
        with self._lock:
            if self._model is None:
                from loom_ros.agents.embedding import MiniLMEmbedder
                self._model = MiniLMEmbedder()
        return self._model.embed(texts)


def make_embedder(name: str):
    if name == 'hash':
        from loom_ros.storage.embedding import HashEmbedder
        return HashEmbedder()
    return LazyEmbedder()


class StorageService:
    def __init__(self, settings: Settings, embedder=None, clock=None, read_only: bool = False,
                 rebuild: bool = False, env=None, consent=None):
        """`consent`: the consent registry every unit's moves ask for `store` consent (None:
        each opens the root's, read-only, as Storage does). A reader (`read_only`) stops at the
        first unit it cannot open; a mover opens the others, reports that one in `error` and
        `failed` and tries it again at each round (once its files changed); a mover that can
        open none of them stops with the first one's error."""
        self.settings, self.clock, self.read_only = settings, clock, read_only
        self.max_query_steps = MAX_QUERY_STEPS
        self.rebuild = rebuild   # every cold index made anew from its rows on open
        self.consent = consent
        self.failed: dict[str, str] = {}      # unit -> why it cannot be opened
        self._failed_at: dict[str, tuple] = {}   # unit -> its files' sizes and times then
        # 0700; an existing root open to group or others tightened when this user's, refused
        # when another's (a reader leaves it as it is): sqlite.private_folder
        try:
            private_folder(settings.layout.root, 'the storage root', strict=not read_only)
        except StorageError as exc:
            raise StorageError(f'storage.root {exc}') from None
        # Encryption at rest (docs/encryption.md): a missing or wrong master key stops us here.
        self.keyring = keyring_mod.Keyring.open(
            settings.layout.root, settings.encryption, os.environ if env is None else env,
            **({'clock': clock} if clock else {})) if settings.encryption.enabled else None
        self.embedder = embedder or make_embedder(settings.embedder)
        self.objects = object_backend(settings, keyring=self.keyring)
        self.lifecycles: dict[str, Lifecycle] = {}
        self.totals = MoveReport()
        self.rounds, self.error = 0, ''
        try:
            self.refresh(strict=read_only)
            if self.failed and not self.lifecycles:   # not one unit: a root-wide cause (the
                unit = min(self.failed)               # object store, keys) or a lone bad file
                raise StorageError(self.failed[unit])
        except BaseException:   # what was opened is let go (locks, files, keyring)
            self.close()
            raise
        self.error = '; '.join(self._failures())[:2000]

    def units(self) -> list[str]:
        return sorted(self.lifecycles)

    def refresh(self, strict: bool = False) -> None:
        """Open the databases that appeared since (a process that started writing). One that
        cannot be opened (damaged, unreadable, another process moves it, a bad cold index) is
        recorded in `failed` with the reason naming its file, and the others open; `strict`
        raises that StorageError instead. A failed unit is tried again once one of its files
        changed (opening reads the whole database)."""
        for path in self.settings.layout.databases():
            unit = path.stem
            if unit in self.lifecycles:
                continue
            stamp = self._stamp(unit)
            if not strict and unit in self.failed and self._failed_at.get(unit) == stamp:
                continue
            try:
                self.lifecycles[unit] = self.open(unit, self.rebuild)
            except (StorageError, sqlite3.Error, OSError) as exc:
                if strict:
                    raise
                message = str(exc)
                if str(path) not in message:
                    message = f'{path}: {message}'
                self.failed[unit] = message[:500]
                # a unit another process holds opens cheaply: tried at every round
                self._failed_at[unit] = None if 'runs its lifecycle' in message else stamp
            else:
                self.failed.pop(unit, None)
                self._failed_at.pop(unit, None)
        for unit in list(self.failed):   # a file that went away is no failure any more
            if not self.settings.layout.database(unit).exists():
                self.failed.pop(unit, None)
                self._failed_at.pop(unit, None)

    def _stamp(self, unit: str) -> tuple:
        """Sizes and modification times of a unit's database, its WAL and its cold index."""
        db = self.settings.layout.database(unit)
        out = []
        for path in (db, db.with_name(db.name + '-wal'), self.settings.layout.cold_index(unit)):
            try:
                info = os.stat(path)
                out.append((info.st_size, info.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def _failures(self) -> list[str]:
        return [f'{unit}: cannot open: {why}' for unit, why in sorted(self.failed.items())]

    def open(self, unit: str, rebuild: bool = False) -> Lifecycle:
        return Lifecycle(self.settings.layout, unit, self.objects, self.embedder,
                         self.settings.lifecycle, self.settings.budgets, self.settings.index,
                         clock=self.clock, read_only=self.read_only, rebuild=rebuild,
                         consent=self.consent)

    # -- moves ----------------------------------------------------------------------------------
    def run_round(self, lock=None, stop: threading.Event | None = None) -> MoveReport:
        """One round over every database: each move its own transaction, the lock held per move
        only (queries run in between)."""
        lock = lock or threading.Lock()
        report = MoveReport()
        started = time.perf_counter()
        errors = []
        with lock:   # a unit that cannot be opened is reported, and the others move
            self.refresh()
        errors += self._failures()
        for unit, lc in list(self.lifecycles.items()):
            try:
                for step in (lc.move_warm, lc.move_cold, lc.expire_archive):
                    for _ in range(self.settings.max_moves):
                        if stop is not None and stop.is_set():
                            return report
                        with lock:
                            done = step()
                        report.add(done)
                        if not any((done.condensed, done.archived, done.deleted,
                                    done.archive_deleted, done.consent_deleted)):
                            break
            except (StorageError, sqlite3.Error) as exc:   # a page damaged since it opened
                errors.append(f'{unit}: {lc.path}: {exc}' if str(lc.path) not in str(exc)
                              else f'{unit}: {exc}')
            except Exception as exc:   # noqa: BLE001 - one unit's fault never stops the others
                errors.append(f'{unit}: {lc.path}: {type(exc).__name__}: {str(exc)[:200]}')
        try:   # the budgets are the root's: its units' data together, the oldest first
            with lock:
                report.add(enforce_budgets(list(self.lifecycles.values()),
                                           self.settings.budgets, self.settings.layout))
        except (StorageError, sqlite3.Error) as exc:
            errors.append(f'budgets: {exc}')
        for unit, lc in list(self.lifecycles.items()):
            try:
                with lock:
                    lc.index.maybe_train(lc.conn)
                    lc.save_index()
            except (StorageError, sqlite3.Error) as exc:
                errors.append(f'{unit}: {exc}')
        report.seconds = time.perf_counter() - started
        self.totals.add(report)
        self.rounds += 1
        self.error = '; '.join(errors)[:2000]
        return report

    # -- stats and checks -------------------------------------------------------------------------
    def stats(self) -> dict:
        tiers: dict[str, dict] = {}
        archive_bytes = 0
        for lc in self.lifecycles.values():
            for name, u in lc.usage().items():
                if name == 'total':
                    continue
                tier = tiers.setdefault(name, {'rows': 0, 'bytes': 0, 'oldest_ms': 0})
                tier['rows'] += u['rows']
                tier['bytes'] += u['bytes']
                if u['oldest_ms'] and (not tier['oldest_ms'] or u['oldest_ms'] < tier['oldest_ms']):
                    tier['oldest_ms'] = u['oldest_ms']
                if name == 'archive':
                    archive_bytes += u['bytes']
        for name in ('warm', 'cold', 'archive'):
            tiers.setdefault(name, {'rows': 0, 'bytes': 0, 'oldest_ms': 0})['budget_bytes'] = \
                self.settings.budgets.of(name)
        out = {'root': str(self.settings.layout.root), 'units': self.units(), 'tiers': tiers,
               'total_bytes': root_used_bytes(self.settings.layout, archive_bytes),
               'total_budget_bytes': self.settings.budgets.total_bytes,
               'rounds': self.rounds, 'error': self.error,
               'failed_units': sorted(self.failed)}
        out.update({k: getattr(self.totals, k) for k in ('condensed', 'memories', 'archived',
                                                         'deleted', 'archive_deleted',
                                                         'budget_deleted', 'consent_deleted',
                                                         'clock_untrusted',
                                                         'budget_unreachable')})
        return out

    def checks(self) -> list[CheckResult]:
        s, b = self.stats(), self.settings.budgets
        out = [budget_check(f'storage {t}', s['tiers'][t]['bytes'], b.of(t), b.warn_fraction,
                            b.error_fraction) for t in ('warm', 'cold', 'archive')]
        out.append(budget_check('storage total', s['total_bytes'], b.total_bytes,
                                b.warn_fraction, b.error_fraction))
        return out

    def worst_check(self) -> CheckResult:
        checks = self.checks()
        worst = max(checks, key=lambda c: c.level)
        if worst.level == OK:
            return CheckResult(OK, '; '.join(c.message for c in checks), worst.values)
        return worst

    # -- queries --------------------------------------------------------------------------------
    def query(self, kind: str, unit: str = '', agent_id: str = '', type: str = '',
              source: str = '', text: str = '', start_ms: int = 0, end_ms: int = 2**63 - 1,
              limit: int = 100) -> list[dict]:
        if kind not in ('episodes', 'memories'):
            raise StorageError(f'kind {kind[:40]!r}: episodes or memories')
        # SQLite integers are 64-bit: a time past them is the end of time, not an OverflowError
        start_ms, end_ms = (max(-2**63, min(2**63 - 1, int(t))) for t in (start_ms, end_ms))
        units = [unit] if unit else self.units()
        missing = [u for u in units if u not in self.lifecycles]
        if missing:
            raise StorageError(f'no storage database {missing[0][:80]!r} under '
                               f'{self.settings.layout.root} (have: {", ".join(self.units())})')
        out = []
        for name in units:
            lc = self.lifecycles[name]
            if kind == 'episodes':
                sql, args = episodes_sql(agent_id, start_ms, end_ms, type, source,
                                         limit=limit, columns=QUERY_COLUMNS)
                rows = self._bounded(lc.conn, sql, args, name)
                for r in rows:   # payloads decrypted (encryption at rest); erased ones skipped
                    payload = lc.cipher.open_or_none(r[6], episode_context(r[0], r[1], r[2], r[7]))
                    if payload is not None:
                        out.append({'unit': name, 'agent_id': r[0], 'event_id': r[1],
                                    'time_ms': r[2], 'type': r[3], 'source': r[4],
                                    'tags': json.loads(r[5]), 'payload': payload})
            else:
                if not text:
                    raise StorageError('memories: give a query text to search by meaning')
                out += [{'unit': name, **m} for m in lc.search(
                    text, k=limit, start_ms=start_ms, end_ms=end_ms, agent_id=agent_id, type=type)]
        if kind == 'episodes':
            return sorted(out, key=lambda r: r['time_ms'])[:limit]
        return sorted(out, key=lambda r: -r['score'])[:limit]

    def _bounded(self, conn: sqlite3.Connection, sql: str, args, unit: str) -> list:
        """The rows, or a StorageError once the query took `max_query_steps` steps (a scan too
        long to hold the node's lock for; what to narrow is said)."""
        calls = [0]

        def spent() -> int:
            calls[0] += 1
            return calls[0] * _STEPS_PER_CALL > self.max_query_steps

        conn.set_progress_handler(spent, _STEPS_PER_CALL)
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if calls[0] * _STEPS_PER_CALL <= self.max_query_steps:
                raise StorageError(f'{unit}: cannot read: {exc}') from None
            raise StorageError(f'{unit}: the query scanned more than {self.max_query_steps:,} '
                               'steps and was stopped: give a shorter time range or an agent id '
                               '(episodes are indexed by time and agent, not by type or source)'
                               ) from None
        finally:
            conn.set_progress_handler(None, 0)

    def close(self) -> None:
        for lc in self.lifecycles.values():
            lc.close()
        self.lifecycles.clear()
        if self.keyring is not None:
            self.keyring.close()
