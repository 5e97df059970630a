"""`loom pub` and `loom echo`: publish and watch Loom events from a shell, like `ros2 topic pub/echo`.

Both are real bus nodes (same config, same QoS table), so they are also what the tests drive.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time

from loom_ros.bringup.stop_signals import on_stop_signal
from loom_ros.bus.event import Event, EventRejected


def add_parsers(sub) -> None:
    pub = sub.add_parser('pub', help='publish events on a Loom topic')
    pub.add_argument('topic', help='Loom topic, e.g. camera.front.face')
    pub.add_argument('event', help='the event as JSON, e.g. \'{"type": "face", "confidence": 0.9}\'')
    pub.add_argument('--qos', help='realtime, batched or background (default: from config)')
    pub.add_argument('--count', type=int, default=1, help='how many to publish (default 1)')
    pub.add_argument('--rate', type=float, default=10.0, help='events per second (default 10)')
    pub.add_argument('--wait-subscribers', type=int, default=0, metavar='N',
                     help='first wait until N subscriptions are matched')
    pub.add_argument('--timeout', type=float, default=30.0,
                     help='seconds to wait for subscribers before giving up (default 30)')
    pub.set_defaults(run=run_pub)

    echo = sub.add_parser('echo', help='print events on Loom topics matching a pattern, as JSON')
    echo.add_argument('pattern', help="topic or pattern: * is one segment, ** any, e.g. 'camera.**'")
    echo.add_argument('--qos', help='realtime, batched or background (default: from config)')
    echo.add_argument('--count', type=int, default=0, help='exit after N events (default: never)')
    echo.add_argument('--timeout', type=float, default=0.0,
                      help='exit with status 1 after this many seconds (default: never)')
    echo.set_defaults(run=run_echo)


def _session(node_name: str, ros_args: list[str]):
    import rclpy
    from rclpy.node import Node
    from rclpy.signals import SignalHandlerOptions

    from loom_ros.bus.bus import create_bus
    from loom_ros.bus.executor import make_executor
    from loom_ros.bus.qos import fastdds_environment
    from loom_ros.config.params import config_dir
    # Loom's Fast DDS profile, as bring-up gives its nodes: a large event (a frame, a hostile
    # megabyte id) fits the shared-memory segment instead of waiting on repairs.
    os.environ.update(fastdds_environment(os.environ, config_dir()))
    rclpy.init(args=['loom', *ros_args], signal_handler_options=SignalHandlerOptions.NO)
    node = Node(node_name)
    bus = create_bus(node, node_name)
    executor = make_executor()
    executor.add_node(node)
    return rclpy, node, bus, executor


def run_pub(args) -> int:
    try:
        event = Event.from_dict(json.loads(args.event))
        event.validate()
    except (json.JSONDecodeError, EventRejected, TypeError) as exc:
        print(f'loom pub: bad event: {exc}', file=sys.stderr)
        return 2
    rclpy, node, bus, executor = _session('loom_pub', args.ros_args)
    from loom_ros.bus.executor import end_process
    try:
        publisher = bus.publisher_for(args.topic, args.qos)
        deadline = time.monotonic() + args.timeout
        while publisher.get_subscription_count() < args.wait_subscribers:
            if time.monotonic() > deadline:
                print(f'loom pub: {publisher.get_subscription_count()} of {args.wait_subscribers} '
                      f'subscribers after {args.timeout:.0f} s', file=sys.stderr)
                return 1
            executor.spin_once(timeout_sec=0.05)
        period = 1.0 / args.rate if args.rate > 0 else 0.0
        base_id = event.id
        for i in range(args.count):
            if i:
                executor.spin_once(timeout_sec=period)
            bus.publish(args.topic, event if args.count == 1 else
                        dataclasses.replace(event, id=f'{base_id}-{i}'), args.qos)
        bus.flush()
        # Give reliable delivery a chance to finish before the publisher goes away.
        if publisher.get_subscription_count():
            publisher.wait_for_all_acked(rclpy.duration.Duration(seconds=5))
        print(json.dumps({'published': args.count, 'topic': args.topic}), flush=True)
        return 0
    except EventRejected as exc:
        print(f'loom pub: {exc}', file=sys.stderr)
        return 2
    finally:
        end_process(executor, node, 'loom pub', 0)


def run_echo(args) -> int:
    rclpy, node, bus, executor = _session('loom_echo', args.ros_args)
    from loom_ros.bus.executor import end_process
    received = 0

    def on_event(event: Event, topic: str) -> None:
        nonlocal received
        received += 1
        print(json.dumps({'topic': topic, **event.to_dict()}), flush=True)

    status = 0
    # Ctrl-C / SIGTERM end the loop between two spins: raised as KeyboardInterrupt inside a
    # callback the EventsExecutor runs, it left the executor's shutdown hanging now and then.
    stop = threading.Event()
    restore = on_stop_signal(lambda _signum: stop.set())
    try:
        bus.subscribe(args.pattern, on_event, args.qos)
        deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
        while (not args.count or received < args.count) and not stop.is_set():
            if deadline is not None and time.monotonic() > deadline:
                status = 1
                break
            executor.spin_once(timeout_sec=0.1)
    except EventRejected as exc:
        print(f'loom echo: {exc}', file=sys.stderr)
        status = 2
    finally:
        restore()
        print(json.dumps({'stats': bus.stats.snapshot()}), file=sys.stderr, flush=True)
        end_process(executor, node, 'loom echo', status)
    return status
