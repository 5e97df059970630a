"""Where the bridge's per-event CPU goes: each stage of its Realtime path timed alone, in one
process, by the calling thread's CPU time (time.thread_time, so other work on a shared machine
inflates it less than wall time), median and minimum of 5 rounds of 20,000 calls.

    python bench/bridge_stages.py

Stages: building an Event; the bridge's own work (codec.encode, the privacy gate, Bridge.send
with a transport that only returns, so Zenoh's cost stays out of it); a raw Zenoh put with no
subscriber; and the bus around it, the two ways a bridge gets an event: composed (bus.publish
handing it in-process to a subscription that runs Bridge.send) and in its own process (the bus's
DDS receive path from the CDR bytes: decode, validate, sequence accounting, delivery, Bridge.send;
rclpy's own take is not in it). The raw-Zenoh path a robot app could use instead is
Event + codec.encode + put. Prints a markdown table (microseconds).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault('ROS_DOMAIN_ID', str(150 + os.getpid() % 50))
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'

CALLS, ROUNDS = 20000, 5


class ReturnsTransport:
    """A transport that takes every put and does nothing: the bridge's CPU without Zenoh's."""

    connected = True

    def ready(self, key, level) -> bool:
        return True

    def put(self, key, data, level) -> None:
        return None


def main() -> None:
    import rclpy
    import zenoh

    from loom_ros.bridge import codec
    from loom_ros.bridge.core import Bridge, BridgeConfig
    from loom_ros.bridge.gate import PrivacyGate
    from loom_ros.bus.bus import EventBus, create_bus
    from loom_ros.bus.event import Event
    from loom_ros.bus.qos import TopicQosTable, to_zenoh_options
    from loom_ros.bus.wire import decode_event_message, encode_event_message
    from loom_ros.config.params import node_defaults

    rclpy.init()
    defaults = node_defaults('bridge_bench')
    app = rclpy.create_node('stages_app', namespace='/stages')
    host = rclpy.create_node('zenoh_bridge', namespace='/stages')
    app_bus = EventBus(app, topic_qos=TopicQosTable(defaults['bus.topic_qos'],
                                                    defaults['bus.default_qos']))
    bridge_bus = create_bus(host, 'zenoh_bridge')   # as the bridge node has it (telemetry on)
    config = BridgeConfig.from_params({'robot_id': 'stages', 'out_allow': ['sensor.**'],
                                       'out_deny': [], 'buffer_max_events': 100}, {'rules': []})
    bridge = Bridge(config, ReturnsTransport(), bridge_bus.topic_qos.level_for, PrivacyGate(),
                    lambda record: None)
    topic = 'sensor.imu.motion'
    handler = {'call': lambda event, topic: None}
    bridge_bus.subscribe(topic, lambda event, topic: handler['call'](event, topic))
    endpoint = next(iter(bridge_bus._endpoints.values()))
    event = Event(type='b', payload=b'x' * 100, metadata={'bench.t_ns': '1234567890123'})
    event.validate()
    cdr = [encode_event_message(event, 12345, seq) for seq in range(1, CALLS * ROUNDS + 2)]
    received = iter(cdr)
    session = zenoh.open(zenoh.Config())
    publisher = session.declare_publisher('stages/put', **to_zenoh_options('realtime'))
    sample = codec.encode(event)

    def send(e, t):
        bridge.send(e, t)

    def noop(e, t):
        return None
    stages = [
        ('Event(...) built', None, lambda: Event(type='b', payload=b'x' * 100,
                                                 metadata={'bench.t_ns': '1234567890123'})),
        ('codec.encode', None, lambda: codec.encode(event)),
        ('privacy gate', None, lambda: bridge.gate.refusal(event)),
        ('Bridge.send (transport returns at once)', None, lambda: bridge.send(event, topic)),
        ('raw Zenoh put, no subscriber', None, lambda: publisher.put(sample)),
        ('bus.publish to an in-process subscriber doing nothing', noop,
         lambda: app_bus.publish(topic, event)),
        ('composed: bus.publish to an in-process Bridge.send', send,
         lambda: app_bus.publish(topic, event)),
        ('wire.decode_event_message (CDR bytes to Event)', None,
         lambda: decode_event_message(cdr[0])),
        ('own process: bus DDS receive path to Bridge.send', send,
         lambda: bridge_bus._on_raw_event(next(received), endpoint)),
    ]
    times: dict[str, list[float]] = {name: [] for name, _, _ in stages}
    for _ in range(ROUNDS):
        for name, callback, call in stages:
            if callback is not None:
                handler['call'] = callback
            timer = timeit.Timer(call, timer=time.thread_time)
            times[name].append(timer.timeit(number=CALLS) / CALLS * 1e6)
    session.close()
    rclpy.try_shutdown()
    print(f'load average {os.getloadavg()[0]:.2f} (1 min) at the end\n')
    print('| stage | median us | min us |\n| --- | --- | --- |')
    for name, values in times.items():
        print(f'| {name} | {statistics.median(values):.1f} | {min(values):.1f} |')


if __name__ == '__main__':
    main()
