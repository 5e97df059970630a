"""A small Loom node for the tracing test, run as its own process.

    python trace_relay.py source OUT --ros-args ...   publishes a fresh event on OUT every 0.2 s
    python trace_relay.py relay IN OUT --ros-args ...  republishes every event from IN on OUT,
                                                       from inside the subscriber callback
Telemetry (tracing exporter, span file) comes from the --ros-args like any Loom node.
"""
from __future__ import annotations

import sys

from rclpy.node import Node

from loom_ros.bus.bus import create_bus
from loom_ros.bus.event import Event
from loom_ros.bus.executor import run_node


class TraceRelay(Node):

    def __init__(self, mode: str, topics: list[str]):
        super().__init__(f'trace_{mode}')
        self.bus = create_bus(self, f'trace_{mode}')
        if mode == 'source':
            self.out = topics[0]
            self.count = 0
            self.create_timer(0.2, self._tick)
        else:
            self.out = topics[1]
            self.bus.subscribe(topics[0], self._relay)

    def _tick(self) -> None:
        self.count += 1
        self.bus.publish(self.out, Event.with_json('trace.test', {'n': self.count}, source='a'))

    def _relay(self, event: Event, topic: str) -> None:
        # A new event, as an agent would emit: the trace continues through the current span.
        self.bus.publish(self.out, Event(type='trace.relayed', payload=event.payload, source='b'))


def main() -> None:
    args = [a for a in sys.argv[1:]]
    cut = args.index('--ros-args') if '--ros-args' in args else len(args)
    mode, topics = args[0], args[1:cut]
    run_node(lambda: TraceRelay(mode, topics), ['trace_relay', *args[cut:]])


if __name__ == '__main__':
    main()
