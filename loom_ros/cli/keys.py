"""`loom keys init|issue|revoke|list`: the fleet's certificate authority and one identity per
robot, router, cloud server or operator (loom_ros.security.keys), for mutual TLS on Zenoh and
signed messages. A thin shell: each command prints the paths it made or found."""
from __future__ import annotations

import argparse
import os
import sys

from loom_ros.security import keys

RELOAD_NOTE = (
    'Who must see it: revoked.json is read from each host\'s own keys folder, so copy it next to '
    'ca.pem wherever certificates are checked (cloud servers, routers, robots). A running cloud '
    'server or bridge re-reads it within a second; a router drops a revoked name from its access '
    'control at its next keys check (--watch-s). Zenoh\'s TLS has no revocation list: a router '
    'still lets a revoked certificate connect, and its access control (by certificate name) '
    'cannot tell it from a valid certificate of the same name; to shut it out of the router '
    'too, give the identity a new name, or make a new authority.')


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number of days') from None
    if not 1 <= value <= keys.MAX_DAYS:
        raise argparse.ArgumentTypeError(f'{value} days: use 1 to {keys.MAX_DAYS}')
    return value


def add_parser(sub) -> None:
    p = sub.add_parser('keys', help='fleet credentials: loom keys init | issue NAME --role R | '
                       'revoke NAME | list')
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
    issue.add_argument('--days', type=_days, default=825,
                       help=f'validity (default 825 days, at most {keys.MAX_DAYS})')
    revoke = actions.add_parser('revoke', help='stop trusting an identity\'s current '
                                'certificate (or a copy of an older one: --cert)')
    revoke.add_argument('name', nargs='?', help='identity whose <name>/cert.pem is revoked')
    revoke.add_argument('--cert', help='revoke this certificate file instead (a copy kept of '
                        'one since replaced or deleted)')
    listing = actions.add_parser('list', help='identities in the keys folder')
    for q in (init, issue, revoke, listing):
        q.add_argument('--keys-dir', default=keys.DEFAULT_KEYS_DIR,
                       help=f'credentials folder (default {keys.DEFAULT_KEYS_DIR})')
    for q in (init, issue):
        q.add_argument('--force', action='store_true',
                       help='replace what exists (issue: the replaced certificate is revoked)')
    p.set_defaults(run=run_keys)


def _current_fingerprint(keys_dir, name: str) -> str:
    """The fingerprint of `name`'s certificate now, '' when there is none readable."""
    try:
        cert = keys.keys_path(keys_dir) / name / 'cert.pem'
        return keys.fingerprint(keys.read_small(cert)) if not os.path.islink(cert) else ''
    except (keys.CredentialsError, OSError):
        return ''


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
            before = _current_fingerprint(args.keys_dir, args.name) if args.force else ''
            ident = keys.issue(args.keys_dir, args.name, args.role, days=args.days, hosts=hosts,
                               force=args.force, serve=serve)
            print(f'{ident.name} ({ident.role}{", serves TLS" if keys.can_serve(ident) else ""})'
                  f'\ncertificate: {ident.cert}\nprivate key: {ident.key}\nauthority: {ident.ca}')
            if before and before in keys.read_revocations(args.keys_dir):
                print(f'revoked the certificate it replaced (sha256 {before})\n'
                      f'revocation list: {keys.keys_path(args.keys_dir) / keys.REVOKED_FILE}\n'
                      f'{RELOAD_NOTE}')
        elif args.keys_action == 'revoke':
            if (args.name is None) == (args.cert is None):
                raise keys.CredentialsError('name an identity, or give --cert FILE (not both)')
            pem = None
            if args.cert:
                pem = keys.read_small(keys.keys_path(args.cert))
            entry = keys.revoke(args.keys_dir, args.name, cert_pem=pem)
            print(f'revoked: {entry["name"]} ({entry["role"]}), serial {entry["serial"]}, '
                  f'sha256 {entry["sha256"]}\n'
                  f'revocation list: {keys.keys_path(args.keys_dir) / keys.REVOKED_FILE}\n'
                  f'{RELOAD_NOTE}')
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
