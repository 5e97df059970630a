"""A Zenoh router in a Python process: what tests (and developers without zenohd) run.

    python -m loom_ros.bridge.zenoh_router --listen tls/127.0.0.1:7447 [--keys-dir D] [--fleet F]

Secure by default: it listens only on TLS with mutual authentication, shows the `router`
identity from the keys folder (loom_ros.security.keys), and enforces access control
(loom_ros.security.acl) for every identity whose certificate is in that folder, plus the fleet
file's members and grants. `--insecure` (plain TCP, no rules) is the only way out, and it says
so on stderr. Production fleets run zenohd with the same config (`--print-config`).
It prints one JSON line `{"ready": true, "zid": ..., "listen": [...], "secure": ...}` when it
listens, then serves until SIGINT or SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from loom_ros.bridge.zenoh_link import INSECURE_WARNING, secure_endpoint, session_config
from loom_ros.config.params import ConfigError, read_yaml
from loom_ros.security import acl, keys

MAX_MEMBERS = 10_000   # identities read from a keys folder (each is one certificate parse)


def fleet_identities(keys_dir) -> list[tuple[str, str]]:
    """(name, role) of every identity in the keys folder that the folder's authority signed
    (only certificates are read: a router needs no robot's private key). Others are skipped."""
    root = keys.keys_path(keys_dir)
    ca = (root / 'ca.pem').read_bytes()
    found = []
    for cert in sorted(root.glob('*/cert.pem'))[:MAX_MEMBERS]:
        try:
            name, role = keys.identity_of(cert.read_bytes()[:keys.MAX_CERT_BYTES + 1], ca)
        except (keys.CredentialsError, OSError):
            continue
        if name == cert.parent.name:
            found.append((name, role))
    return found


def read_fleet(path: str) -> tuple[list[tuple[str, str]], dict]:
    """The fleet file: `members: {name: role}` (identities whose certificates are not in the
    keys folder) and `grants: {name: {put|subscribe|query|serve: [key expr]}}`."""
    if not path:
        return [], {}
    data = read_yaml(path) or {}
    if not isinstance(data, dict) or set(data) - {'members', 'grants'}:
        raise ConfigError(f'{path}: expected a mapping with members and grants')
    members = data.get('members') or {}
    grants = data.get('grants') or {}
    if not isinstance(members, dict) or not isinstance(grants, dict):
        raise ConfigError(f'{path}: members and grants are mappings by identity name')
    return [(str(n), str(r)) for n, r in members.items()], grants


def router_access_control(keys_dir, fleet_file: str = '') -> tuple[dict, list[str]]:
    """The access_control config and the member names it covers."""
    extra, grants = read_fleet(fleet_file)
    members = acl.fleet(fleet_identities(keys_dir) + extra, grants)
    return acl.access_control(members), [m.name for m in members]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='zenoh_router', description=__doc__.splitlines()[0])
    parser.add_argument('--listen', action='append', default=[],
                        help='endpoint to listen on (repeatable; default tls/127.0.0.1:7447, '
                        'tcp/127.0.0.1:7447 with --insecure; tcp/ means tls/ when secure)')
    parser.add_argument('--connect', action='append', default=[],
                        help='another router to connect to (repeatable)')
    parser.add_argument('--multicast-scouting', action='store_true',
                        help='let peers find this router by multicast')
    parser.add_argument('--keys-dir', default=keys.DEFAULT_KEYS_DIR,
                        help=f'credentials folder (default {keys.DEFAULT_KEYS_DIR})')
    parser.add_argument('--identity', default='router', help="this router's identity name")
    parser.add_argument('--fleet', default='', help='fleet YAML: extra members and grants')
    parser.add_argument('--insecure', action='store_true',
                        help='plain TCP without authentication or access control (say why)')
    parser.add_argument('--print-config', action='store_true',
                        help='print the access_control JSON (for zenohd) and exit')
    args = parser.parse_args(argv)

    import zenoh
    try:
        if args.insecure:
            identity, rules, members = None, None, []
            listen = args.listen or ['tcp/127.0.0.1:7447']
            print(f'zenoh_router: WARNING {INSECURE_WARNING}', file=sys.stderr, flush=True)
        else:
            identity = keys.load(args.keys_dir, args.identity)
            rules, members = router_access_control(args.keys_dir, args.fleet)
            listen = [secure_endpoint(e) for e in args.listen or ['tls/127.0.0.1:7447']]
            if args.print_config:
                print(json.dumps({'access_control': rules}, indent=2))
                return 0
        session = zenoh.open(session_config('router', args.connect, listen,
                                            args.multicast_scouting, identity=identity,
                                            access_control=rules))
    except (zenoh.ZError, ValueError, keys.CredentialsError, OSError) as exc:
        # ConfigError and AclError are ValueErrors
        print(f'zenoh_router: cannot start: {exc}', file=sys.stderr, flush=True)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(json.dumps({'ready': True, 'zid': str(session.zid()), 'listen': listen,
                      'secure': identity is not None, 'members': members}), flush=True)
    while not stop.wait(0.2):  # polled: a handler calling set() inside a bare wait() can hang
        pass
    session.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
