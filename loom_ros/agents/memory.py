"""What a behavior sees of its agent's memory beyond working memory (ctx.episodic, ctx.semantic)
and what the Recall service answers from: thin adapters over the storage layer's stores
(storage.stores.EpisodeStore, FactStore) in the host's unit database. The SQL, the cutting and
masking of episodes and the faiss index live there. No rclpy here."""
from __future__ import annotations

import json

from loom_ros.agents.state import AgentStore
from loom_ros.bus.event import Event
from loom_ros.storage.stores import EPISODE_COLUMNS, episode_row


class EpisodicMemory:
    """What happened, in order: queryable by time range, type, source and tag. Answers from
    the committed episodes plus those still waiting for their commit (the event being handled
    and the ones before it), so a handler sees its own history whole."""

    def __init__(self, store: AgentStore):
        self.store, self.agent_id = store, store.agent_id

    def record(self, event: Event) -> None:
        """Add an event; it is stored with the agent's next commit, with the state it made."""
        self.store.record(event)

    def query(self, start_ms: int = 0, end_ms: int = 2**63 - 1, type: str = '',
              source: str = '', tag: str = '', limit: int = 100) -> list[dict]:
        # Uncommitted first: one committed meanwhile is then in both, and found twice below.
        waiting = self.store.uncommitted()
        rows = self.store.storage.episodes.query(self.agent_id, start_ms, end_ms, type, source,
                                                 tag, limit)
        seen = {(r['event_id'], r['time_ms']) for r in rows}
        out = [{k: r[k] for k in EPISODE_COLUMNS} for r in rows]
        episodes = self.store.storage.episodes
        mask = episodes.mask
        for event in waiting:
            if episodes.withholds(event):   # no store consent: never an episode, waiting or not
                continue
            row = dict(zip(('agent_id',) + EPISODE_COLUMNS, episode_row(self.agent_id, event,
                                                                        mask)))
            del row['agent_id']
            if (row['event_id'], row['time_ms']) in seen or not \
                    start_ms <= row['time_ms'] <= end_ms or (type and row['type'] != type) or \
                    (source and row['source'] != source):
                continue
            row['tags'] = json.loads(row['tags'])
            if tag and tag not in row['tags']:
                continue
            out.append(row)
        out.sort(key=lambda r: r['time_ms'])   # stable: committed before waiting at a tie
        return out[:max(0, int(limit))]


class SemanticMemory:
    """Facts (subject, relation, object, provenance) and their embeddings: the layer's FactStore
    for this agent (SQLite rows, an exact faiss index rebuilt from them on open)."""

    def __init__(self, storage, agent_id: str, embedder, held=None):
        """`held`: () -> (privacy, data subject) of what the agent is handling (Agent.held), whose
        subject a fact made meanwhile is also filed under."""
        self.agent_id = agent_id
        self.facts = storage.facts(agent_id, embedder)
        self._held = held

    @property
    def index(self):
        return self.facts.index

    def add_fact(self, subject: str, relation: str, obj: str, provenance: str) -> int:
        """Stored before it returns (rare next to events: waiting keeps searches right after it
        finding it)."""
        handling = self._held()[1] if self._held is not None else ''
        fact_id, ticket = self.facts.add(subject, relation, obj, provenance, handling)
        ticket.wait()
        return fact_id

    def similar(self, query: str, k: int = 5) -> list[dict]:
        """Facts whose meaning is closest to `query` (cosine similarity, best first)."""
        return self.facts.similar(query, k)

    def neighbourhood(self, entity: str, depth: int = 1) -> list[dict]:
        """Facts reachable from `entity` through the graph within `depth` hops."""
        return self.facts.neighbourhood(entity, depth)
