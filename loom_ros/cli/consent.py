"""`loom consent grant|withdraw|show SUBJECT [PURPOSE]`: the consent registry
(<root>/consent.db) from the command line, no node needed. Every change is also a record of the
audit log (<root>/audit.db, or --audit-db), written first: if it cannot be audited it is not
changed. withdraw without a purpose withdraws every purpose; grant needs one (never all at once
by accident). Exit 0 on success, 1 with the reason otherwise."""
from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
import time

from loom_ros.bus.privacy import SubjectError
from loom_ros.config.params import config_dir
from loom_ros.security.audit import AuditError, AuditLog
from loom_ros.storage.consent import (PURPOSES, ConsentError, ConsentRegistry, SubjectRefs,
                                      consent_path, load_defaults)
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import DEFAULT_ROOT, StorageLayout


def add_parser(sub) -> None:
    p = sub.add_parser('consent', help='data subjects\' consent: loom consent grant | withdraw | '
                       'show SUBJECT [PURPOSE]')
    actions = p.add_subparsers(dest='consent_action', required=True)
    grant = actions.add_parser('grant', help='record a yes for one purpose')
    grant.add_argument('subject')
    grant.add_argument('purpose', choices=PURPOSES)
    withdraw = actions.add_parser('withdraw', help='record a no (every purpose when none given)')
    withdraw.add_argument('subject')
    withdraw.add_argument('purpose', nargs='?', choices=PURPOSES)
    show = actions.add_parser('show', help='the subject\'s consent per purpose, and its history')
    show.add_argument('subject')
    show.add_argument('purpose', nargs='?', choices=PURPOSES)
    show.add_argument('--history', action='store_true', help='every recorded change too')
    for q in (grant, withdraw):
        q.add_argument('--source', default='', help='who records it (default cli:<user>)')
        q.add_argument('--audit-db', default='', help='the audit_db (default <root>/audit.db)')
    for q in (grant, withdraw, show):
        q.add_argument('--root', default=DEFAULT_ROOT, help=f'storage.root (default '
                       f'{DEFAULT_ROOT}): its consent.db and keys/')
        q.add_argument('--config', default='', help='consent defaults (default: the shipped '
                       'config/consent.yaml)')
        q.add_argument('--json', action='store_true', help='machine-readable output')
    p.set_defaults(run=run_consent)


def _source(args) -> str:
    if args.source:
        return args.source
    user = re.sub(r'[^A-Za-z0-9_.@+\-]', '_', getpass.getuser() or 'unknown')[:56]
    return f'cli:{user}'


def run_consent(args) -> int:
    layout = StorageLayout.at(args.root)
    audit = None
    try:
        defaults = load_defaults(args.config or config_dir() / 'consent.yaml')
        if args.consent_action == 'show':
            registry = ConsentRegistry(consent_path(layout.root), defaults, read_only=True)
        else:
            audit = AuditLog(args.audit_db or layout.audit)
            registry = ConsentRegistry(consent_path(layout.root), defaults, audit=audit,
                                       refs=SubjectRefs.at(layout.keys))
        try:
            return _act(args, registry)
        finally:
            registry.close()
    except (ConsentError, SubjectError, AuditError, StorageError) as exc:
        print(f'loom consent: {exc}', file=sys.stderr)
        return 1
    finally:
        if audit is not None:
            audit.close()


def _act(args, registry: ConsentRegistry) -> int:
    purposes = [args.purpose] if args.purpose else list(PURPOSES)
    if args.consent_action in ('grant', 'withdraw'):
        source = _source(args)
        states = [registry.set(args.subject, p, args.consent_action == 'grant', source)
                  for p in purposes]
    else:
        states = [registry.lookup(args.subject, p) for p in purposes]
    history = registry.history(args.subject) if getattr(args, 'history', False) else []
    if args.json:
        print(json.dumps({'subject': args.subject, 'consent': {
            s.purpose: {'granted': s.granted, 'asked': s.asked, 'source': s.source,
                        'changed_ms': s.changed_ms} for s in states},
            'history': [vars(c) for c in history]}))
        return 0
    for state in states:
        print(f'{args.subject}\t{state.purpose}\t{"granted" if state.granted else "not granted"}'
              f'\t{state.describe()}')
    for change in history:
        when = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(change.changed_ms / 1000))
        print(f'  #{change.id}\t{when}\t{change.purpose}\t'
              f'{"granted" if change.granted else "withdrawn"}\tby {change.source}')
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m loom_ros.cli.consent grant|withdraw|show ...`: the same as `loom consent ...`."""
    parser = argparse.ArgumentParser(prog='loom')
    add_parser(parser.add_subparsers(dest='command', required=True))
    args = parser.parse_args(['consent', *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == '__main__':
    sys.exit(main())
