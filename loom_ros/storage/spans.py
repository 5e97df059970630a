"""Each agent's span in episode_agents (schema.py: the bounds of its episode times, which every
per-agent query reads first), kept by the group-commit writer in the same transaction as the
episodes it bounds.

The writer hands every batch's grouped rows to `SpanKeeper.prepare` before it runs them; the
keeper adds one span upsert per agent whose episodes in the batch fall outside the span it knows
to be committed, widened to whole steps (first floored, last ceiled to `step_ms`), and learns the
new spans only once that transaction committed (`committed`). So a committed episode is always
inside its agent's committed span, whatever fails or is killed, and an agent's span is written
once a step instead of with every episode: the upsert per episode cost the writer a quarter of
its rate (bench/storage_bench.py). Only the writer's thread calls it: no lock."""
from __future__ import annotations

SPAN_STEP_MS = 60_000
MIN_TIME_MS, MAX_TIME_MS = -2**63, 2**63 - 1   # SQLite's integers
MAX_AGENTS = 100_000   # agents whose committed span is remembered (more: their span is rewritten)

AGENT_SPAN = ('insert into episode_agents (agent_id, first_ms, last_ms) values (?, ?, ?) '
              'on conflict (agent_id) do update set first_ms = min(first_ms, '
              'excluded.first_ms), last_ms = max(last_ms, excluded.last_ms)')


class SpanKeeper:
    """`episode_sqls`: the inserts whose rows are episodes (agent_id first, time_ms third)."""

    def __init__(self, episode_sqls: tuple[str, ...], step_ms: int = SPAN_STEP_MS):
        self.sqls, self.step_ms = tuple(episode_sqls), max(1, int(step_ms))
        self._committed: dict[str, tuple[int, int]] = {}
        self.upserts = 0   # span writes committed (stats, tests)

    def prepare(self, groups: dict) -> tuple[list, dict | None]:
        """(span upserts to run with `groups` ({sql: [params]}), what to learn once they
        committed). Every writer of episodes stores integer times (stores.episode_row,
        AgentStateStore.import_file); a row whose time is anything else is left out here rather
        than failing the batch."""
        committed, need = self._committed, None
        for sql in self.sqls:
            for row in groups.get(sql, ()):
                agent, time_ms = row[0], row[2]
                if type(time_ms) is not int:   # checked first: compared, it would fail the batch
                    continue
                span = committed.get(agent)
                if span is not None and span[0] <= time_ms <= span[1]:
                    continue
                if need is None:
                    need = {}
                bounds = need.get(agent)
                need[agent] = (time_ms, time_ms) if bounds is None else (
                    min(bounds[0], time_ms), max(bounds[1], time_ms))
        if need is None:
            return [], None
        step, ops = self.step_ms, []
        for agent, (lo, hi) in need.items():
            lo = max(lo - lo % step, MIN_TIME_MS)
            hi = min(hi - hi % step + step - 1, MAX_TIME_MS)
            span = committed.get(agent)
            if span is not None:
                lo, hi = min(lo, span[0]), max(hi, span[1])
            need[agent] = (lo, hi)
            ops.append((AGENT_SPAN, (agent, lo, hi)))
        return ops, need

    def committed(self, written: dict) -> None:
        """The transaction that ran prepare's upserts committed: their spans are there (the
        table keeps the union of every upsert, min/max)."""
        committed = self._committed
        self.upserts += len(written)
        if len(committed) + len(written) > MAX_AGENTS:
            committed.clear()
        for agent, (lo, hi) in written.items():
            span = committed.get(agent)
            committed[agent] = (lo, hi) if span is None else (min(lo, span[0]), max(hi, span[1]))
