"""Group commit: one writer thread per database batches the writes of every caller in the process
(agents' state and episodes, router history, audit) into shared transactions, at most
`max_delay_s` after the first write of a batch waited. A write counts as stored only once its
Ticket says so (`wait()` returns): the transaction holding it committed, so a SIGKILL after that
cannot lose it; one before it loses the whole batch, never part of one write.

Writes are (sql, params) operations; one submit is atomic (all its operations or none). In a
batch, operations with the same SQL run together in submission order: an `insert ... values
(...)` with positional parameters as multi-row statements (MultiRow), any other as one
executemany. Python's sqlite3 lets go of the GIL for every row it steps; while another thread
of the process runs Python, the writer waits for the GIL again after each row (up to the switch
interval), and an executemany of 200,000 rows beside a busy thread ran at 1,211 rows/s against
150,330 alone; a statement of up to 1,024 rows steps once. A submit marked
`barrier=True` (a delete, anything whose effect depends on order across statements) runs after
everything submitted before it. If a batch fails for one bad write (its own constraint, SQL
text or values), the batch is re-run with a savepoint per submit, so only that submit fails. A
full disk (or budget) fails the batch with StorageFullError and commits nothing of it (and, with
stop_when_full, every later batch too, until resume()). Any other failure of a batch (I/O,
locking, corruption, a gate or keeper that raised) fails the whole batch and stops the writer:
every later ticket fails with a StorageError naming that first failure, until the storage is
reopened, since a write queued behind a lost one may depend on it (an agent's next state counts
the events whose episodes were lost). Keepers (spans.SpanKeeper) add rows derived from a batch's
rows to its own transaction and learn what committed only after COMMIT.
"""
from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from itertools import chain

from loom_ros.storage.errors import StorageError, StorageFullError, is_full

Op = tuple[str, Sequence]

# What one write's own statement or values raise (a constraint, a bad SQL text, a value SQLite
# cannot bind): that write fails alone. Anything else is a failure of the transaction.
_BAD_WRITE = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError,
              sqlite3.InterfaceError, TypeError, ValueError, OverflowError)
# OperationalError texts of the transaction, not of a statement (Python < 3.11: no error code)
_NOT_A_BAD_WRITE = ('locked', 'disk i/o', 'readonly', 'interrupted', 'unable to open',
                    'malformed', 'not a database', 'out of memory')


def bad_write(exc: BaseException) -> bool:
    """Whether `exc` is what one write did (it fails alone), not a failure of its batch."""
    if is_full(exc):
        return False
    if isinstance(exc, _BAD_WRITE):
        return True
    if isinstance(exc, sqlite3.OperationalError):   # SQLITE_ERROR: no such table, syntax, ...
        code = getattr(exc, 'sqlite_errorcode', None)
        if code is not None:
            return code & 0xff == sqlite3.SQLITE_ERROR
        return not any(text in str(exc).lower() for text in _NOT_A_BAD_WRITE)
    return False


class _Barrier(tuple):
    """The ops of a submit marked barrier=True, as queued (other submits are queued as their
    plain ops: no wrapper made per write)."""
    __slots__ = ()


class _Batch:
    __slots__ = ('done', 'settled', 'error', 'errors', 'committed_at', 'callbacks', 'lock')

    def __init__(self):
        self.done = threading.Event()
        self.settled = threading.Event()   # done, and its callbacks (acknowledgements) have run
        self.error: BaseException | None = None
        self.errors: dict[int, BaseException] = {}
        self.committed_at = 0.0
        self.callbacks: list = []
        self.lock = threading.Lock()

    def finish(self) -> None:
        """Mark done, then run the callbacks on the writer thread, in the order they were
        added: those added before, and those added while these run (a caller adding one
        between `done` and `settled` must not overtake the callbacks still queued)."""
        with self.lock:
            self.done.set()
        try:
            while True:
                with self.lock:
                    callbacks, self.callbacks = self.callbacks, []
                    if not callbacks:
                        self.settled.set()
                        return
                for callback in callbacks:
                    try:
                        callback()
                    except Exception:   # noqa: BLE001 - a caller's bug must not stop it
                        pass
        finally:   # whatever escapes, flush() must not wait its whole timeout on this batch
            with self.lock:   # (on the normal path it is already set, under the lock that
                self.settled.set()   # add_done_callback checks: no callback is left behind)


class Ticket:
    """What a submit returns: `wait()` returns once the write is committed, or raises why not."""

    __slots__ = ('_batch', '_index')

    def __init__(self, batch: _Batch, index: int):
        self._batch, self._index = batch, index

    def done(self) -> bool:
        return self._batch.done.is_set()

    @property
    def committed_at(self) -> float:
        """time.perf_counter() when its batch finished (0 while pending)."""
        return self._batch.committed_at

    def wait(self, timeout: float | None = None) -> None:
        batch = self._batch
        if not batch.done.wait(timeout):
            raise TimeoutError(f'write not committed within {timeout} s')
        error = self.error()
        if error is not None:
            raise error

    def wait_settled(self, timeout: float | None = None) -> bool:
        """Until the write is done and the done callbacks of its batch have run (never call
        it from a done callback: that runs before the batch settles)."""
        return self._batch.settled.wait(timeout)

    def error(self) -> BaseException | None:
        """Why the write failed once done (None: committed, or still pending)."""
        return self._batch.errors.get(self._index) or self._batch.error

    def add_done_callback(self, callback: Callable[['Ticket'], None]) -> None:
        """Call `callback(ticket)` once the write is committed or failed: at once (here) when
        its batch has settled, else on the writer thread after the callbacks added before
        (keep it short; what it raises is dropped). A caller that must not wait for the
        commit (the agents' dispatcher) acknowledges from here."""
        batch = self._batch
        with batch.lock:
            if not batch.settled.is_set():
                batch.callbacks.append(lambda: callback(self))
                return
        callback(self)


class CommittedTicket(Ticket):
    """The Ticket of a write already committed when it was made (storage.direct): `row_id` is
    the rowid SQLite gave its insert."""

    __slots__ = ('row_id',)

    def __init__(self, row_id: int | None = None):
        batch = _Batch()
        batch.committed_at = time.perf_counter()
        batch.finish()
        super().__init__(batch, 0)
        self.row_id = row_id


_SEQUENCES = frozenset((tuple, list))   # the row types MultiRow widens (not subclasses)
_chain = chain.from_iterable


def _grouped(ops) -> dict:
    """{sql: [params]} of one submit's ops, in order."""
    groups: dict[str, list] = {}
    for sql, params in ops:
        groups.setdefault(sql, []).append(params)
    return groups


class MultiRow:
    """One SQL text for many rows of the same positional insert: `insert into t (a, b) values
    (?, ?)` becomes `... values (?, ?), (?, ?), ...` (any `on conflict` clause kept), so SQLite
    steps once for up to MAX_ROWS rows. Row counts are powers of two (at most 11 statements for
    any count, each prepared once and kept in sqlite3's statement cache). Statements that are
    not of that form (named parameters, a select, placeholders outside the values group) and
    parameters that are not sequences of the right length run as executemany."""

    # Each step gives the GIL back and waits for it again: 1,024 rows a step wrote state + 100
    # episodes per write at ~100,000 events/s against ~82,000 at 128 (bench/storage_bench.py).
    MAX_ROWS = 1024
    _FORM = re.compile(r'(?is)(?P<head>\s*insert\b[^?]*?\bvalues\s*)(?P<group>\([^()?]*'
                       r'(?:\?[^()?]*)+\))(?P<tail>[^?]*)')
    _MAX_FORMS = 256      # statements are the code's own; bound the cache all the same

    def __init__(self, max_variables: int = 32766):
        self.max_variables = max(1, int(max_variables))
        self._forms: dict[str, tuple | None] = {}

    def form(self, sql: str) -> tuple | None:
        """(head, group, tail, parameters per row) of an insert it can widen, else None."""
        try:
            return self._forms[sql]
        except KeyError:
            pass
        match = self._FORM.fullmatch(sql)
        form = None
        if (match is not None and ':' not in sql and '@' not in sql and '$' not in sql
                and re.search(r'\?\d', sql) is None):   # ?NNN would name the same values twice
            group = match['group']
            form = (match['head'], group, match['tail'], group.count('?'), {})
        if len(self._forms) < self._MAX_FORMS:
            self._forms[sql] = form
        return form

    def run(self, conn: sqlite3.Connection, sql: str, rows: list) -> None:
        form = self.form(sql)
        if form is None or len(rows) < 2:
            conn.executemany(sql, rows)
            return
        head, group, tail, width, texts = form
        # Checked with map/set (C loops: this runs for every row the process writes).
        if not set(map(type, rows)) <= _SEQUENCES or set(map(len, rows)) != {width}:
            conn.executemany(sql, rows)   # sqlite3 names what is wrong with them
            return
        size = self.MAX_ROWS
        while size > 1 and size * width > self.max_variables:
            size //= 2
        start, n = 0, len(rows)
        while start < n:
            count = min(size, n - start)
            count = 1 << (count.bit_length() - 1)     # the largest power of two that fits
            text = texts.get(count)
            if text is None:
                text = texts[count] = f'{head}{", ".join([group] * count)}{tail}'
            conn.execute(text, list(_chain(rows[start:start + count])))
            start += count


class GroupCommitWriter:
    """The single writer of one SQLite connection (which it owns from start() on)."""

    def __init__(self, conn: sqlite3.Connection, name: str = 'storage', max_delay_s: float = 0.002,
                 max_batch: int = 20000, on_commit: Callable[[int, float], None] | None = None,
                 gate: Callable[[], None] | None = None, keepers: Sequence = ()):
        """`keepers`: what writes rows derived from a batch's rows in the same transaction
        (spans.SpanKeeper): `prepare(groups)` -> (ops, token) before the grouped rows run,
        `committed(token)` once their transaction committed; called on this thread only."""
        self.conn, self.name = conn, name
        self.keepers = tuple(keepers)
        try:
            variables = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        except (AttributeError, sqlite3.Error):   # Python < 3.11: SQLite's smallest default
            variables = 999
        self.multirow = MultiRow(variables)
        self.max_delay_s, self.max_batch = max(0.0, float(max_delay_s)), max(1, int(max_batch))
        self.on_commit = on_commit       # (writes, seconds) after each committed batch
        self.gate = gate                 # raises StorageFullError when writes must stop
        # After a full disk or budget, fail every later batch too (until resume()): a write
        # queued behind a failed one may depend on it (an agent's next state holds the events
        # whose episodes were lost), and a smaller one could still fit. Any other failed batch
        # stops the writer whatever this says (_stop): only a new writer takes writes again.
        self.stop_when_full = False
        self.stopped: StorageError | None = None
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._room = threading.Condition(self._lock)
        self._pending: list = []
        self._batch = _Batch()
        self._inflight = _Batch()
        self._inflight.done.set()
        self._inflight.settled.set()
        self._closed = False
        self.batches = self.writes = self.failed = 0
        self._thread = threading.Thread(target=self._run, name=f'{name}-writer', daemon=True)
        self._thread.start()

    # -- submitting ------------------------------------------------------------------------------
    def submit(self, ops: Sequence[Op], barrier: bool = False) -> Ticket:
        """Queue `ops` (one atomic write); returns its Ticket. Blocks while max_batch writes are
        already queued (backpressure instead of unbounded memory)."""
        with self._lock:
            if self._closed:
                raise StorageError(f'{self.name}: the writer is closed')
            while len(self._pending) >= self.max_batch:
                self._room.wait()
            pending = self._pending
            pending.append(_Barrier(ops) if barrier else ops)
            ticket = Ticket(self._batch, len(pending) - 1)
        if len(pending) == 1:
            self._work.set()
        return ticket

    def execute(self, sql: str, params: Sequence = ()) -> Ticket:
        return self.submit(((sql, params),))

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until everything submitted so far is committed and acknowledged: the done
        callbacks of its batch have run (errors are the writes' own)."""
        with self._lock:
            batch = self._batch if self._pending else self._inflight
        if not batch.settled.wait(timeout):
            raise TimeoutError(f'{self.name}: writes not committed within {timeout} s')

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._work.set()
        self._thread.join(timeout)

    def resume(self) -> None:
        """Take writes again after stop_when_full stopped them (space was freed). A writer
        stopped by any other failure stays stopped: reopen the storage."""
        if isinstance(self.stopped, StorageFullError):
            self.stopped = None

    @property
    def queued(self) -> int:
        return len(self._pending)

    # -- the writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._work.wait()
            if self.max_delay_s and not self._closed:
                time.sleep(self.max_delay_s)     # let the batch fill
            with self._lock:
                items, batch = self._pending, self._batch
                self._pending, self._batch = [], _Batch()
                if items:
                    self._inflight = batch
                self._work.clear()
                self._room.notify_all()
                closed = self._closed
            if items:
                self._commit(items, batch)
            if closed:
                if not items:
                    return
                self._work.set()   # look once more: close() woke us, nothing will again

    def _commit(self, items: list, batch: _Batch) -> None:
        started = time.perf_counter()
        try:
            if self.stopped is not None:
                raise self.stopped
            if self.gate is not None:
                self.gate()
            self._learn(self._run_batch(items, savepoints=False))
        except Exception as exc:   # noqa: BLE001 - every failure is handed to the tickets
            self._rollback()
            if exc is self.stopped:
                batch.error = exc   # stopped before: nothing of this batch was run
            elif self._full(batch, exc):
                pass   # nothing of it stored; with stop_when_full, nothing after it either
            elif bad_write(exc) and len(items) == 1:
                batch.error = self._wrap(exc)   # the one write of the batch: it fails alone
            elif bad_write(exc):
                try:   # isolate the bad write: one savepoint per submit
                    self._learn(self._run_batch(items, savepoints=True, errors=batch.errors))
                except Exception as again:   # noqa: BLE001
                    self._rollback()
                    batch.errors.clear()
                    if not self._full(batch, again):   # full during the re-run: stops too
                        batch.error = self._stop(again)
            else:
                batch.error = self._stop(exc)
        if batch.error is None:
            self.batches += 1
            self.writes += len(items) - len(batch.errors)
            self.failed += len(batch.errors)
            if self.on_commit is not None:
                self.on_commit(len(items), time.perf_counter() - started)
        else:
            self.failed += len(items)
        batch.committed_at = time.perf_counter()
        batch.finish()

    def _full(self, batch: _Batch, exc: BaseException) -> bool:
        """Whether the batch failed for a full disk or budget; if so, nothing of it is stored,
        and with stop_when_full no later write lands after it (it may depend on what was lost)."""
        if not (is_full(exc) or isinstance(exc, StorageFullError)):
            return False
        batch.error = exc if isinstance(exc, StorageFullError) else StorageFullError(
            f'{self.name}: disk or budget full: {exc}; nothing of this batch was stored')
        if self.stop_when_full and self.stopped is None:
            self.stopped = StorageFullError(f'{batch.error}; writes stopped after it')
        return True

    def _stop(self, exc: BaseException) -> StorageError:
        """The batch failed as a whole, not for one bad write nor a full disk: nothing of it is
        stored, and nothing submitted after it will be (it may depend on what was lost). Its
        tickets get `exc`; every later one a StorageError naming it."""
        error = self._wrap(exc)
        if self.stopped is None:
            self.stopped = StorageError(
                f'{self.name}: writes stopped after a failed batch ({error}); nothing submitted '
                'after it is stored until the storage is reopened')
        return error

    def _wrap(self, exc: BaseException) -> StorageError:
        if isinstance(exc, StorageError):
            return exc
        if is_full(exc):
            return StorageFullError(f'{self.name}: disk or budget full: {exc}')
        return StorageError(f'{self.name}: write failed: {exc}')

    def _rollback(self) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.execute('ROLLBACK')
        except sqlite3.Error:
            pass

    def _run_batch(self, items: list, savepoints: bool, errors: dict | None = None) -> list:
        """Run and commit one batch; the keepers' tokens of what committed."""
        conn, learned = self.conn, []
        conn.execute('BEGIN IMMEDIATE')
        if savepoints:
            for index, ops in enumerate(items):
                conn.execute('SAVEPOINT w')
                tokens: list = []
                try:
                    for sql, params in ops:
                        conn.execute(sql, params)
                    for sql, params in self._derived(_grouped(ops), tokens):
                        conn.execute(sql, params)
                    conn.execute('RELEASE w')
                except Exception as exc:   # noqa: BLE001 - sorted by bad_write
                    if not bad_write(exc):   # full, I/O, ...: the whole batch fails
                        raise
                    conn.execute('ROLLBACK TO w')
                    conn.execute('RELEASE w')
                    errors[index] = self._wrap(exc)
                else:
                    learned += tokens
        else:
            groups: dict[str, list] = {}
            for ops in items:
                if type(ops) is _Barrier:   # in order, after all before it
                    self._flush_groups(groups, learned)
                    for sql, params in ops:
                        conn.execute(sql, params)
                    for sql, params in self._derived(_grouped(ops), learned):
                        conn.execute(sql, params)
                    continue
                for sql, params in ops:
                    group = groups.get(sql)
                    if group is None:
                        groups[sql] = [params]
                    else:
                        group.append(params)
            self._flush_groups(groups, learned)
        conn.execute('COMMIT')
        return learned

    def _derived(self, groups: dict, tokens: list) -> list:
        """The keepers' ops for `groups`; their tokens are appended to `tokens`."""
        out = []
        for keeper in self.keepers:
            ops, token = keeper.prepare(groups)
            if token is not None:
                out += ops
                tokens.append((keeper, token))
        return out

    def _learn(self, tokens: list) -> None:
        """The batch committed: its keepers learn what it wrote. Never a failure of the batch
        (it is stored): a keeper that did not learn only derives its rows again."""
        for keeper, token in tokens:
            try:
                keeper.committed(token)
            except Exception:   # noqa: BLE001
                pass

    def _flush_groups(self, groups: dict, tokens: list) -> None:
        for sql, params in self._derived(groups, tokens):
            group = groups.get(sql)
            if group is None:
                groups[sql] = [params]
            else:
                group.append(params)
        for sql, rows in groups.items():
            if len(rows) == 1:
                self.conn.execute(sql, rows[0])
            else:
                self.multirow.run(self.conn, sql, rows)
        groups.clear()
