"""One trace through an agent and the router, across processes: a source publishes, an agent
process handles the event on its dispatcher thread and emits an intent, and the router, asked
with the intent's traceparent, adds its RouteDecision to the same trace."""
from __future__ import annotations

from pathlib import Path

from loom_ros.telemetry import tracing

HERE = Path(__file__).resolve().parent
AGENTS = """agents:
  - id: tracer
    behavior: counter
    subscriptions: ["trace.agent.in"]
    settings: {intent_every: 1}
"""


def _ros_args(path: Path) -> list[str]:
    return ['-r', '__ns:=/trc', '-p', 'telemetry.tracing.exporter:=file',
            '-p', f'telemetry.tracing.file:={path}', '-p', 'telemetry.metrics.period_s:=0.0',
            '-p', 'telemetry.diagnostics.period_s:=0.0']


def test_trace_continues_through_an_agent_and_the_router(ros, spawn, tmp_path):
    from rclpy.node import Node

    from loom_msgs.srv import Route
    from loom_ros.bus.bus import EventBus
    agents = tmp_path / 'agents.yaml'
    agents.write_text(AGENTS)
    files = {name: tmp_path / f'{name}.jsonl' for name in ('source', 'agent', 'router')}
    procs = [
        spawn(str(HERE / 'trace_relay.py'), 'source', 'trace.agent.in', '--ros-args',
              *_ros_args(files['source'])),
        spawn('-m', 'loom_ros.agents.agent_node', '--ros-args', '-p', 'agent_id:=tracer',
              '-p', f'agents_file:={agents}', '-p', f'storage.root:={tmp_path}',
              *_ros_args(files['agent'])),
        spawn('-m', 'loom_ros.router.router_node', '--ros-args',
              '-p', f'history_db:={tmp_path / "router.db"}', *_ros_args(files['router'])),
    ]
    node = Node('trace_probe', namespace='/trc', context=ros.node.context)
    bus = EventBus(node)
    ros.executor.add_node(node)
    intents = []
    try:
        bus.subscribe('agent.tracer.intent', lambda e, t: intents.append(e))
        ros.wait_for(lambda: intents, 'an intent from the agent', alive=procs)
        intent = intents[0]
        client = node.create_client(Route, 'router/route')
        # Sent again until answered (ros.call): the first request can go out before the router's
        # reply writer has matched this reader, and that answer is lost (a fresh clone's full
        # run). A repeat is one more decision under the same trace parent: the same chain.
        answer = ros.call(client, Route.Request(
            event_id=intent.id, event_type=intent.type, agent_id='tracer', local_supported=True,
            has_local_confidence=True, local_confidence=0.9,
            traceparent=intent.metadata['traceparent']), 'the route decision', alive=procs)
        assert answer.ok

        def spans():
            return {name: tracing.read_spans(str(path)) for name, path in files.items()}

        def chain():
            """The RouteDecision and its ancestors, as far as the span files hold them so far
            (each process's exporter writes in batches)."""
            found = spans()
            by_id = {s['span_id']: s for group in found.values() for s in group}
            links = [s for s in found['router'] if s['name'] == 'RouteDecision'][:1]
            while links and links[-1]['parent_span_id'] in by_id:
                links.append(by_id[links[-1]['parent_span_id']])
            return links
        found = []
        ros.wait_for(lambda: found.append(chain()) or (found[-1] and
                                                        not found[-1][-1]['parent_span_id']),
                     'the whole chain from the RouteDecision to its root', alive=procs)
        chain = found[-1]
        names = [(s['name'], s['service']) for s in reversed(chain)]
        # source publishes > the agent's behavior handles it on a dispatcher thread > the intent
        # it emits is published > the router decides on it
        assert names == [('PublishEvent', 'trace_source'), ('HandleEvent', 'agent_tracer'),
                         ('PublishEvent', 'agent_tracer'), ('RouteDecision', 'router')]
        assert chain[2]['attributes']['loom.agent.id'] == 'tracer'
        assert chain[1]['attributes']['loom.topic'] == 'agent.tracer.intent'
        assert len({s['trace_id'] for s in chain}) == 1 and not chain[-1]['parent_span_id']
    finally:
        ros.executor.remove_node(node)
        bus.destroy()
        node.destroy_node()
