"""`loom keys init|issue|list`: the fleet's certificate authority and one identity per robot,
router, cloud server or operator (loom_ros.security.keys), for mutual TLS on Zenoh and signed
messages. A thin shell: each command prints the paths it made or found."""
from __future__ import annotations

import sys

from loom_ros.security import keys


def add_parser(sub) -> None:
    p = sub.add_parser('keys', help='fleet credentials: loom keys init | issue NAME --role R | list')
    actions = p.add_subparsers(dest='keys_action', required=True)
    init = actions.add_parser('init', help='create the certificate authority (kept if present)')
    issue = actions.add_parser('issue', help='issue an identity signed by the authority')
    issue.add_argument('name', help='robot id, or router / cloud / an operator name')
    issue.add_argument('--role', required=True, choices=keys.ROLES)
    issue.add_argument('--serve', action='store_true',
                       help='it may also serve TLS (a peer that listens); routers always may, '
                       'other identities are TLS clients only')
    issue.add_argument('--host', action='append', default=[],
                       help='DNS name or IP address a serving identity is reached at '
                       '(repeatable; default localhost and 127.0.0.1): a router or a listening '
                       'peer needs its real address here')
    issue.add_argument('--days', type=int, default=825, help='validity (default 825 days)')
    listing = actions.add_parser('list', help='identities in the keys folder')
    for q in (init, issue, listing):
        q.add_argument('--keys-dir', default=keys.DEFAULT_KEYS_DIR,
                       help=f'credentials folder (default {keys.DEFAULT_KEYS_DIR})')
    for q in (init, issue):
        q.add_argument('--force', action='store_true', help='replace what exists')
    p.set_defaults(run=run_keys)


def run_keys(args) -> int:
    try:
        if args.keys_action == 'init':
            ca = keys.init_ca(args.keys_dir, force=args.force)
            print(f'authority: {ca}\nprivate key: {ca.with_name("ca.key")} (keep it off robots)')
        elif args.keys_action == 'issue':
            serve = args.serve or args.role == 'router'
            if args.host and not serve:
                raise keys.CredentialsError('--host names where an identity serves TLS: add '
                                            '--serve (a peer that listens), or leave it out')
            hosts = tuple(args.host) or ('localhost', '127.0.0.1')
            ident = keys.issue(args.keys_dir, args.name, args.role, days=args.days, hosts=hosts,
                               force=args.force, serve=serve)
            print(f'{ident.name} ({ident.role}{", serves TLS" if keys.can_serve(ident) else ""})'
                  f'\ncertificate: {ident.cert}\nprivate key: {ident.key}\nauthority: {ident.ca}')
        else:
            for entry in keys.list_identities(args.keys_dir):
                ident = entry.identity
                if ident is None:
                    # a folder's name is anyone's: quoted, so it cannot drive the terminal
                    print(f'{ascii(entry.folder[:64])}\tinvalid ({entry.problem})\t'
                          f'{ascii(str(entry.cert)[-300:])}')
                    continue
                use = 'serves TLS' if keys.can_serve(ident) else 'client'
                print(f'{ident.name}\t{ident.role}\t{use}\t{ident.cert}')
    except (keys.CredentialsError, OSError) as exc:
        print(f'loom keys: {exc}', file=sys.stderr)
        return 1
    return 0
