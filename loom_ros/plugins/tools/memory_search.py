"""Memory search tool: an agent's episodic and semantic memory, read-only, through the storage
layer's reader (loom_ros/storage/readers.py), never by opening the agents' files itself.

Where the memory is: under the storage root, in the agents' folder (`<root>/agents`, the
agents' `state_dir`) and in the unit databases (`<root>/db`) of agents hosted on the layer. The
root is the one the plugin host's `data_dir` belongs to (`<root>/plugins`), so the tool, the
agents and the demo agree without a setting of the tool's own; a host whose data_dir is laid
out otherwise (or none) sets `storage_root` in this tool's config. Needs `memory.read`.

Query (`tool.memory.search`), `agent` plus one `mode`:
- `episodic`: `start_ms`, `end_ms`, `type`, `source`, `tag`, `text` (in the payload), `limit`
- `facts`: `entity` (subject or object), `relation`, `text` (anywhere in the fact), `limit`
- `similar`: `query` text and `k`: facts closest in meaning, through the MiniLM embedding the agent
  stored with each fact (the model is loaded on the first such query)
Result (`tool.memory.result`): `{"agent", "mode", "results": [...]}`, Private when it holds any
row (memory keeps no privacy tier per row, so what it recalls stays on the robot). A question
sees only anonymous rows and those of the data subject it names (`loom.subject`; none of
anyone's when it names an invalid one): the reader filters them in SQL before the limit (and
the top k), so one person's memories never answer another's question, never shorten its answer,
and are not counted anywhere (a count of rows left out would tell whether someone else's
memories match a text).
"""
from __future__ import annotations

from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.privacy import SubjectError, event_subject
from loom_ros.plugins.contract import (
    Capability, HealthStatus, Plugin, PluginContext, PluginError, PluginMetadata, PluginResponse,
    PluginType,
)
from loom_ros.plugins.tools import ToolInputError, read_query, result_event
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import DEFAULT_ROOT, StorageLayout
from loom_ros.storage.readers import AgentMemoryReader, NoMemoryError

QUERY = 'tool.memory.search'
RESULT = 'tool.memory.result'


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
        if 'state_dir' in ctx.config:
            raise PluginError("memory_search config: 'state_dir' is gone: the agents' folder is "
                              "<storage root>/agents, the root the host's data_dir is under "
                              "(<root>/plugins); set 'storage_root' only when it is not")
        agents = ctx.config.get('agents', [])
        if not isinstance(agents, list) or not all(isinstance(a, str) for a in agents):
            raise PluginError('memory_search config: agents must be a list of agent ids')
        root = ctx.config.get('storage_root', '')
        if not isinstance(root, str):
            raise PluginError(f'memory_search config: storage_root must be a path, got {root!r}')
        try:
            layout = (StorageLayout.at(root) if root else
                      StorageLayout.of_plugin_data(ctx.data_dir) or StorageLayout.at(DEFAULT_ROOT))
        except StorageError as exc:
            raise PluginError(f'memory_search config: {exc}') from None
        self.reader = AgentMemoryReader(layout, set(agents))   # no agents listed: every agent
        self.max_results = int(ctx.config.get('max_results', 100))
        ctx.require(Capability.MEMORY_READ, detail=str(self.reader.folder))
        self.embedder = None
        self.answered = 0

    def handle_event(self, event: Event) -> PluginResponse:
        query: dict = {}
        try:
            query = read_query(event, QUERY)
            agent, mode = query.get('agent'), query.get('mode', 'episodic')
            search = {'episodic': self._episodic, 'facts': self._facts,
                      'similar': self._similar}.get(mode)
            if search is None:
                raise ToolInputError(f'mode must be episodic, facts or similar, got {mode!r}')
            if not isinstance(agent, str):
                raise ToolInputError(f'agent must be an agent id, got {agent!r}')
            results = search(agent, query, self._asker(event))
            for row in results:
                row.pop('data_subject', None)
        except (ToolInputError, NoMemoryError) as exc:
            return PluginResponse.failure(str(exc))
        except StorageError as exc:
            return PluginResponse.failure(f'memory_search: cannot read the memory of '
                                          f'{query.get("agent")!r}: {exc}')
        self.answered += 1
        answer = result_event(RESULT, {'agent': agent, 'mode': mode, 'results': results},
                              self.metadata.name)
        if results:   # memory keeps no privacy tier per row: what it recalls stays on the robot
            answer.privacy = max(answer.privacy, Privacy.PRIVATE)
        return PluginResponse(events=[answer])

    @staticmethod
    def _asker(event: Event) -> str:
        """The data subject the question names: the reader answers with anonymous rows and
        that subject's alone ('' when it names none or an invalid one: anonymous rows only)."""
        try:
            return event_subject(event)
        except SubjectError:
            return ''

    def _limit(self, query: dict) -> int:
        return _int(query, 'limit', self.max_results, 1, self.max_results)

    def _episodic(self, agent: str, query: dict, asker: str) -> list[dict]:
        return self.reader.episodes(
            agent, start_ms=_int(query, 'start_ms', 0), end_ms=_int(query, 'end_ms', 2**63 - 1),
            type=_text(query, 'type'), source=_text(query, 'source'), tag=_text(query, 'tag'),
            text=_text(query, 'text'), limit=self._limit(query), asker=asker)

    def _facts(self, agent: str, query: dict, asker: str) -> list[dict]:
        return self.reader.facts(agent, entity=_text(query, 'entity'),
                                 relation=_text(query, 'relation'), text=_text(query, 'text'),
                                 limit=self._limit(query), asker=asker)

    def _similar(self, agent: str, query: dict, asker: str) -> list[dict]:
        text = _text(query, 'query')
        if not text.strip():
            raise ToolInputError('similar needs a non-empty "query" text')
        k = _int(query, 'k', 5, 1, self.max_results)
        self.reader.sources(agent)   # a missing or refused agent says so before the model loads
        if self.embedder is None:
            from loom_ros.agents.embedding import MiniLMEmbedder, ModelError
            try:
                self.embedder = MiniLMEmbedder()
            except ModelError as exc:
                raise ToolInputError(f'similar search is unavailable: {exc}') from None
        return self.reader.similar(agent, self.embedder.embed([text])[0], k, asker=asker)

    def health(self) -> HealthStatus:
        return HealthStatus(details={'agents_dir': str(self.reader.folder),
                                     'answered': str(self.answered)})
