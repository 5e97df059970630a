"""Read-only access to what other components keep, for tools: the agents' memory (episodes and
facts) under the storage root, through the layer's opener and its one set of queries, so a tool
never opens another component's files itself nor rewrites their SQL. Nothing here writes."""
from __future__ import annotations

import json
import sqlite3
from contextlib import closing

import numpy as np

from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import StorageLayout, check_name
from loom_ros.storage.sqlite import open_database
from loom_ros.storage.rowcipher import RowCipher, episode_context
from loom_ros.storage.stores import EPISODE_COLUMNS, episodes_sql, facts_sql

VECTOR_COLUMNS = ('id', 'subject', 'relation', 'object', 'provenance')

# The rows an asker may see, in SQL before any limit (so a limit fills with those alone and
# how many of another person's rows match shows nowhere): anonymous ones ('') and the asker's.
ALLOWED = "{column} in ('', :asker)"


class NoMemoryError(StorageError):
    """The agent has no memory under this root (or is not one a reader may see)."""


class AgentMemoryReader:
    """The agents' episodic and semantic memory, wherever under the root it is: an agent's own
    file `<root>/agents/<agent>.db` (how agents keep it today) and the unit databases
    `<root>/db/*.db` (where agents hosted on the layer keep it), merged in time order. Files are
    opened read-only per query (`mode=ro`: SQLite refuses writes whatever the SQL; writers are
    never blocked, WAL). `agents` limits which agents may be read (empty: all).

    Every query takes `asker`: the data subject the question names ('' none, or one that is not
    a valid id). It reads only anonymous rows and the asker's, filtered in SQL before the limit
    (or the top k), so one person's memories neither answer another's question nor shorten
    the answer: what another person keeps is not counted, not even read."""

    # rows of encrypted episodes read to search their text (decrypted here, not in SQL)
    MAX_SCAN = 50000

    def __init__(self, layout: StorageLayout, agents: frozenset[str] | set[str] = frozenset(),
                 keyring=None):
        """`keyring`: the root's key table opened with its master key, to read payloads
        encrypted at rest (docs/encryption.md); without it they are a KeyringError."""
        self.layout, self.agents = layout, frozenset(agents)
        self.cipher = RowCipher(keyring)

    @property
    def folder(self):
        return self.layout.agents

    def sources(self, agent: str) -> list:
        """The files holding memory of `agent`; NoMemoryError when there is none."""
        try:
            check_name(agent, 'agent')
        except StorageError:
            raise NoMemoryError(f'agent must be an agent id, got {str(agent)[:80]!r}') from None
        if self.agents and agent not in self.agents:
            raise NoMemoryError(f'agent {agent!r} is not searchable here (allowed: '
                                f'{", ".join(sorted(self.agents))})')
        own = self.folder / f'{agent}.db'
        found = [own] if own.is_file() else []
        found += [db for db in self.layout.databases() if self._holds(db, agent)]
        if not found:
            raise NoMemoryError(f'no memory for agent {agent!r} (neither {own} nor a database '
                                f'in {self.layout.root / "db"} holds any)')
        return found

    # Each an indexed lookup: whether a unit database holds anything of an agent is asked for
    # every name a tool or a Recall request gives, so it must not scan the episodes.
    _HOLDS = (("kv", "select 1 from kv where ns = 'agent_state' and key = ? limit 1"),
              ('episode_agents', 'select 1 from episode_agents where agent_id = ? limit 1'),
              ('facts', 'select 1 from facts where agent_id = ? limit 1'))

    @staticmethod
    def _holds(path, agent: str) -> bool:
        try:
            with closing(open_database(path, read_only=True, check=False)) as conn:
                tables = {r[0] for r in conn.execute(
                    "select name from sqlite_master where type = 'table'")}
                return any(conn.execute(sql, (agent,)).fetchone() is not None
                           for table, sql in AgentMemoryReader._HOLDS if table in tables)
        except (sqlite3.DatabaseError, StorageError):
            return False   # not a unit database (yet): nothing of this agent in it

    def _facts(self, agent: str, asker: str, query) -> list[sqlite3.Row]:
        """The fact rows `query(allowed)` -> (sql, named args) selects in each file, where
        `allowed` is the SQL condition for the rows `asker` may see."""
        rows: list[sqlite3.Row] = []
        for path in self.sources(agent):
            # check=False: each file's writer checks it on open; a reader need not scan it.
            with closing(open_database(path, read_only=True, check=False)) as conn:
                conn.row_factory = sqlite3.Row
                try:
                    columns = {r[1] for r in conn.execute('pragma table_info(facts)')}
                    if not columns:
                        continue   # the agent has not written any yet
                    # Every row says whose it is ('' anonymous; files from before the column
                    # have none: all anonymous), so one person's memory is kept from another.
                    mine = 'data_subject' in columns
                    owner = 'data_subject' if mine else "''"
                    sql, args = query(ALLOWED.format(column='data_subject') if mine else '')
                    rows += conn.execute(f'select {owner} as data_subject, '
                                         + sql.removeprefix('select '),
                                         {**args, 'asker': asker}).fetchall()
                except sqlite3.DatabaseError as exc:
                    raise StorageError(f'{path}: cannot read the memory of {agent!r}: '
                                       f'{exc}') from None
        return rows

    def episodes(self, agent: str, start_ms: int = 0, end_ms: int = 2**63 - 1, type: str = '',
                 source: str = '', tag: str = '', text: str = '', limit: int = 100, *,
                 asker: str) -> list[dict]:
        """Payloads decrypted when encrypted at rest (a text search then runs here, over at
        most MAX_SCAN encrypted rows of those the asker may see, since SQL sees only
        ciphertext)."""
        rows = []
        for path in self.sources(agent):
            with closing(open_database(path, read_only=True, check=False)) as conn:
                conn.row_factory = sqlite3.Row
                try:
                    columns = {r[1] for r in conn.execute('pragma table_info(episodes)')}
                    if not columns:
                        continue   # the agent has not written any yet
                    subject = 'subject' in columns
                    spans = conn.execute("select 1 from sqlite_master where type = 'table' "
                                         "and name = 'episode_agents'").fetchone() is not None
                    wanted = EPISODE_COLUMNS + (('subject',) if subject else ())
                    # no subject column (a file from before it): every row is anonymous
                    allowed = [ALLOWED.format(column='subject')] if subject else []
                    plain = ' and '.join(allowed + (["typeof(payload) = 'text'"] if text else []))
                    sql, args = episodes_sql(agent, start_ms, end_ms, type, source, tag, text,
                                             limit, wanted, plain, spans)
                    found = conn.execute(sql, {**args, 'asker': asker}).fetchall()
                    if text:   # encrypted rows: searched once decrypted
                        sealed = ' and '.join(allowed + ["typeof(payload) = 'blob'"])
                        sql, args = episodes_sql(agent, start_ms, end_ms, type, source, tag, '',
                                                 self.MAX_SCAN, wanted, sealed, spans)
                        found += conn.execute(sql, {**args, 'asker': asker}).fetchall()
                except sqlite3.DatabaseError as exc:
                    raise StorageError(f'{path}: cannot read the memory of {agent!r}: '
                                       f'{exc}') from None
            for r in found:
                row = dict(r)
                row['data_subject'] = row.pop('subject', '')   # whose it is ('' anonymous)
                payload = self.cipher.open_or_none(row['payload'], episode_context(
                    agent, row['event_id'], row['time_ms'], row['data_subject']))
                if payload is None or (text and isinstance(r['payload'], bytes)
                                       and text.lower() not in payload.lower()):
                    continue
                row['payload'], row['tags'] = payload, json.loads(row['tags'])
                rows.append(row)
        rows.sort(key=lambda r: r['time_ms'])
        return rows[:max(0, limit)]

    def facts(self, agent: str, entity: str = '', relation: str = '', text: str = '',
              limit: int = 100, *, asker: str) -> list[dict]:
        """Each row with its `data_subject` ('' anonymous), as episodes() and similar() give."""
        return [dict(r) for r in self._facts(agent, asker, lambda allowed: facts_sql(
            agent, entity, relation, text, limit, allowed))][:max(0, limit)]

    def similar(self, agent: str, vector: np.ndarray, k: int, *, asker: str) -> list[dict]:
        """The agent's facts closest to `vector` (an embedding of the agent's model; cosine,
        best first), exact over the vectors stored with the facts the asker may see: the top
        k is cut from those alone."""
        rows = self._facts(agent, asker, lambda allowed: (
            f'select {", ".join(VECTOR_COLUMNS)}, vector from facts where agent_id = :a'
            + (f' and {allowed}' if allowed else ''), {'a': agent}))
        if not rows:
            return []
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        stored = [np.frombuffer(r['vector'], dtype=np.float32) for r in rows]
        if any(v.shape != query.shape for v in stored):
            raise StorageError(f'facts of {agent!r}: stored vectors do not have the query\'s '
                               f'{query.shape[0]} dimensions (another embedding model?)')
        scores = np.stack(stored) @ query
        best = np.argsort(-scores, kind='stable')[:k]
        return [{**{key: rows[i][key] for key in VECTOR_COLUMNS + ('data_subject',)},
                 'score': float(scores[i])} for i in best]
