"""The `loom` command: `loom demo`, `loom bringup`, `loom record`, `loom pub`, `loom echo`,
`loom status`, `loom cloud serve`, `loom keys`, `loom storage`, `loom audit`, `loom consent`,
`loom play`, `loom router train`, `loom view` (works where ros2cli is not installed)."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from loom_ros.cli import (
        audit, bringup, consent, demo, forget, keys, play, pubsub, record, router_train, storage,
        view,
    )
    parser = argparse.ArgumentParser(prog='loom', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    demo.add_parser(sub)
    bringup.add_parser(sub)
    record.add_parser(sub)
    pubsub.add_parsers(sub)
    keys.add_parser(sub)
    storage.add_parser(sub)
    audit.add_parser(sub)
    consent.add_parser(sub)
    forget.add_parsers(sub)   # loom forget SUBJECT, loom export SUBJECT --output FILE
    play.add_parser(sub)
    router_train.add_parser(sub)   # loom router train
    view.add_parser(sub)           # loom view (Rerun web viewer)
    status = sub.add_parser('status', help='live view of a running system (loom/metrics, stats)',
                            add_help=False)
    status.add_argument('rest', nargs=argparse.REMAINDER, help='see loom status --help')
    status.set_defaults(run=_run_status)
    cloud = sub.add_parser('cloud', help='the cloud inference tier: loom cloud serve [options]')
    cloud.add_argument('action', choices=['serve'])
    cloud.add_argument('rest', nargs=argparse.REMAINDER, help='see loom cloud serve --help')
    cloud.set_defaults(run=_run_cloud)
    return parser


def _run_status(args) -> int:
    from loom_ros.telemetry import status
    return status.main(args.rest + args.ros_args)


def _run_cloud(args) -> int:
    from loom_ros.cloud import server
    return server.main(args.rest)


def split_ros_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(our arguments, rclpy's): everything from --ros-args on goes to rclpy
    (e.g. -p bus.max_payload_bytes:=1024)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if '--ros-args' in argv:
        cut = argv.index('--ros-args')
        return argv[:cut], argv[cut:]
    return argv, []


def standalone(prog: str, description: str, add_arguments, run, argv=None) -> int:
    """A subcommand run on its own (`python -m loom_ros.cli.<name>`, a launch file's process):
    its arguments before --ros-args, rclpy's after, then `run(args, ros_args)`."""
    argv, ros_args = split_ros_args(argv)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return run(parser.parse_args(argv), ros_args)


def main(argv: list[str] | None = None) -> int:
    argv, ros_args = split_ros_args(argv)
    if argv[:1] == ['status']:   # its own options (and --help) go straight to it
        from loom_ros.telemetry import status
        return status.main(argv[1:] + ros_args) or 0
    args = build_parser().parse_args(argv)
    args.ros_args = ros_args
    return args.run(args) or 0


if __name__ == '__main__':
    sys.exit(main())
