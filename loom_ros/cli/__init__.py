"""The `loom` command: `loom demo`, `loom pub`, `loom echo` (works where ros2cli is not installed)."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from loom_ros.cli import demo, pubsub
    parser = argparse.ArgumentParser(prog='loom', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    demo.add_parser(sub)
    pubsub.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Everything from --ros-args on goes to rclpy (e.g. -p bus.max_payload_bytes:=1024).
    ros_args: list[str] = []
    if '--ros-args' in argv:
        cut = argv.index('--ros-args')
        argv, ros_args = argv[:cut], argv[cut:]
    args = build_parser().parse_args(argv)
    args.ros_args = ros_args
    return args.run(args) or 0


if __name__ == '__main__':
    sys.exit(main())
