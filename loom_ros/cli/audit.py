"""`loom audit verify|head`: the audit log's hash chain from the command line, read-only on the
file (no node needed). verify exits 0 when every record links to the one before it (and the
published head, if given, is still there with its hash), 1 otherwise, naming the first bad
record; head prints `ID:HASH` of the last record, the line to publish or note elsewhere."""
from __future__ import annotations

import argparse
import json
import sys

from loom_ros.security.audit import AuditError, default_path, read_head, verify_file
from loom_ros.storage.auditchain import MAX_HEAD_CHARS, Head, HeadError
from loom_ros.storage.layout import StorageLayout


def add_parser(sub) -> None:
    p = sub.add_parser('audit', help='audit log chain: loom audit verify | head')
    actions = p.add_subparsers(dest='audit_action', required=True)
    verify = actions.add_parser('verify', help='check every record of the hash chain')
    head_of = verify.add_mutually_exclusive_group()
    head_of.add_argument('--head', default='',
                         help='a head noted before (ID:HASH, from `loom audit head`): it must '
                         'still be there, so a cut tail or a rewritten chain fails')
    head_of.add_argument('--head-file', default='', help='a file whose first line is that head')
    head = actions.add_parser('head', help='the id and hash of the last record')
    for q in (verify, head):
        q.add_argument('--db', default='', help=f'the audit_db (default {default_path()})')
        q.add_argument('--root', default='', help='storage.root: its audit.db')
        q.add_argument('--json', action='store_true', help='machine-readable output')
    p.set_defaults(run=run_audit)


def _path(args) -> str:
    if args.db:
        return args.db
    return str(StorageLayout.at(args.root).audit) if args.root else default_path()


def _published(args) -> Head | None:
    text = args.head
    if args.head_file:
        try:
            with open(args.head_file, encoding='utf-8', errors='replace') as stream:
                text = stream.read(MAX_HEAD_CHARS + 1)
        except OSError as exc:
            raise HeadError(f'{args.head_file}: cannot read: {exc.strerror}') from None
        text = (text.split() or [''])[0]
    return Head.parse(text) if text else None


def run_audit(args) -> int:
    path = _path(args)
    try:
        if args.audit_action == 'head':
            head, count = read_head(path)
            if args.json:
                print(json.dumps({'db': path, 'records': count, 'head_id': head and head.id,
                                  'head_hash': head and head.hash}))
            elif head is None:
                print(f'{path}: no chained record yet ({count} records)')
            else:
                print(head)
                print(f'({path}: {count} records)', file=sys.stderr)
            return 0
        verdict = verify_file(path, _published(args))
    except (AuditError, HeadError) as exc:
        print(f'loom audit: {exc}', file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({'db': path, 'ok': verdict.ok, 'checked': verdict.checked,
                          'before_chain': verdict.before_chain,
                          'chain_start': verdict.chain_start, 'bad_id': verdict.bad_id,
                          'reason': verdict.reason,
                          'head': str(verdict.head) if verdict.head else None}))
    else:
        print(f'{path}: {verdict.describe()}', file=sys.stdout if verdict.ok else sys.stderr)
    return 0 if verdict.ok else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m loom_ros.cli.audit verify|head ...`: the same as `loom audit ...`."""
    parser = argparse.ArgumentParser(prog='loom')
    add_parser(parser.add_subparsers(dest='command', required=True))
    args = parser.parse_args(['audit', *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == '__main__':
    sys.exit(main())
