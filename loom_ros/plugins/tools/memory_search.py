"""Memory search tool: an agent's episodic and semantic memory, read-only, from its SQLite file.

Agents keep memory in `<state_dir>/<agent_id>.db` (loom_ros/agents/memory.py: tables `episodes`
and `facts`). This tool opens that file with a `mode=ro` URI per query, so it never writes and
never blocks the agent, which keeps writing (WAL). Needs `memory.read`.

Query (`tool.memory.search`), `agent` plus one `mode`:
- `episodic`: `start_ms`, `end_ms`, `type`, `source`, `tag`, `text` (in the payload), `limit`
- `facts`: `entity` (subject or object), `relation`, `text` (anywhere in the fact), `limit`
- `similar`: `query` text and `k`: facts closest in meaning, through the MiniLM embedding the agent
  stored with each fact (the model is loaded on the first such query)
Result (`tool.memory.result`): `{"agent", "mode", "results": [...]}`.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np

from loom_ros.bus.event import Event
from loom_ros.plugins.contract import (
    Capability, HealthStatus, Plugin, PluginContext, PluginError, PluginMetadata, PluginResponse,
    PluginType,
)
from loom_ros.plugins.tools import ToolInputError, read_only_uri, read_query, result_event

QUERY = 'tool.memory.search'
RESULT = 'tool.memory.result'
_AGENT_ID = re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.-]*\Z')


def _int(query: dict, key: str, default: int, low: int = 0, high: int = 2**63 - 1) -> int:
    value = query.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ToolInputError(f'{key} must be an integer in [{low}, {high}], got {value!r}')
    return value


def _text(query: dict, key: str) -> str:
    value = query.get(key, '')
    if not isinstance(value, str):
        raise ToolInputError(f'{key} must be a string, got {value!r}')
    return value


class MemorySearchTool(Plugin):
    metadata = PluginMetadata(
        name='memory_search', version='0.1.0', type=PluginType.TOOL,
        capabilities=(Capability.MEMORY_READ,), reads=(QUERY,), writes=(RESULT,),
        description="Searches an agent's episodic and semantic memory (read-only).")

    def init(self, ctx: PluginContext) -> None:
        super().init(ctx)
        self.state_dir = Path(os.path.expanduser(ctx.config.get('state_dir', '~/.loom/agents')))
        agents = ctx.config.get('agents', [])
        if not isinstance(agents, list) or not all(isinstance(a, str) for a in agents):
            raise PluginError('memory_search config: agents must be a list of agent ids')
        self.agents = set(agents)   # empty: every agent in state_dir
        self.max_results = int(ctx.config.get('max_results', 100))
        ctx.require(Capability.MEMORY_READ, detail=str(self.state_dir))
        self.embedder = None
        self.answered = 0

    def _open(self, agent: str) -> sqlite3.Connection:
        if not isinstance(agent, str) or not _AGENT_ID.match(agent):
            raise ToolInputError(f'agent must be an agent id, got {agent!r}')
        if self.agents and agent not in self.agents:
            raise ToolInputError(f'agent {agent!r} is not searchable here (allowed: '
                                 f'{", ".join(sorted(self.agents))})')
        path = self.state_dir / f'{agent}.db'
        if not path.is_file():
            raise ToolInputError(f'no memory for agent {agent!r} ({path} does not exist)')
        conn = sqlite3.connect(read_only_uri(path), uri=True)
        conn.row_factory = sqlite3.Row
        return conn

    def handle_event(self, event: Event) -> PluginResponse:
        try:
            query = read_query(event, QUERY)
            agent, mode = query.get('agent'), query.get('mode', 'episodic')
            search = {'episodic': self._episodic, 'facts': self._facts,
                      'similar': self._similar}.get(mode)
            if search is None:
                raise ToolInputError(f'mode must be episodic, facts or similar, got {mode!r}')
            with closing(self._open(agent)) as conn:
                results = search(conn, agent, query)
        except ToolInputError as exc:
            return PluginResponse.failure(str(exc))
        except sqlite3.Error as exc:
            return PluginResponse.failure(f'memory_search: cannot read the memory of '
                                          f'{query.get("agent")!r}: {exc}')
        self.answered += 1
        return PluginResponse(events=[result_event(
            RESULT, {'agent': agent, 'mode': mode, 'results': results}, self.metadata.name)])

    def _has(self, conn, table: str) -> bool:
        return conn.execute("select 1 from sqlite_master where type = 'table' and name = ?",
                            [table]).fetchone() is not None

    def _episodic(self, conn, agent: str, query: dict) -> list[dict]:
        if not self._has(conn, 'episodes'):
            return []
        where = ['agent_id = :a', 'time_ms >= :s', 'time_ms <= :e']
        args = {'a': agent, 's': _int(query, 'start_ms', 0), 'e': _int(query, 'end_ms', 2**63 - 1),
                'limit': _int(query, 'limit', self.max_results, 1, self.max_results)}
        for key in ('type', 'source'):
            if _text(query, key):
                where.append(f'{key} = :{key}')
                args[key] = query[key]
        if _text(query, 'tag'):
            where.append('exists (select 1 from json_each(tags) where value = :tag)')
            args['tag'] = query['tag']
        if _text(query, 'text'):
            where.append("instr(lower(payload), lower(:text)) > 0")
            args['text'] = query['text']
        rows = conn.execute(f'select event_id, time_ms, type, source, tags, payload from episodes '
                            f'where {" and ".join(where)} order by time_ms, rowid limit :limit',
                            args).fetchall()
        return [{**dict(r), 'tags': json.loads(r['tags'])} for r in rows]

    def _facts(self, conn, agent: str, query: dict) -> list[dict]:
        if not self._has(conn, 'facts'):
            return []
        where, args = ['agent_id = :a'], {'a': agent, 'limit': _int(
            query, 'limit', self.max_results, 1, self.max_results)}
        if _text(query, 'entity'):
            where.append('(subject = :entity or object = :entity)')
            args['entity'] = query['entity']
        if _text(query, 'relation'):
            where.append('relation = :relation')
            args['relation'] = query['relation']
        if _text(query, 'text'):
            where.append("instr(lower(subject || ' ' || relation || ' ' || object), "
                         'lower(:text)) > 0')
            args['text'] = query['text']
        rows = conn.execute(f'select id, subject, relation, object, provenance, time_ms from '
                            f'facts where {" and ".join(where)} order by id limit :limit',
                            args).fetchall()
        return [dict(r) for r in rows]

    def _similar(self, conn, agent: str, query: dict) -> list[dict]:
        text = _text(query, 'query')
        if not text.strip():
            raise ToolInputError('similar needs a non-empty "query" text')
        k = _int(query, 'k', 5, 1, self.max_results)
        if not self._has(conn, 'facts'):
            return []
        rows = conn.execute('select id, subject, relation, object, provenance, vector from facts '
                            'where agent_id = ?', [agent]).fetchall()
        if not rows:
            return []
        if self.embedder is None:
            from loom_ros.agents.embedding import MiniLMEmbedder, ModelError
            try:
                self.embedder = MiniLMEmbedder()
            except ModelError as exc:
                raise ToolInputError(f'similar search is unavailable: {exc}') from None
        vectors = np.stack([np.frombuffer(r['vector'], dtype=np.float32) for r in rows])
        scores = vectors @ self.embedder.embed([text])[0]
        best = np.argsort(-scores, kind='stable')[:k]
        return [{**{key: rows[i][key] for key in ('id', 'subject', 'relation', 'object',
                                                  'provenance')}, 'score': float(scores[i])}
                for i in best]

    def health(self) -> HealthStatus:
        return HealthStatus(details={'state_dir': str(self.state_dir),
                                     'answered': str(self.answered)})
