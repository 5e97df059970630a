"""A Zenoh router in a Python process: what tests (and developers without zenohd) run.

    python -m loom_ros.bridge.zenoh_router --listen tcp/127.0.0.1:7447

Production fleets run zenohd; this is the same router role from eclipse-zenoh, with multicast
scouting off unless asked for. It prints one JSON line `{"ready": true, "zid": ..., "listen": [...]}`
when it listens, then serves until SIGINT or SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='zenoh_router', description=__doc__.splitlines()[0])
    parser.add_argument('--listen', action='append', default=[],
                        help='endpoint to listen on (repeatable; default tcp/127.0.0.1:7447)')
    parser.add_argument('--connect', action='append', default=[],
                        help='another router to connect to (repeatable)')
    parser.add_argument('--multicast-scouting', action='store_true',
                        help='let peers find this router by multicast')
    args = parser.parse_args(argv)

    import zenoh
    from loom_ros.bridge.zenoh_link import session_config
    listen = args.listen or ['tcp/127.0.0.1:7447']
    try:
        session = zenoh.open(session_config('router', args.connect, listen,
                                            args.multicast_scouting))
    except zenoh.ZError as exc:
        print(f'zenoh_router: cannot start: {exc}', file=sys.stderr, flush=True)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(json.dumps({'ready': True, 'zid': str(session.zid()), 'listen': listen}), flush=True)
    while not stop.wait(0.2):  # polled: a handler calling set() inside a bare wait() can hang
        pass
    session.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
