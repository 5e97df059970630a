"""`loom play FILE.mcap`: a recording (`loom record`, rosbag2's MCAP) back onto the ROS graph,
with its original timing (scaled by --rate) or as fast as possible, publishing /clock so nodes
with use_sim_time follow the recording.

The same topics and types as recorded, except actuators: a topic that drives motion, speech or
the e-stop (the inbound contract's `actuators`, robot_control's cmd_vel and estop) is skipped and
counted (`actuator_topic`) unless `--allow-actuator TOPIC` names it. A message is skipped and
counted (never a crash) when its channel's topic is not a valid ROS name, its type is not installed here or was recorded from
another definition, it is over the size limits, or it does not deserialize. A file that stops
being readable (cut short, not MCAP, a record over the limits) ends the play with the reason and
what was played before it. Progress goes to stderr every second; the summary (messages played
per topic, skipped per reason with a first example) is one JSON line on stdout at the end.
A file's read budget (decompressed bytes, by default 256 times its size and at least 64 MiB)
stops a hostile few KB from costing GiBs; a legitimate recording that compresses better than
that (a capped lens, silence) is played with `--max-bytes SIZE`, up to MAX_READ_BYTES.
Exit status: 0 played to the end, 1 the file could not be read to its end, 2 bad arguments.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from loom_ros.bringup.stop_signals import stop_event
from loom_ros.bus.qos import fastdds_environment
from loom_ros.bridge.inbound import ContractError, InboundContract
from loom_ros.config.params import config_dir, read_yaml
from loom_ros.plugins.actuators.config import RobotControlConfig, load_section
from loom_ros.plugins.contract import PluginError
from loom_ros.replay.mcap_source import (
    FILE_BYTES_PER_BYTE, MAX_FILE_BYTES, MIN_FILE_BYTES, Limits, McapSource,
)
from loom_ros.replay.player import ActuatorGuard, MonotonicClock, PlayOptions, Player, Summary

MB = 1 << 20
MAX_READ_BYTES = MAX_FILE_BYTES   # --max-bytes' ceiling (1 TiB: hours of raw camera frames)
RECORD_BYTES = 32                 # the least a message record takes: --max-bytes / this records
SIZE_UNITS = {'': 1, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}


def add_parser(sub) -> None:
    p = sub.add_parser('play', help='play an MCAP recording back onto the ROS graph (/clock too)')
    _arguments(p)
    p.set_defaults(run=lambda args: run(args, args.ros_args))


def _arguments(p) -> None:
    p.add_argument('file', help='MCAP file (loom record, ros2 bag record -s mcap)')
    p.add_argument('--rate', type=float, default=1.0, help='speed factor (2: twice as fast)')
    p.add_argument('--as-fast-as-possible', dest='fast', action='store_true',
                   help='publish without waiting between messages')
    p.add_argument('--loop', action='store_true', help='play again from the start until stopped')
    p.add_argument('--topics', nargs='+', default=None, metavar='TOPIC',
                   help='only these topics (as recorded; a leading / may be left out)')
    p.add_argument('--start', type=float, default=None, metavar='S',
                   help='skip the first S seconds of the recording')
    p.add_argument('--end', type=float, default=None, metavar='E',
                   help='stop at E seconds into the recording')
    p.add_argument('--wait-subscribers', type=float, default=0.0, metavar='SECONDS',
                   help='before a topic\'s first message, wait up to this long for a '
                        'subscriber (0: do not wait)')
    p.add_argument('--drain', type=float, default=5.0, metavar='SECONDS',
                   help='at the end, wait up to this long for the subscribers to acknowledge '
                        'what was played (0: leave at once)')
    p.add_argument('--max-message-mb', type=float, default=64.0,
                   help='skip messages larger than this (MiB)')
    p.add_argument('--max-bytes', default=None, metavar='SIZE',
                   help=f'raise the read budget, the decompressed bytes the file may expand '
                        f'to (default {FILE_BYTES_PER_BYTE} x its size, at least '
                        f'{MIN_FILE_BYTES >> 20}M, so a hostile file cannot cost more), to at '
                        'least SIZE: for a recording that compresses better (a capped lens, '
                        f'silence), e.g. 16G; N, NK, NM, NG or NT, at most '
                        f'{MAX_READ_BYTES >> 40}T')
    p.add_argument('--allow-actuator', action='append', default=[], metavar='TOPIC',
                   help='play this actuator topic too (motion, speech, cmd_vel, estop are '
                        'refused by default: a recording is input from anyone); repeatable')
    p.add_argument('--quiet', action='store_true', help='no progress lines')


def read_size(text: str) -> int:
    """Bytes of a size as `--max-bytes` takes it (`4096`, `512M`, `16G`, `1T`; binary units)."""
    if len(text) > 32:
        raise ValueError(f'--max-bytes: not a size: {text[:40]!r}... (e.g. 16G)')
    text = text.strip().upper().removesuffix('B').removesuffix('I')
    unit = text[-1:] if text[-1:] in SIZE_UNITS else ''
    try:
        value = int(text[:len(text) - len(unit)]) * SIZE_UNITS[unit]
    except ValueError:
        raise ValueError(f'--max-bytes: not a size: {text[:40]!r} (e.g. 16G)') from None
    if not 0 < value <= MAX_READ_BYTES:
        raise ValueError(f'--max-bytes: {value} bytes, must be in (0, {MAX_READ_BYTES >> 40}T]')
    return value


def limits_of(args) -> Limits:
    """The reader's limits from `--max-message-mb` and `--max-bytes` (read_size's bytes): the
    file's budget is then at least that many decompressed bytes, and records to match."""
    max_message = int(args.max_message_mb * MB)
    raised = {} if args.max_bytes is None else dict(
        min_file_bytes=args.max_bytes,
        min_file_records=max(Limits.min_file_records, args.max_bytes // RECORD_BYTES))
    return Limits(max_message_bytes=max_message,
                  max_record_bytes=max(Limits.max_record_bytes, max_message + 64),
                  max_chunk_bytes=max(Limits.max_chunk_bytes, 2 * max_message), **raised)


def options_of(args) -> PlayOptions:
    """PlayOptions from the parsed arguments; ValueError says which one is wrong."""
    topics = None if args.topics is None else frozenset(
        t if t.startswith('/') else f'/{t}' for t in args.topics)
    return PlayOptions(rate=args.rate, fast=args.fast, loop=args.loop, topics=topics,
                       start_s=args.start, end_s=args.end).check()


def actuator_guard(allowed: list[str], inbound_file: str | None = None,
                   actuators_file: str | None = None) -> ActuatorGuard:
    """The topics no recording drives unless allowed: the inbound contract's actuator patterns
    (the same that keep them from the fleet) and robot_control's cmd_vel and e-stop topics."""
    contract = InboundContract.parse(read_yaml(inbound_file or config_dir() / 'inbound.yaml',
                                               ContractError))
    control = load_section('robot_control', RobotControlConfig, None, actuators_file)
    names = frozenset(t.rstrip('/').rsplit('/', 1)[-1] for t in
                      (control.cmd_vel_topic, control.estop_topic))
    return ActuatorGuard(contract.is_actuator, names,
                         frozenset(t if t.startswith('/') else f'/{t}' for t in allowed))


def _progress(summary: Summary, _now: float) -> None:
    skipped = sum(summary.skipped.values())
    print(f'[loom play] t={summary.recording_s:8.2f} s  played {summary.played}  '
          f'skipped {skipped}  filtered {summary.filtered}', file=sys.stderr, flush=True)


def run(args, ros_args: list[str]) -> int:
    try:
        options = options_of(args)
        if not 0 < args.max_message_mb <= 4096:
            raise ValueError('--max-message-mb must be in (0, 4096]')
        if args.max_bytes is not None:
            args.max_bytes = read_size(args.max_bytes)
        if args.wait_subscribers < 0:
            raise ValueError('--wait-subscribers must be >= 0')
        if not 0 <= args.drain <= 3600:
            raise ValueError('--drain must be 0-3600 seconds')
    except ValueError as exc:
        print(f'loom play: {exc}', file=sys.stderr)
        return 2
    try:
        guard = actuator_guard(args.allow_actuator)
    except (ContractError, PluginError) as exc:
        print(f'loom play: cannot tell which topics are actuators: {exc}', file=sys.stderr)
        return 2
    if guard.allowed:
        print(f'loom play: WARNING: playing actuator topics {sorted(guard.allowed)} from '
              f'{args.file}: the robot will act on them', file=sys.stderr, flush=True)
    path = Path(args.file)
    if not path.is_file():
        print(f'loom play: {path}: no such file', file=sys.stderr)
        return 2
    limits = limits_of(args)

    import rclpy
    from rclpy.signals import SignalHandlerOptions

    from loom_ros.replay.ros import RosSink, RosTypes
    from loom_ros.telemetry.logs import mask_node_logger
    # Loom's Fast DDS profile (as bring-up gives its nodes), so recorded camera frames cross
    # to other processes whole; it is read when the participant is made, after this.
    os.environ.update(fastdds_environment(os.environ, config_dir()))
    rclpy.init(args=['loom_play', *ros_args], signal_handler_options=SignalHandlerOptions.NO)
    stop = stop_event()
    node = rclpy.create_node('loom_play')
    mask_node_logger(node)
    types = RosTypes()
    sink = RosSink(node, types, wait_subscribers_s=args.wait_subscribers)
    player = Player(lambda: McapSource(path, types, limits), sink, MonotonicClock(), options,
                    progress=None if args.quiet else _progress, should_stop=stop.is_set,
                    file=str(path), actuators=guard)
    if not args.quiet:
        print(f'[loom play] {path}: playing ' + ('as fast as possible' if options.fast else
                                                f'at {options.rate:g}x'), file=sys.stderr,
              flush=True)
    unacknowledged: list[str] = []
    try:
        summary = player.run()
        if not args.quiet:
            _progress(summary, 0.0)
        if not stop.is_set():
            unacknowledged = sink.drain(args.drain)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    result = summary.as_dict()
    result['no_subscriber'] = sink.unmatched
    result['unacknowledged'] = unacknowledged
    print(json.dumps(result), flush=True)
    return 1 if summary.error else 0


def main(argv=None) -> int:
    from loom_ros.cli import standalone
    return standalone('loom play', __doc__.splitlines()[0], _arguments, run, argv)


if __name__ == '__main__':
    sys.exit(main())
