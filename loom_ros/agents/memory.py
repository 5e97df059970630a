"""Agent memory beyond working memory: episodic (event sequences) and semantic (a knowledge graph
of subject-relation-object facts with provenance, plus faiss vectors over real sentence
embeddings). Both live in the agent's SQLite file; the faiss index is rebuilt from the stored
vectors on load, so SQLite stays the single source of truth. No rclpy here.
"""
from __future__ import annotations

import json
import time

import faiss
import numpy as np
import sqlite_utils

from loom_ros.agents.embedding import DIM
from loom_ros.bus.event import Event
from loom_ros.storage.stores import (FactStore, episode_row, episodes_sql, fact_neighbourhood,
                                     similar_facts)


class EpisodicMemory:
    """What happened, in order: queryable by time range, type, source and tag."""

    def __init__(self, db: sqlite_utils.Database, agent_id: str):
        self.db, self.agent_id = db, agent_id
        self.db['episodes'].create({
            'agent_id': str, 'event_id': str, 'time_ms': int, 'type': str, 'source': str,
            'tags': str, 'payload': str}, if_not_exists=True)
        self.db['episodes'].create_index(['agent_id', 'time_ms'], if_not_exists=True)

    def record(self, event: Event) -> None:
        """Add an event; it becomes durable with the caller's next commit (StateStore.commit),
        in the same transaction as the state it produced. Cut and masked as every episode is
        (storage.stores.episode_row: telemetry's rules) before it reaches the file."""
        # sqlite-utils' execute commits a write on its own unless a transaction is open: open
        # one, so a SIGKILL between this episode and the state's commit loses both, never
        # leaves an episode past the committed state.
        conn = self.db.conn
        if not conn.in_transaction:
            conn.execute('BEGIN')
        conn.execute(
            'insert into episodes (agent_id, event_id, time_ms, type, source, tags, payload) '
            'values (?, ?, ?, ?, ?, ?, ?)', episode_row(self.agent_id, event))

    def query(self, start_ms: int = 0, end_ms: int = 2**63 - 1, type: str = '',
              source: str = '', tag: str = '', limit: int = 100) -> list[dict]:
        sql, args = episodes_sql(self.agent_id, start_ms, end_ms, type, source, tag, limit=limit)
        return [{**r, 'tags': json.loads(r['tags'])} for r in self.db.query(sql, args)]


class SemanticMemory:
    """Facts (subject, relation, object, provenance) in SQLite, their embeddings in faiss."""

    def __init__(self, db: sqlite_utils.Database, agent_id: str, embedder):
        self.db, self.agent_id, self.embedder = db, agent_id, embedder
        self.db['facts'].create({
            'id': int, 'agent_id': str, 'subject': str, 'relation': str, 'object': str,
            'provenance': str, 'time_ms': int, 'vector': bytes}, pk='id', if_not_exists=True)
        self.db['facts'].create_index(['agent_id', 'subject'], if_not_exists=True)
        self.db['facts'].create_index(['agent_id', 'object'], if_not_exists=True)
        self.index = faiss.IndexIDMap(faiss.IndexFlatIP(DIM))
        rows = list(self.db.query('select id, vector from facts where agent_id = ?', [agent_id]))
        if rows:
            vectors = np.stack([np.frombuffer(r['vector'], dtype=np.float32) for r in rows])
            self.index.add_with_ids(vectors, np.array([r['id'] for r in rows], dtype=np.int64))

    text_of = staticmethod(FactStore.text_of)

    def add_fact(self, subject: str, relation: str, obj: str, provenance: str) -> int:
        vector = self.embedder.embed([self.text_of(subject, relation, obj)])[0]
        fact_id = self.db['facts'].insert({
            'agent_id': self.agent_id, 'subject': subject, 'relation': relation, 'object': obj,
            'provenance': provenance, 'time_ms': time.time_ns() // 1_000_000,
            'vector': vector.tobytes()}).last_pk
        self.index.add_with_ids(vector[None, :], np.array([fact_id], dtype=np.int64))
        return fact_id

    def similar(self, query: str, k: int = 5) -> list[dict]:
        """Facts whose meaning is closest to `query` (cosine similarity, best first)."""
        if self.index.ntotal == 0:
            return []
        return similar_facts(self._query, self.index, self.embedder.embed([query]), k)

    def neighbourhood(self, entity: str, depth: int = 1) -> list[dict]:
        """Facts reachable from `entity` through the graph within `depth` hops."""
        return fact_neighbourhood(self._query, self.agent_id, entity, depth)

    def _query(self, sql: str, params) -> list[dict]:
        return list(self.db.query(sql, params))
