"""config/agents.yaml: the agents a robot runs, validated with pydantic (key and reason on error)."""
from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loom_ros.bus import topics
from loom_ros.bus.backpressure import BackpressurePolicy, PolicyError
from loom_ros.bus.names import MAX_TOPIC_LENGTH, TopicNameError, TopicPattern
from loom_ros.bus.qos import UnknownQosLevel, parse_level
from loom_ros.config.params import read_yaml, refuse_unknown_keys


MAX_HOST_PLUGINS = 16
# An id is a segment of agent.<id>.intent and agent.<id>.action, which must fit the topic limit.
MAX_AGENT_ID = MAX_TOPIC_LENGTH - len('agent..intent')
# Mailbox and working-memory bounds: counts of events held in memory. The heartbeat carries
# mailbox_size as a uint32 (5e9 made every status publish fail); a million is far past any use.
MAX_MAILBOX_SIZE = 1_000_000
MAX_WORKING_MEMORY = 1_000_000
PLUGIN_NAME = re.compile(r'[A-Za-z](?:_?[A-Za-z0-9])*')   # as the plugins file accepts


class AgentConfigError(ValueError):
    """An agents file that cannot be used; names the file, the key and the reason."""


class DeclassifyRule(BaseModel):
    """A declared, audited exception to "derived events carry the strictest privacy of their
    inputs": what this agent emits as (kind, type) may go out at `to`; each use is audited."""
    model_config = ConfigDict(extra='forbid', frozen=True)

    kind: str = Field(pattern='^(action|intent)$')
    type: str = Field(min_length=1, max_length=256, description='the emitted event type, exact')
    to: str = Field(pattern='^(public|sensitive|private)$', description='the lowest it may go')
    reason: str = Field(min_length=1, max_length=500, description='why: goes to the audit log')


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra='forbid', frozen=True)

    id: str = Field(pattern=r'^[A-Za-z][A-Za-z0-9_]*$', max_length=MAX_AGENT_ID,
                    description=f'also a Loom topic segment; at most {MAX_AGENT_ID} characters')
    behavior: str = Field(min_length=1, description='entry point name in group loom.behaviors')
    subscriptions: list[str] = Field(min_length=1, description='Loom topics or patterns')
    qos: str | None = Field(None, description='QoS level for the subscriptions (default: table): '
                            'realtime, batched or background')
    mailbox_size: int = Field(1000, ge=1, le=MAX_MAILBOX_SIZE, strict=True,
                              description='bounded mailbox, an integer 1 to '
                              f'{MAX_MAILBOX_SIZE}; full: drop the oldest of the lowest priority')
    backpressure: str = Field('', description="admission policy, e.g. 'sample_every:2'")
    working_memory: int = Field(32, ge=1, le=MAX_WORKING_MEMORY, strict=True,
                                description='events kept in the working memory window, an '
                                f'integer 1 to {MAX_WORKING_MEMORY}')
    semantic_memory: bool = Field(False, description='load the embedding model and keep facts')
    persist: str = Field('per_event', pattern='^(per_event|interval)$')
    persist_interval_s: float = Field(1.0, gt=0.0)
    settings: dict = Field(default_factory=dict, description='passed to the behavior')
    declassify: list[DeclassifyRule] = Field(default_factory=list, description='audited '
                                             'exceptions to privacy following the input')
    host_plugins: list[str] = Field(default_factory=list, max_length=MAX_HOST_PLUGINS,
                                    description='entries of the plugins file the agent host '
                                    'runs in its own process (called in-process, no service)')
    own_process: bool = Field(False, description='launch and loom bringup host this agent alone '
                              '(agent_<id>), not with the others in agent_host_0: its latency '
                              'does not share a GIL and a garbage collector with theirs')

    @field_validator('qos')
    @classmethod
    def _known_qos(cls, value: str | None) -> str | None:
        """Checked here with the bus's parser: an unknown level failed activate with no log."""
        if value is None:
            return None
        try:
            return parse_level(value).value
        except UnknownQosLevel as exc:
            raise ValueError(str(exc)[:200]) from None

    def checked(self) -> 'AgentConfig':
        for pattern in self.subscriptions:
            try:
                TopicPattern.parse(pattern)
            except TopicNameError as exc:
                raise AgentConfigError(f'agent {self.id}: subscriptions: {exc}') from None
        try:
            BackpressurePolicy.parse(self.backpressure)
        except PolicyError as exc:
            raise AgentConfigError(f'agent {self.id}: backpressure: {exc}') from None
        try:   # the topics the id names; a TopicNameError escaped with no file or key
            topics.agent_intent(self.id)
            topics.agent_action(self.id)
        except TopicNameError as exc:
            raise AgentConfigError(f'agent {self.id[:80]}: id: {exc}') from None
        for name in self.host_plugins:
            if len(name) > 64 or not PLUGIN_NAME.fullmatch(name):
                raise AgentConfigError(
                    f'agent {self.id}: host_plugins: {name[:64]!r} is not a plugin name (a '
                    'letter first, then letters, digits and single underscores)')
        if len(set(self.host_plugins)) != len(self.host_plugins):
            raise AgentConfigError(f'agent {self.id}: host_plugins: a name appears twice')
        return self


def load_agents(path: str | Path) -> dict[str, AgentConfig]:
    data = read_yaml(path, AgentConfigError)
    if not isinstance(data, dict) or not isinstance(data.get('agents'), list):
        raise AgentConfigError(f'{path}: expected a top-level `agents:` list')
    refuse_unknown_keys(data, {'agents'}, str(path), AgentConfigError)
    agents: dict[str, AgentConfig] = {}
    for i, entry in enumerate(data['agents']):
        try:
            agent = AgentConfig.model_validate(entry).checked()
        except ValidationError as exc:
            err = exc.errors()[0]
            where = '.'.join(str(p) for p in err['loc'])
            raise AgentConfigError(f'{path}: agents[{i}].{where}: {err["msg"]}'
                                   f'{_named(entry)}') from None
        except AgentConfigError as exc:
            raise AgentConfigError(f'{path}: {exc}') from None
        if agent.id in agents:
            raise AgentConfigError(f'{path}: agents[{i}].id: duplicate agent id {agent.id!r}')
        agents[agent.id] = agent
    return agents


def _named(entry: object) -> str:
    """` (agent 'x')` when a refused entry has a string id, so the message names the agent."""
    if isinstance(entry, dict) and isinstance(entry.get('id'), str):
        return f' (agent {entry["id"][:80]!r})'
    return ''
