"""The stores, each a small API over the unit database and its group-commit writer. Writes return
a Ticket (wait() = committed); reads see committed rows only. Behaviour kept from the components'
own stores: agent state schema upgrades and corrupt-row errors (agents/state.py), episodes with
masked payloads and facts with faiss vectors (agents/memory.py), router decisions and outcomes
(router/history.py), and the append-only audit log (security/audit.py)."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from json.encoder import encode_basestring_ascii   # what json.dumps does for one str

import faiss
import numpy as np

from loom_ros.bus.privacy import SUBJECT_METADATA_KEY, SubjectError, check_subject, event_subject
from loom_ros.security.keyring import day_of
from loom_ros.storage import auditchain, schema
from loom_ros.storage.schema import CLOCK_FLOOR_MS, MAX_TIME_MS, bounded_ms, stored_stamp
from loom_ros.storage.errors import CorruptRecordError, StorageError
from loom_ros.storage.rowcipher import episode_context
from loom_ros.storage.sqlite import open_database
from loom_ros.storage.writer import CommittedTicket, Ticket
from loom_ros.telemetry.logs import mask_text, mask_value

MAX_PAYLOAD_BYTES = 4096   # of an event's payload kept in its episode
MAX_FIELD_CHARS = 256      # of an id, type, source or tag
# json.dumps(value, separators=...) makes an encoder per call; per-event writes share this one
_compact_json = json.JSONEncoder(separators=(',', ':')).encode
MAX_AUDIT_CHARS = 2000     # of any one string in an audit record, cut before masking
MAX_AUDIT_DEPTH = 8


class KVStore:
    """Small JSON records by (namespace, key), each with a schema version."""

    PUT = ('insert into kv (ns, key, schema, value, updated_ms) values (?, ?, ?, ?, ?) on '
           'conflict(ns, key) do update set schema = excluded.schema, value = excluded.value, '
           'updated_ms = excluded.updated_ms')

    def __init__(self, storage):
        self.storage = storage

    def put_op(self, ns: str, key: str, value, schema: int = 1) -> tuple:
        return (self.PUT, (ns, key, int(schema), _compact_json(value),
                           self.storage.clock()))

    def put_json_op(self, ns: str, key: str, text: str, schema: int = 1) -> tuple:
        """put_op of a value already in JSON (`text`: the caller serialized it)."""
        return (self.PUT, (ns, key, int(schema), text, self.storage.clock()))

    SUBJECT = 'insert or ignore into kv_subjects (ns, key, subject) values (?, ?, ?)'

    def subject_ops(self, ns: str, key: str, subjects) -> list[tuple]:
        """Note that events of `subjects` wrote (ns, key): erasing one of them deletes it."""
        return [(self.SUBJECT, (ns, key, s)) for s in sorted(set(subjects)) if s]

    def put(self, ns: str, key: str, value, schema: int = 1, subjects=()) -> Ticket:
        """`subjects`: the data subjects of the events the value was made from."""
        return self.storage.writer.submit((self.put_op(ns, key, value, schema),
                                           *self.subject_ops(ns, key, subjects)))

    def delete(self, ns: str, key: str) -> Ticket:
        return self.storage.writer.submit(
            (('delete from kv where ns = ? and key = ?', (ns, key)),
             ('delete from kv_subjects where ns = ? and key = ?', (ns, key))), barrier=True)

    def get(self, ns: str, key: str):
        """(value, schema) as committed, or None; CorruptRecordError when it cannot be decoded."""
        rows = self.storage.query('select schema, value from kv where ns = ? and key = ?',
                                  (ns, key))
        if not rows:
            return None
        try:
            return json.loads(rows[0]['value']), rows[0]['schema']
        except (TypeError, ValueError) as exc:
            raise CorruptRecordError(f'{self.storage.path}: {ns}/{key} is corrupt ({exc}); it '
                                     'was left as is for inspection') from None

    def keys(self, ns: str) -> list[str]:
        return [r['key'] for r in self.storage.query('select key from kv where ns = ? order by key',
                                                     (ns,))]


class AgentStateStore:
    """An agent's state: committed in one transaction with the episodes of the events that made
    it, restored on configure. An older schema is upgraded; a corrupt row is a clear error."""

    NS = 'agent_state'
    SCHEMA_VERSION = 2   # 1 kept the event counter inside the state as `_events`

    def __init__(self, storage):
        self.storage, self.kv = storage, storage.kv
        self.episodes = storage.episodes

    def load(self, agent_id: str) -> tuple[dict, int]:
        """(state, events handled) as last committed; ({}, 0) for a new agent."""
        found = self.kv.get(self.NS, agent_id)
        if found is None:
            return {}, 0
        value, schema = found
        if schema == 1:
            if not isinstance(value, dict):
                raise CorruptRecordError(f'agent {agent_id}: stored state is not an object')
            return value, int(value.pop('_events', 0))
        if schema != self.SCHEMA_VERSION:
            raise CorruptRecordError(f'agent {agent_id}: state schema {schema} is newer than '
                                     f'this Loom ({self.SCHEMA_VERSION})')
        if not isinstance(value, dict) or not isinstance(value.get('state'), dict):
            raise CorruptRecordError(f'agent {agent_id}: stored state is not an object')
        return value['state'], int(value.get('events', 0))

    def has(self, agent_id: str) -> bool:
        """Whether the agent has committed state here (a new agent has not)."""
        return bool(self.storage.query('select 1 from kv where ns = ? and key = ?',
                                       (self.NS, agent_id)))

    def import_file(self, agent_id: str, path) -> Ticket:
        """Bring an agent's own file (`<root>/agents/<id>.db`, how agents kept their memory
        before the layer) in: its state (schema 1 and 2 rows), episodes and facts (vectors as
        stored, no re-embedding), one atomic write. The file is only read; a damaged file, a
        corrupt or newer row is a CorruptRecordError naming it and nothing is written."""
        try:
            conn = open_database(path, read_only=True)
        except StorageError as exc:
            raise CorruptRecordError(f'agent {agent_id}: cannot read its old state file: '
                                     f'{exc}') from None
        conn.row_factory = sqlite3.Row
        try:
            tables = {r[0] for r in conn.execute("select name from sqlite_master where "
                                                 "type = 'table'")}
            row = conn.execute('select schema, state, events, last_event_id from agent_state '
                               'where agent_id = ?', (agent_id,)).fetchone() \
                if 'agent_state' in tables else None
            episodes = conn.execute(
                'select agent_id, event_id, time_ms, type, source, tags, payload from episodes '
                'where agent_id = ? order by rowid', (agent_id,)).fetchall() \
                if 'episodes' in tables else []
            facts = conn.execute(
                'select subject, relation, object, provenance, time_ms, vector from facts '
                'where agent_id = ? order by id', (agent_id,)).fetchall() \
                if 'facts' in tables else []
        except sqlite3.DatabaseError as exc:
            raise CorruptRecordError(f'{path}: cannot read the state of agent {agent_id}: '
                                     f'{exc}') from None
        finally:
            conn.close()
        state, events, last = {}, 0, ''
        if row is not None:
            state, events = self._legacy_state(agent_id, row)
            last = row['last_event_id'] or ''
        ops = [self.kv.put_op(self.NS, agent_id, {'state': state, 'events': events,
                                                  'last_event_id': last}, self.SCHEMA_VERSION)]
        # Rows as the old store wrote them: already cut and masked.
        cipher = self.storage.cipher
        # Times as integers (an old file's column may hold a REAL): what the span keeper bounds.
        # Stored now, as far as this store knows (their ages start at the import).
        stored = stored_stamp(self.storage.clock())
        ops += [(EpisodeStore.INSERT_STORED, (
            e['agent_id'], e['event_id'], int(e['time_ms']), e['type'], e['source'], e['tags'],
            cipher.seal(e['payload'] or '', episode_context(e['agent_id'], e['event_id'],
                                                            int(e['time_ms']), ''),
                        '', bounded_ms(e['time_ms'])),
            len(e['payload'] or '') + len(e['tags'] or '') + 64, '', stored)) for e in episodes]
        ops += [('insert into facts (id, agent_id, subject, relation, object, provenance, '
                 'time_ms, vector) values (?, ?, ?, ?, ?, ?, ?, ?)',
                 (self.storage.next_id('facts'), agent_id, *tuple(f))) for f in facts]
        return self.storage.writer.submit(ops)

    def _legacy_state(self, agent_id: str, row) -> tuple[dict, int]:
        """A row of agents/state.py's table: the same checks and messages as it made."""
        try:
            state = json.loads(row['state'])
        except (TypeError, ValueError) as exc:
            raise CorruptRecordError(f'agent {agent_id}: stored state is corrupt ({exc}); it was '
                                     'left as is for inspection') from None
        if not isinstance(state, dict):
            raise CorruptRecordError(f'agent {agent_id}: stored state is not an object')
        if row['schema'] == 1:
            return state, int(state.pop('_events', 0) or 0)
        if row['schema'] != self.SCHEMA_VERSION:
            raise CorruptRecordError(f'agent {agent_id}: state schema {row["schema"]} is newer '
                                     f'than this Loom ({self.SCHEMA_VERSION})')
        return state, int(row['events'] or 0)

    def commit(self, agent_id: str, state: dict | None, events: int, last_event_id: str,
               episodes: list | tuple = (), state_json: str | None = None) -> Ticket:
        """State plus the episodes (Events) that produced it, one atomic write. `state_json`:
        the state already serialized (compact JSON of a dict), in place of `state`."""
        if state_json is None:
            state_json = _compact_json(state)
        # The record {"state": ..., "events": ..., "last_event_id": ...} around it, built as
        # text: the state is not serialized twice.
        ops = [self.kv.put_json_op(self.NS, agent_id, (
            f'{{"state":{state_json},"events":{int(events)},"last_event_id":'
            f'{encode_basestring_ascii(str(last_event_id))}}}'), self.SCHEMA_VERSION)]
        store = self.episodes
        entries = [store.entry_with_subject(agent_id, event) for event in episodes]
        ops.extend(op for op, _kept, _subject in entries)
        # the state is made from these events, kept or only counted: erasing one of their
        # subjects deletes it (most events name none: nothing to add)
        subjects = [subject for _op, _kept, subject in entries if subject]
        if subjects:
            ops.extend(self.kv.subject_ops(self.NS, agent_id, subjects))
        ticket = self.storage.writer.submit(ops)
        if store.hot_max:
            for event, (_op, kept, _subject) in zip(episodes, entries):
                if kept:
                    store.remember(agent_id, event, ticket)
        return ticket


def _payload_text(payload: bytes) -> str:
    try:
        if type(payload) is bytes and len(payload) <= MAX_PAYLOAD_BYTES:   # no copy
            return payload.decode()
        return bytes(payload[:MAX_PAYLOAD_BYTES]).decode()
    except UnicodeDecodeError:
        return f'<{len(payload)} bytes>'


def episode_row(agent_id: str, event, mask: Callable[[str], str] = mask_text) -> tuple:
    """(agent_id, event_id, time_ms, type, source, tags, payload) of an event's episode, as every
    episode is stored: payload cut to MAX_PAYLOAD_BYTES (binary as '<n bytes>'), ids, types,
    sources and tags cut to MAX_FIELD_CHARS, secrets in payload and tags masked."""
    tags = json.dumps([mask(str(t)[:MAX_FIELD_CHARS]) for t in event.tags]) if event.tags \
        else '[]'
    return (agent_id[:MAX_FIELD_CHARS], event.id[:MAX_FIELD_CHARS], int(event.timestamp_ms),
            event.type[:MAX_FIELD_CHARS], event.source[:MAX_FIELD_CHARS], tags,
            mask(_payload_text(event.payload)))


def episode_subject(event) -> str:
    """The data subject an event names ('' when anonymous). An invalid id is stored as ''
    too: it cannot be asked for by forget/export, which check ids the same way."""
    try:
        return event_subject(event)
    except SubjectError:
        return ''


class EpisodeStore:
    """The event log (warm tier), with the most recent events of each agent served from memory
    (hot tier: a read cache; every write is durable through the writer)."""

    # The writer adds each agent's span in episode_agents to the transaction of its episodes
    # (spans.py), so neither write here carries it.
    INSERT = schema.EPISODE_INSERT
    # with the event's data subject (loom.subject metadata), which erasure and export go by
    INSERT_SUBJECT = schema.EPISODE_INSERT_SUBJECT
    # and the time this store wrote it (its clock, schema.stored_stamp): what the lifecycle ages
    # it by, never the publisher's stamp (time_ms), which any publisher can set to 1970 or 2**63
    INSERT_STORED = schema.EPISODE_INSERT_STORED

    def __init__(self, storage, mask: Callable[[str], str] = mask_text):
        self.storage, self.mask = storage, mask
        self.hot_max = max(0, int(storage.config.hot_max_events))
        self._hot: dict[str, deque] = {}
        self._hot_lock = threading.Lock()
        # event id -> data subject ('' anonymous, None: storage may not keep it) of the events
        # being handled: what a fact made from one of them inherits (FactStore.add)
        self._origins: OrderedDict[str, str | None] = OrderedDict()
        # the arrival noted last (set once its origin is in _origins): the agents of one
        # delivery share one arrival copy, noted once
        self._noted = None

    # An event of a data subject without `store` consent: counted, nothing of it kept.
    WITHHOLD = ('insert into withheld (agent_id, type, day, events) values (?, ?, ?, 1) '
                'on conflict (agent_id, type, day) do update set events = events + 1')

    MAX_ORIGINS = 10000

    def note(self, event) -> None:
        """Remember whose event this is, for what a handler derives from it (a fact); its
        consent is asked when the fact is stored (`origin`)."""
        if self._noted is event:   # the same arrival again (a broadcast): noted once for all
            return                 # the agents of a delivery (they share one arrival copy)
        try:
            subject = event_subject(event)
        except SubjectError:   # not a valid id: nothing made from it may be kept
            subject = None
        with self._hot_lock:
            self._origins[event.id] = subject
            self._origins.move_to_end(event.id)
            while len(self._origins) > self.MAX_ORIGINS:
                self._origins.popitem(last=False)
            # only now: a thread that sees it returns above, and finds the origin noted
            self._noted = event

    # The data subject an episode names, by event id, through the partial episodes_event index
    # (schema.py: only episodes that name one are in it; an anonymous episode is found as none).
    ORIGIN = "select subject from episodes where event_id = ? and subject != '' limit 1"

    def origin(self, event_id: str) -> str | None:
        """The data subject of an event by id ('' when it names none, or storage never saw
        it: a fact about it then follows the event being handled, `FactStore.add`): noted
        while it was handled, else its stored episode; None when storage may not keep what it
        said: an invalid id, or no `store` consent now (asked here, when a fact is made, not at
        every event an agent handles: a withdrawal holds for every fact stored after it
        returned)."""
        with self._hot_lock:
            subject = self._origins.get(event_id, False)
        if subject is False:
            rows = self.storage.query(self.ORIGIN, (str(event_id)[:MAX_FIELD_CHARS],))
            subject = rows[0]['subject'] if rows else ''
        if subject and not self.storage.consent.allows(subject):
            return None
        return subject

    def withholds(self, event) -> bool:
        """Whether storage keeps only a count of `event`: it names a data subject without
        `store` consent, or names one that is not a valid id (fail closed)."""
        try:
            subject = event_subject(event)
        except SubjectError:
            return True
        return bool(subject) and not self.storage.consent.allows(subject)

    def entry(self, agent_id: str, event) -> tuple[tuple, bool]:
        """(the write of one event, whether it keeps the event): the episode's insert (secrets
        in payload and tags masked before the file), or, for an event storage may not keep
        (`withholds`), the count of it per agent, type and UTC day."""
        op, kept, _subject = self.entry_with_subject(agent_id, event)
        return op, kept

    def entry_with_subject(self, agent_id: str, event) -> tuple[tuple, bool, str]:
        """`entry` and the event's data subject (as `episode_subject`), found once."""
        metadata = event.metadata
        if type(metadata) is dict and SUBJECT_METADATA_KEY not in metadata:
            subject, withhold = '', False   # anonymous (most events): nothing to ask
        else:
            try:
                subject = event_subject(event)
            except SubjectError:   # not a valid id: a count only, stored as '' (fail closed)
                subject, withhold = '', True
            else:
                withhold = bool(subject) and not self.storage.consent.allows(subject)
        if withhold:
            self.storage.count_withheld()
            return (self.WITHHOLD, (agent_id[:MAX_FIELD_CHARS], event.type[:MAX_FIELD_CHARS],
                                    day_of(bounded_ms(event.timestamp_ms)))), False, subject
        row = episode_row(agent_id, event, self.mask)
        cipher = self.storage.cipher
        size = len(row[6]) + len(row[5]) + 64
        stored = self.storage.clock()   # checked inline: this runs for every event written
        if type(stored) is not int or not CLOCK_FLOOR_MS <= stored < MAX_TIME_MS:
            stored = stored_stamp(stored)
        if cipher.keyring is None:
            return (self.INSERT_STORED, row + (size, subject, stored)), True, subject
        # encryption on: the payload under the subject's (anonymous: the day's) key; the day of
        # a stamp past year 3000 is not a date (bounded: the key is found by its id, not by time)
        payload = cipher.seal(row[6], episode_context(*row[:3], subject), subject,
                              bounded_ms(row[2]))
        return (self.INSERT_STORED, (*row[:6], payload, size, subject, stored)), True, subject

    def record(self, agent_id: str, event) -> Ticket:
        op, kept, _subject = self.entry_with_subject(agent_id, event)
        ticket = self.storage.writer.submit((op,))
        if kept and self.hot_max:
            self.remember(agent_id, event, ticket)
        return ticket

    def withheld(self) -> int:
        """Events counted instead of kept, in this unit (committed)."""
        return int(self.storage.query('select coalesce(sum(events), 0) from withheld')[0][0])

    def remember(self, agent_id: str, event, ticket: Ticket) -> None:
        if not self.hot_max:
            return
        with self._hot_lock:
            recent = self._hot.get(agent_id)
            if recent is None:
                recent = self._hot[agent_id] = deque(maxlen=self.hot_max)
            recent.append((event, ticket))

    def recent(self, agent_id: str, max_age_ms: int, limit: int = 100) -> list:
        """Committed events of the last `max_age_ms` (by the storage clock), newest last, from
        memory: the hot tier."""
        horizon = self.storage.clock() - max_age_ms
        with self._hot_lock:
            items = list(self._hot.get(agent_id, ()))
        out = [e for e, t in items if t.done() and e.timestamp_ms >= horizon]
        return out[-limit:]

    def evict_hot(self, max_age_ms: int) -> int:
        """Drop cached events older than the hot age (they stay in the warm tier)."""
        horizon, dropped = self.storage.clock() - max_age_ms, 0
        with self._hot_lock:
            for recent in self._hot.values():
                while recent and recent[0][0].timestamp_ms < horizon and recent[0][1].done():
                    recent.popleft()
                    dropped += 1
        return dropped

    def query(self, agent_id: str = '', start_ms: int = 0, end_ms: int = 2**63 - 1,
              type: str = '', source: str = '', tag: str = '', limit: int = 100) -> list[dict]:
        sql, args = episodes_sql(agent_id, start_ms, end_ms, type, source, tag, limit=limit,
                                 columns=('agent_id',) + EPISODE_COLUMNS + ('subject',))
        return open_episodes(self.storage.cipher, self.storage.query(sql, args))


def open_episodes(cipher, rows) -> list[dict]:
    """Episode rows (with agent_id and subject) as dicts without the subject, tags decoded and
    payloads decrypted; a row whose key was destroyed (an erased subject) is left out."""
    out = []
    for r in rows:
        row = dict(r)
        subject = row.pop('subject', '')
        payload = cipher.open_or_none(row['payload'], episode_context(
            row['agent_id'], row['event_id'], row['time_ms'], subject))
        if payload is None:
            continue
        row['payload'], row['tags'] = payload, json.loads(row['tags'])
        out.append(row)
    return out


EPISODE_COLUMNS = ('event_id', 'time_ms', 'type', 'source', 'tags', 'payload')
FACT_COLUMNS = ('id', 'subject', 'relation', 'object', 'provenance', 'time_ms')


# An agent's time range cut to its span in episode_agents: NULL (no rows, found at once by
# the index seek) for an agent with no episodes.
SPAN_START = 'max(:s, (select first_ms from episode_agents where agent_id = :agent_id))'
SPAN_END = 'min(:e, (select last_ms from episode_agents where agent_id = :agent_id))'


def episodes_sql(agent_id: str = '', start_ms: int = 0, end_ms: int = 2**63 - 1, type: str = '',
                 source: str = '', tag: str = '', text: str = '', limit: int = 100,
                 columns: tuple = EPISODE_COLUMNS, where_also: str = '',
                 spans: bool = True) -> tuple[str, dict]:
    """The one episode query (time range, type, source, tag, text in the payload), in time
    order, for every file that holds episodes (the unit databases and the agents' own files).
    `where_also`: one more SQL condition (no parameters). `spans`: the file has episode_agents
    (the agents' own files from before the layer do not), so one agent's query reads only its
    span of the time index."""
    agent_id = agent_id[:MAX_FIELD_CHARS]   # as episode rows keep it
    where, args = ['time_ms >= :s', 'time_ms <= :e'], {'s': int(start_ms), 'e': int(end_ms),
                                                       'limit': max(0, int(limit))}
    if agent_id and spans:
        where = [f'time_ms >= {SPAN_START}', f'time_ms <= {SPAN_END}']
    if where_also:
        where.append(where_also)
    for column, value in (('agent_id', agent_id), ('type', type), ('source', source)):
        if value:
            where.append(f'{column} = :{column}')
            args[column] = value
    if tag:
        where.append('exists (select 1 from json_each(tags) where value = :tag)')
        args['tag'] = tag
    if text:
        where.append('instr(lower(payload), lower(:text)) > 0')
        args['text'] = text
    return (f'select {", ".join(columns)} from episodes where {" and ".join(where)} '
            f'order by time_ms, rowid limit :limit', args)


def facts_sql(agent_id: str, entity: str = '', relation: str = '', text: str = '',
              limit: int = 100, where_also: str = '') -> tuple[str, dict]:
    """The one fact query: by entity (subject or object), relation, or text anywhere in it.
    `where_also`: one more SQL condition (its parameters the caller adds to the args), applied
    before the limit."""
    where, args = ['agent_id = :a'], {'a': agent_id, 'limit': max(0, int(limit))}
    if where_also:
        where.append(where_also)
    if entity:
        where.append('(subject = :entity or object = :entity)')
        args['entity'] = entity
    if relation:
        where.append('relation = :relation')
        args['relation'] = relation
    if text:
        where.append("instr(lower(subject || ' ' || relation || ' ' || object), lower(:text)) > 0")
        args['text'] = text
    return (f'select {", ".join(FACT_COLUMNS)} from facts where {" and ".join(where)} '
            f'order by id limit :limit', args)


class FactStore:
    """An agent's knowledge graph (subject, relation, object, provenance) and its fact vectors in
    an exact faiss index rebuilt from the rows on open: SQLite stays the source of truth."""

    def __init__(self, storage, agent_id: str, embedder):
        self.storage, self.agent_id, self.embedder = storage, agent_id, embedder
        rows = storage.query('select id, vector from facts where agent_id = ?', (agent_id,))
        self.index = None
        if rows:
            vectors = np.stack([np.frombuffer(r['vector'], dtype=np.float32) for r in rows])
            self._index(vectors.shape[1]).add_with_ids(
                vectors, np.array([r['id'] for r in rows], dtype=np.int64))

    def _index(self, dim: int):
        if self.index is None:
            self.index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        elif self.index.d != dim:
            raise StorageError(f'facts of {self.agent_id}: vectors of {dim} dimensions, the '
                               f'index has {self.index.d}')
        return self.index

    def _owner(self, of_provenance: str | None, handling: str) -> str | None:
        """Whose a fact is (see `add`); None when it may not be stored."""
        if of_provenance is None or not handling or handling == of_provenance:
            return of_provenance
        if of_provenance:   # two people's
            return None
        try:
            check_subject(handling)
        except SubjectError:   # '..' (several), or not a valid id: fail closed
            return None
        return handling if self.storage.consent.allows(handling) else None

    @staticmethod
    def text_of(subject: str, relation: str, obj: str) -> str:
        return f'{subject} {relation.replace("_", " ")} {obj}'

    def add(self, subject: str, relation: str, obj: str, provenance: str,
            handling: str = '') -> tuple[int, Ticket]:
        """Store a fact under the data subject of its provenance event (erasure finds it by
        that even once the event left the warm tier), or, when that is anonymous or unknown,
        of the event the agent is handling as it makes the fact (`handling`: '' none, '..'
        several): what is derived from a person's event is theirs. A fact storage may not keep
        (no `store` consent, an invalid id, or two people's: a fact is filed under one) is not
        stored: it is counted, and its id is 0."""
        of_provenance = self.storage.episodes.origin(provenance)
        data_subject = self._owner(of_provenance, handling)
        if data_subject is None:
            self.storage.count_withheld()
            return 0, CommittedTicket()
        vector = np.asarray(self.embedder.embed([self.text_of(subject, relation, obj)])[0],
                            dtype=np.float32)
        fact_id = self.storage.next_id('facts')
        ticket = self.storage.writer.execute(
            'insert into facts (id, agent_id, subject, relation, object, provenance, time_ms, '
            'vector, data_subject) values (?, ?, ?, ?, ?, ?, ?, ?, ?)',
            (fact_id, self.agent_id, subject, relation, obj, provenance, self.storage.clock(),
             vector.tobytes(), data_subject))
        self._index(vector.shape[0]).add_with_ids(vector[None, :], np.array([fact_id], np.int64))
        return fact_id, ticket

    def similar(self, query: str, k: int = 5) -> list[dict]:
        """Facts whose meaning is closest to `query` (cosine similarity, best first)."""
        if self.index is None or self.index.ntotal == 0:
            return []
        return similar_facts(self.storage.query, self.index,
                             np.asarray(self.embedder.embed([query]), np.float32), k)

    def neighbourhood(self, entity: str, depth: int = 1) -> list[dict]:
        """Facts reachable from `entity` through the graph within `depth` hops."""
        return fact_neighbourhood(self.storage.query, self.agent_id, entity, depth)


def similar_facts(query, index, vectors: np.ndarray, k: int) -> list[dict]:
    """The facts nearest `vectors` (one query embedding) in `index`, best first, read through
    `query(sql, params)`: the one search for the unit databases and the agents' files."""
    if index.ntotal == 0:
        return []
    scores, ids = index.search(vectors, min(k, index.ntotal))
    found = [int(i) for i in ids[0] if i >= 0]
    facts = {} if not found else {r['id']: dict(r) for r in query(
        f'select id, subject, relation, object, provenance from facts where id in '
        f'({",".join("?" * len(found))})', found)}
    return [{**facts[int(i)], 'score': float(s)} for s, i in zip(scores[0], ids[0])
            if int(i) in facts]


def fact_neighbourhood(query, agent_id: str, entity: str, depth: int = 1) -> list[dict]:
    """Facts reachable from `entity` within `depth` hops of the agent's knowledge graph, read
    through `query(sql, params)`."""
    seen, frontier, found = {entity}, {entity}, {}
    for _ in range(depth):
        if not frontier:
            break
        marks = ','.join('?' * len(frontier))
        rows = query(
            f'select id, subject, relation, object, provenance from facts where agent_id = ? '
            f'and (subject in ({marks}) or object in ({marks}))',
            (agent_id, *frontier, *frontier))
        frontier = set()
        for row in rows:
            found[row['id']] = dict(row)
            for node in (row['subject'], row['object']):
                if node not in seen:
                    seen.add(node)
                    frontier.add(node)
    return sorted(found.values(), key=lambda r: r['id'])


# The subject column of a decision whose event named someone storage may not name (no `store`
# consent, or an invalid id): not a valid id, so no erasure or export matches it.
SUBJECT_NOT_KEPT = '-'


class RouterHistoryStore:
    """The router's decisions and outcomes, its spend per budget period and running stats, in a
    unit database (Storage) or a file of their own (direct.DirectDatabase): `db` gives write,
    query and clock."""

    def __init__(self, db, budget_period_s: float):
        self.db, self.period_s = db, float(budget_period_s)
        self.routes = Counter({r['route']: r['n'] for r in db.query(
            'select route, count(*) as n from decisions group by route')})
        self.outcomes = db.query('select count(*) as n from outcomes')[0]['n']

    def record_decision(self, decision_id: str, event_id: str, event_type: str, agent_id: str,
                        privacy: int, route: str, rule: str, confidence: float,
                        cloud_cost: float, local_confidence: float | None, payload_bytes: int,
                        latency_budget_ms: float | None, now: float | None = None,
                        subject: str = '') -> Ticket:
        """`subject`: the data subject the decided event names ('' anonymous), for erasure."""
        ticket = self.db.write(
            'insert into decisions (id, time, event_id, event_type, agent_id, privacy, route, '
            'rule, confidence, cloud_cost, local_confidence, payload_bytes, latency_budget_ms, '
            'subject) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
            (decision_id, now or time.time(), event_id, event_type, agent_id, int(privacy), route,
             rule, confidence, cloud_cost, local_confidence, payload_bytes,
             # SQLite has no infinity in JSON terms; no deadline is stored as NULL.
             None if latency_budget_ms == float('inf') else latency_budget_ms,
             str(subject or '')[:128]))
        self.routes[route] += 1
        return ticket

    def record_outcome(self, decision_id: str, event_type: str, backend: str, latency_ms: float,
                       cost: float, success: bool, confidence: float,
                       now: float | None = None) -> Ticket:
        ticket = self.db.write(
            'insert into outcomes values (?, ?, ?, ?, ?, ?, ?, ?)',
            (decision_id, now or time.time(), event_type, backend, latency_ms, cost,
             int(success), confidence))
        self.outcomes += 1
        return ticket

    def spend(self, now: float | None = None) -> float:
        """Cloud spend reported in the current budget period (periods start at multiples of it):
        the outcomes of decisions this history holds (an outcome naming no decision, a forgery
        or one whose decision has not arrived yet, is charged once its decision is here), and
        no negative or non-finite cost (RouterHistory refuses them; older rows are left out)."""
        now = now or time.time()
        start = now - (now % self.period_s)
        return float(self.db.query(
            'select coalesce(sum(o.cost), 0) as s from outcomes o join decisions d '
            'on d.id = o.decision_id where o.time >= ? and o.cost >= 0 and o.cost < 1e300',
            (start,))[0]['s'])

    def has_outcome(self, decision_id: str) -> bool:
        return bool(self.db.query('select 1 from outcomes where decision_id = ? limit 1',
                                  (decision_id,)))

    def has_decision(self, decision_id: str) -> bool:
        return bool(self.db.query('select 1 from decisions where id = ? limit 1', (decision_id,)))

    def backend_stats(self, event_type: str, backend: str) -> dict:
        """Running performance per backend and event type (what the learned router trains on)."""
        return dict(self.db.query(
            'select count(*) as n, avg(latency_ms) as latency_ms, avg(cost) as cost, '
            'avg(success) as success_rate, avg(confidence) as confidence from outcomes '
            'where event_type = ? and backend = ?', (event_type, backend))[0])

    def training_rows(self) -> list[dict]:
        """Decisions joined with what local inference turned out to be: the learned router's
        data."""
        return [dict(r) for r in self.db.query(
            'select d.event_type, d.privacy, d.local_confidence, d.payload_bytes, '
            'd.latency_budget_ms, o.success as local_ok from decisions d join outcomes o '
            "on o.decision_id = d.id where o.backend = 'local' and d.local_confidence is not null "
            # a decision about a person is never training data here (no `learning` consent
            # is asked at this layer): only anonymous ones
            "and d.subject = ''")]


def _bounded(value, depth: int = 0):
    """`value` with every string cut and nesting limited, so masking's cost is bounded."""
    if isinstance(value, str):
        return value[:MAX_AUDIT_CHARS]
    if depth >= MAX_AUDIT_DEPTH:
        return '<nested too deep>'
    if isinstance(value, dict):
        return {str(k)[:MAX_AUDIT_CHARS]: _bounded(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_bounded(v, depth + 1) for v in value]
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    return str(value)[:MAX_AUDIT_CHARS]


class AuditStore:
    """Append-only records (ts_ms, plugin, kind, fields): triggers refuse updates and deletes,
    and the lifecycle never moves them. Strings are cut, then secrets masked, before the file.
    Every record is linked into one hash chain (auditchain.py) by the statement that inserts it:
    it reads the previous record's hash and inserts in one IMMEDIATE transaction, so processes
    sharing a file still make one chain. In a unit database (Storage) or the audit_db that
    processes share (direct.DirectDatabase)."""

    # One statement: the id (given, or the next one), the previous record's hash and the insert,
    # so no other writer can come between the read and the write.
    INSERT = ('insert into audit (id, ts_ms, plugin, kind, fields, hash) '
              f'select n.id, :ts, :plugin, :kind, :fields, {auditchain.SQL_FUNCTION}('
              '(select hash from audit where id < n.id order by id desc limit 1), '
              'n.id, :ts, :plugin, :kind, :fields) '
              'from (select coalesce(:id, (select coalesce(max(id), 0) + 1 from audit)) as id) n')
    PAGE = 5000   # rows read at a time by verify

    def __init__(self, db):
        self.db = db
        db.conn.create_function(auditchain.SQL_FUNCTION, 6, auditchain.link, deterministic=True)
        self._upgrade()

    def _upgrade(self) -> None:
        """Give a file written before the chain its hash column (the chain starts at the next
        record: schema.AUDIT_DDL noted where). Several processes may race: one adds it."""
        if self._has_chain_column():
            return
        try:
            self.db.write(schema.AUDIT_UPGRADE).wait(30)
        except StorageError:
            if not self._has_chain_column():   # not a race lost to another process
                raise

    def _has_chain_column(self) -> bool:
        return any(r['name'] == 'hash' for r in
                   self.db.query("select name from pragma_table_info('audit')"))

    def append(self, plugin: str, kind: str, ts_ms: int | None = None,
               **fields) -> tuple[int, Ticket]:
        """(row id, Ticket); a caller that must fail closed waits on the ticket."""
        if not kind or not isinstance(kind, str):
            raise StorageError(f'audit record for {plugin!r} has no kind')
        ts = int(ts_ms) if ts_ms is not None else self.db.clock()
        row = {'ts': ts, 'plugin': mask_text(str(plugin)[:MAX_AUDIT_CHARS]),
               'kind': mask_text(kind[:MAX_AUDIT_CHARS]),
               'fields': json.dumps(mask_value(_bounded(fields)), separators=(',', ':'),
                                    sort_keys=True, default=str)}
        row_id = self.db.next_id('audit')   # None: a file several processes write
        ticket = self.db.write(self.INSERT, {**row, 'id': row_id})
        return (ticket.row_id if row_id is None else row_id), ticket

    def head(self) -> auditchain.Head | None:
        """The last record's id and hash (None: no record yet, or the last has no hash)."""
        rows = self.db.query('select id, hash from audit order by id desc limit 1')
        if not rows or rows[0]['hash'] is None:
            return None
        return auditchain.Head(int(rows[0]['id']), str(rows[0]['hash']))

    def chain_start(self) -> int | None:
        rows = self.db.query("select value from audit_meta where key = 'chain_start'")
        try:
            return int(rows[0]['value']) if rows else None
        except (TypeError, ValueError):
            return None

    def count_before_chain(self) -> int:
        """Records older than the chain (a file upgraded to it): not covered by it."""
        return int(self.db.query('select count(*) as n from audit where id < ?',
                                 (self.chain_start() or 0,))[0]['n'])

    def check_tail(self) -> str:
        """'' when the last record links to the one before it (a cheap check on open, so that
        nothing is appended to a visibly broken chain), else what is wrong."""
        start = self.chain_start()
        if start is None:
            return 'the file has no chain start (its audit_meta row was removed)'
        rows = self.db.query('select id, ts_ms, plugin, kind, fields, hash from audit '
                             'order by id desc limit 2')
        if not rows or rows[0]['id'] < start:
            return ''
        last = rows[0]
        before = rows[1] if len(rows) > 1 and rows[1]['id'] >= start else None
        if before is not None and before['hash'] is None:
            return f'record {before["id"]} has no chain hash'
        try:
            expected = auditchain.link(before['hash'] if before else None, last['id'],
                                       last['ts_ms'], last['plugin'], last['kind'],
                                       last['fields'])
        except (TypeError, ValueError):
            expected = None
        if expected != last['hash']:
            return f'the last record ({last["id"]}) does not match its hash'
        return ''

    def verify(self, published: auditchain.Head | None = None) -> auditchain.Verdict:
        """Check every link (auditchain.verify), reading PAGE rows at a time, and that no more
        records lie before the chain start than when it started (`pre_chain`)."""
        rows = self.db.query("select value from audit_meta where key = 'pre_chain'")
        try:
            pre_chain = int(rows[0]['value']) if rows else None
        except (TypeError, ValueError):
            pre_chain = None
        return auditchain.verify(self._rows(), self.chain_start(), published, pre_chain)

    def _rows(self):
        last = -2**63
        while True:
            page = self.db.query('select id, ts_ms, plugin, kind, fields, hash from audit '
                                 'where id > ? order by id limit ?', (last, self.PAGE))
            yield from page
            if len(page) < self.PAGE:
                return
            last = page[-1]['id']

    def query(self, plugin: str = '', kind: str = '', since_ms: int = 0,
              until_ms: int = 2**63 - 1, limit: int = 1000) -> list[dict]:
        """Records in time order (oldest first), filtered by plugin, kind and [since, until]."""
        where, args = ['ts_ms >= :s', 'ts_ms <= :u'], {'s': int(since_ms), 'u': int(until_ms),
                                                        'limit': int(limit)}
        if plugin:
            where.append('plugin = :plugin')
            args['plugin'] = plugin
        if kind:
            where.append('kind = :kind')
            args['kind'] = kind
        rows = self.db.query(f'select id, ts_ms, plugin, kind, fields from audit where '
                             f'{" and ".join(where)} order by ts_ms, id limit :limit', args)
        return [{**dict(r), 'fields': json.loads(r['fields'])} for r in rows]

    def count(self, plugin: str = '', kind: str = '') -> int:
        where, args = [], []
        for column, value in (('plugin', plugin), ('kind', kind)):
            if value:
                where.append(f'{column} = ?')
                args.append(value)
        return int(self.db.query(f'select count(*) as n from audit'
                                 f'{" where " + " and ".join(where) if where else ""}',
                                 args)[0]['n'])
