"""The cold tier's vector index: memories as compact int8 codes in SQLite (the source of truth,
so the index can be rebuilt without re-embedding) and a compressed faiss index in memory and on
disk. Below `train_at` vectors the index is exact (flat); from there it is IVF-PQ (trained on the
stored codes), searched with `nprobe` lists and re-ranked exactly on the stored codes.

The index file covers the cold rows up to a position of `cold_log` (every add and remove, logged
in the transaction that made it): on load the newer log entries are replayed, so a SIGKILL
between a move's commit and the next save loses nothing. An index that cannot be brought in line
with its rows (missing, newer than the database, other dimensions, a log trimmed past it, a
count that differs) raises IndexMismatchError; `rebuild()` makes a new one from the rows."""
from __future__ import annotations

import json
import os
import sqlite3
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from loom_ros.storage.durable import TooLargeError, read_regular
from loom_ros.storage.errors import CorruptRecordError, IndexMismatchError, StorageError

MAGIC = b'LOOMCOLD'
ADD, REMOVE = 1, 2
MAX_HEADER_BYTES = 64 * 1024   # the JSON header Loom writes is under 200 bytes
MAX_LISTS = 65536              # IVF lists (rebuild's limit)
INDEX_SLACK_BYTES = 64 * 1024 * 1024
_FAISS_LIMITS = threading.Lock()   # faiss's deserialization limits are process-wide


def _deserialize(body: np.ndarray):
    """faiss.deserialize_index with no vector longer and no loop longer than the bytes given:
    a damaged size field is a RuntimeError, not an allocation of what it says (faiss resizes
    before it reads). The IVF-PQ lookup table (computed, not read) is made after, as faiss
    does when it reads an index without the limits."""
    with _FAISS_LIMITS:
        old_bytes = faiss.get_deserialization_vector_byte_limit()
        old_loops = faiss.get_deserialization_loop_limit()
        faiss.set_deserialization_vector_byte_limit(len(body) + 4096)
        faiss.set_deserialization_loop_limit(len(body) + 4096)
        try:
            index = faiss.deserialize_index(body, faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)
        finally:
            faiss.set_deserialization_vector_byte_limit(old_bytes)
            faiss.set_deserialization_loop_limit(old_loops)
    if not isinstance(index, faiss.IndexIDMap2):
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))   # the kinds Loom saves
        if isinstance(ivf, faiss.IndexIVFPQ):
            ivf.precompute_table()
    return index


def encode(vectors: np.ndarray) -> list[bytes]:
    """int8 codes with a per-vector float32 scale: d + 4 bytes a vector, ~0.4 % error."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    scale = np.abs(vectors).max(axis=1)
    scale[scale == 0] = 1.0
    packed = np.empty((len(vectors), vectors.shape[1] + 4), dtype=np.uint8)
    packed[:, :4] = scale.astype('<f4')[:, None].view(np.uint8)
    packed[:, 4:] = np.round(vectors / scale[:, None] * 127.0).astype(np.int8).view(np.uint8)
    return [row.tobytes() for row in packed]


def decode(codes, dim: int) -> np.ndarray:
    """(n, dim) float32 from codes; CorruptRecordError on a code of the wrong size."""
    if not len(codes):
        return np.zeros((0, dim), dtype=np.float32)
    if any(len(code) != dim + 4 for code in codes):
        bad = next(len(code) for code in codes if len(code) != dim + 4)
        raise CorruptRecordError(f'cold vector code of {bad} bytes, expected {dim + 4}')
    packed = np.frombuffer(b''.join(codes), dtype=np.uint8).reshape(len(codes), dim + 4)
    scale = packed[:, :4].copy().view('<f4')[:, 0] / 127.0
    return packed[:, 4:].view(np.int8).astype(np.float32) * scale[:, None]


@dataclass
class IndexParams:
    dim: int = 384
    train_at: int = 20000     # vectors before the exact index becomes IVF-PQ
    nlist: int = 0            # IVF lists; 0: about 4 * sqrt(n) at training, at most 65536
    pq_m: int = 48            # PQ sub-quantizers; divides dim
    pq_bits: int = 8          # bits per sub-quantizer code (m * bits / 8 bytes a vector)
    nprobe: int = 32
    rerank: int = 40          # candidates per wanted result re-ranked exactly on the codes
    #                           (bench: recall@10 0.97 at 1M with 40, 0.68 with 10)
    train_sample: int = 100000
    threads: int = 1          # faiss OpenMP threads (process-wide); more spin-wait on a busy CPU


class ColdIndex:
    """faiss over the cold rows of one database."""

    def __init__(self, path: str | os.PathLike, params: IndexParams):
        self.path, self.params = Path(path), params
        if params.threads > 0:
            faiss.omp_set_num_threads(params.threads)
        self.index = self._flat()
        self.seq = 0
        self.database_id = ''   # the database it serves (load, rebuild): saved in its header

    def _flat(self):
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.params.dim))

    @property
    def kind(self) -> str:
        return 'flat' if isinstance(self.index, faiss.IndexIDMap2) else 'ivfpq'

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def memory_bytes(self) -> int:
        """About what the index takes in memory and on disk (codes + ids; lists' overhead aside)."""
        per = (self.params.dim * 4 + 8 if self.kind == 'flat'
               else self.params.pq_m * self.params.pq_bits // 8 + 8)
        return self.ntotal * per

    # -- loading and saving ----------------------------------------------------------------------
    def load(self, conn: sqlite3.Connection) -> None:
        """Read the file and replay the log after it; IndexMismatchError if that cannot match."""
        rows = conn.execute('select count(*) from cold').fetchone()[0]
        last = _last_seq(conn)
        self.database_id = database_id(conn)
        if not self.path.exists():
            first = conn.execute('select min(seq) from cold_log').fetchone()[0]
            if rows == 0 or first == 1:       # nothing yet, or the whole log is still there
                self.index, self.seq = self._flat(), 0
            else:
                raise IndexMismatchError(f'{self.path}: missing, and {rows} cold rows need it; '
                                         'rebuild it: loom storage compact --rebuild-index')
        else:
            # no more vectors than rows now plus every log entry since the index was saved
            log = conn.execute('select count(*) from cold_log').fetchone()[0]
            made_for = self._read(self.max_file_bytes(rows + log))
            if made_for is not None and made_for != self.database_id:
                raise IndexMismatchError(
                    f'{self.path}: the index of another database ({str(made_for)[:40]}), not of '
                    f'this one ({self.database_id or "unnamed"}); rebuild it: loom storage '
                    'compact --rebuild-index')
            if self.seq > last:
                raise IndexMismatchError(
                    f'{self.path}: covers cold log position {self.seq} but the database ends at '
                    f'{last} (an index from another or newer database); rebuild it: loom storage '
                    'compact --rebuild-index')
        first = conn.execute('select min(seq) from cold_log where seq > ?', (self.seq,)).fetchone()[0]
        if first is not None and first != self.seq + 1:
            raise IndexMismatchError(f'{self.path}: covers log position {self.seq} but the log '
                                     f'resumes at {first}; rebuild it: loom storage compact '
                                     '--rebuild-index')
        self.replay(conn)
        if self.ntotal != rows:
            raise IndexMismatchError(f'{self.path}: {self.ntotal} vectors for {rows} cold rows; '
                                     'rebuild it: loom storage compact --rebuild-index')

    def max_file_bytes(self, vectors: int) -> int:
        """The most bytes an index file of at most `vectors` vectors can take: each as a flat
        float vector and its id (more than a PQ code), the IVF lists' centroids, a header."""
        d = self.params.dim
        return (12 + MAX_HEADER_BYTES + max(0, int(vectors)) * (d * 4 + 16)
                + max(MAX_LISTS, self.params.nlist) * (d * 4 + 64) + INDEX_SLACK_BYTES)

    def _read(self, max_bytes: int | None = None) -> str | None:
        """Load the file; the database id it was saved for (None: saved before ids). Read to
        at most `max_bytes` (a plain file, never through a link), its header bounded and
        checked before faiss parses the rest: any damage is an IndexMismatchError (a
        StorageError) naming the file, never a raw ValueError, MemoryError or faiss error."""
        def unreadable(why: str) -> IndexMismatchError:
            return IndexMismatchError(f'{self.path}: unreadable ({why[:200]}); rebuild it: '
                                      'loom storage compact --rebuild-index')
        limit = self.max_file_bytes(2**31) if max_bytes is None else int(max_bytes)
        try:
            blob = read_regular(self.path, limit)
        except TooLargeError:
            raise unreadable(f'more than {limit} bytes, more than an index of this database '
                             'can take; not read') from None
        except (OSError, MemoryError) as exc:
            raise unreadable(str(getattr(exc, 'strerror', None) or exc)) from None
        try:
            if len(blob) < 12 or blob[:8] != MAGIC:
                raise ValueError('not a Loom cold index')
            size = struct.unpack_from('<I', blob, 8)[0]
            if size > MAX_HEADER_BYTES or 12 + size > len(blob):
                raise ValueError(f'a header of {size} bytes in a file of {len(blob)}')
            header = json.loads(blob[12:12 + size])
            if not isinstance(header, dict):
                raise ValueError('a header that is not a JSON object')
            seq = header.get('seq')
            if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**63:
                raise ValueError(f'cold log position {str(seq)[:40]!r}')
            made_for = header.get('database')
            if made_for is not None and not isinstance(made_for, str):
                raise ValueError('a database id that is not text')
            if len(blob) == 12 + size:
                raise ValueError('no index after the header')
            index = _deserialize(np.frombuffer(blob, dtype=np.uint8, offset=12 + size))
        except (ValueError, TypeError, struct.error, RuntimeError, MemoryError, OverflowError,
                AttributeError) as exc:
            raise unreadable(str(exc) or type(exc).__name__) from None
        if index.d != self.params.dim:
            raise IndexMismatchError(f'{self.path}: vectors of {index.d} dimensions, storage is '
                                     f'configured for {self.params.dim}; rebuild it: loom storage '
                                     'compact --rebuild-index')
        self.index, self.seq = index, seq
        self._tune()
        return made_for

    def save(self) -> None:
        """Write the index atomically (temporary file, fsync, rename)."""
        header = json.dumps({'seq': self.seq, 'dim': self.params.dim, 'kind': self.kind,
                             'ntotal': self.ntotal, 'database': self.database_id}).encode()
        body = faiss.serialize_index(self.index)
        tmp = self.path.with_name(self.path.name + '.part')
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, 'wb') as out:
                out.write(MAGIC + struct.pack('<I', len(header)) + header)
                out.write(body.tobytes())
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            raise StorageError(f'{self.path}: cannot save the cold index: {exc.strerror}') from None

    # -- changes ---------------------------------------------------------------------------------
    def replay(self, conn: sqlite3.Connection) -> int:
        """Apply the log entries after self.seq; returns how many."""
        entries = conn.execute('select seq, op, id from cold_log where seq > ? order by seq',
                               (self.seq,)).fetchall()
        if not entries:
            return 0
        present, removed = {}, []
        for _seq, op, row_id in entries:
            if op == ADD:
                present[row_id] = True
            else:
                if present.pop(row_id, None) is None:
                    removed.append(row_id)
        if removed:
            self.index.remove_ids(np.array(removed, dtype=np.int64))
        if present:
            ids = list(present)
            codes = {}
            for start in range(0, len(ids), 900):
                chunk = ids[start:start + 900]
                codes.update(conn.execute(
                    f'select id, code from cold where id in ({",".join("?" * len(chunk))})',
                    chunk).fetchall())
            ids = [i for i in ids if i in codes]
            if ids:
                self.add(np.array(ids, dtype=np.int64),
                         decode([codes[i] for i in ids], self.params.dim))
        self.seq = entries[-1][0]
        return len(entries)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids)

    def remove(self, ids) -> None:
        if len(ids):
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))

    def maybe_train(self, conn: sqlite3.Connection) -> bool:
        """Switch the exact index to IVF-PQ once it holds train_at vectors (off the hot path)."""
        if self.kind != 'flat' or self.ntotal < self.params.train_at:
            return False
        self.rebuild(conn, trained=True)
        return True

    def rebuild(self, conn: sqlite3.Connection, trained: bool | None = None) -> None:
        """A new index from the rows' codes (no re-embedding), covering the log to its end."""
        p = self.params
        last = _last_seq(conn)
        self.database_id = database_id(conn)
        n = conn.execute('select count(*) from cold').fetchone()[0]
        ivf = n >= p.train_at if trained is None else trained
        if ivf:
            nlist = p.nlist or int(min(65536, max(16, 4 * np.sqrt(n))))
            index = faiss.index_factory(p.dim, f'IVF{nlist},PQ{p.pq_m}x{p.pq_bits}', faiss.METRIC_INNER_PRODUCT)
            # Polysemous training (a Hamming-order annealing, off by default elsewhere) takes
            # minutes and serves no search here.
            faiss.downcast_index(index).do_polysemous_training = False
            sample = conn.execute('select code from cold order by random() limit ?',
                                  (max(p.train_sample, 40 * nlist),)).fetchall()
            index.train(decode([r[0] for r in sample], p.dim))
        else:
            index = self._flat()
        cursor = conn.execute('select id, code from cold order by id')
        while True:
            chunk = cursor.fetchmany(20000)
            if not chunk:
                break
            index.add_with_ids(decode([r[1] for r in chunk], p.dim),
                               np.array([r[0] for r in chunk], dtype=np.int64))
        self.index, self.seq = index, last
        self._tune()

    def _tune(self) -> None:
        if self.kind != 'flat':
            try:
                faiss.extract_index_ivf(self.index).nprobe = self.params.nprobe
            except RuntimeError as exc:   # not an IVF index (a file of another kind)
                raise IndexMismatchError(f'{self.path}: an index of another kind ({exc}); '
                                         'rebuild it: loom storage compact --rebuild-index'
                                         ) from None

    # -- searching -------------------------------------------------------------------------------
    def candidates(self, query: np.ndarray, n: int) -> list[int]:
        if self.ntotal == 0:
            return []
        _scores, ids = self.index.search(np.ascontiguousarray(query[None, :], np.float32),
                                         min(n, self.ntotal))
        return [int(i) for i in ids[0] if i >= 0]


def database_id(conn: sqlite3.Connection) -> str:
    """The id schema.ensure gave the database ('' for a file it has not opened yet)."""
    row = conn.execute("select value from meta where key = 'database_id'").fetchone()
    return str(row[0]) if row is not None else ''


def _last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("select seq from sqlite_sequence where name = 'cold_log'").fetchone()
    return int(row[0]) if row else 0
