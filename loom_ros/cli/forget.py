"""`loom forget SUBJECT` and `loom export SUBJECT --output FILE`: the right to erasure and the
right of access for one data subject under a storage root (storage/erasure.py), no node needed.
forget refuses while an agent host or the storage node holds a unit database (stop them
first); it audits the request first (no audit, no erasure) and a tombstone after, naming the
subject only by its keyed hash. Exit 0 on success, 1 with the reason otherwise."""
from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys

from loom_ros.bus.privacy import SubjectError, check_subject
from loom_ros.security.audit import AuditError, AuditLog
from loom_ros.security.keyring import KEYRING_FILE, MASTER_KEY_ENV, EncryptionSettings, Keyring
from loom_ros.storage.consent import ConsentError, SubjectRefs
from loom_ros.storage.erasure import export, forget
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import DEFAULT_ROOT, StorageLayout


def add_parsers(sub) -> None:
    p = sub.add_parser('forget', help='erase everything held about a data subject on this robot')
    p.add_argument('subject')
    p.add_argument('--requested-by', default='', help='who asked (default cli:<user>); goes '
                   'into the audit tombstone')
    p.add_argument('--json', action='store_true', help='the receipt as JSON')
    q = sub.add_parser('export', help='write everything held about a data subject into one zip')
    q.add_argument('subject')
    q.add_argument('--output', required=True, help='the zip file to write')
    for r in (p, q):
        r.add_argument('--root', default=DEFAULT_ROOT, help=f'storage.root (default '
                       f'{DEFAULT_ROOT})')
        r.add_argument('--master-key-file', default='', help='the storage master key, to read '
                       f'encrypted archives (or {MASTER_KEY_ENV}); without it the subject\'s '
                       'data key is still destroyed')
    p.set_defaults(run=run_forget)
    q.set_defaults(run=run_export)


def _who(args) -> str:
    if args.requested_by:
        return args.requested_by
    user = re.sub(r'[^A-Za-z0-9_.@+\-]', '_', getpass.getuser() or 'unknown')[:56]
    return f'cli:{user}'


def _keyring(layout: StorageLayout, args) -> Keyring | None:
    if not (layout.keys / KEYRING_FILE).is_file():
        return None
    if not args.master_key_file and not os.environ.get(MASTER_KEY_ENV):
        return None
    return Keyring.open(layout.root, EncryptionSettings(True, args.master_key_file), os.environ)


def run_forget(args) -> int:
    audit = keyring = None
    try:
        check_subject(args.subject)   # before anything is opened or created
        layout = StorageLayout.at(args.root)
        if not layout.root.is_dir():
            raise StorageError(f'storage.root {layout.root}: no such folder')
        keyring = _keyring(layout, args)
        audit = AuditLog(layout.audit)
        receipt = forget(layout, args.subject, requested_by=_who(args), keyring=keyring,
                         audit=audit, refs=SubjectRefs.at(layout.keys))
    except (SubjectError, ConsentError, AuditError, StorageError) as exc:
        print(f'loom forget: {exc}', file=sys.stderr)
        return 1
    finally:
        for held in (audit, keyring):
            if held is not None:
                held.close()
    if args.json:
        print(json.dumps(receipt.as_dict()))
        return 0
    print(f'erased data subject {receipt.subject_ref} (audit record {receipt.audit_id})')
    for tier, count in receipt.counts.items():
        print(f'  {tier}\t{count}')
    print('not covered: ' + '; '.join(receipt.not_covered))
    return 0


def run_export(args) -> int:
    keyring = None
    try:
        check_subject(args.subject)
        layout = StorageLayout.at(args.root)
        keyring = _keyring(layout, args)
        counts = export(layout, args.subject, args.output, keyring=keyring)
    except (SubjectError, StorageError, OSError) as exc:
        print(f'loom export: {exc}', file=sys.stderr)
        return 1
    finally:
        if keyring is not None:
            keyring.close()
    print(json.dumps({'output': str(args.output), 'counts': counts}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m loom_ros.cli.forget forget|export ...`: the same as `loom forget|export`."""
    parser = argparse.ArgumentParser(prog='loom')
    add_parsers(parser.add_subparsers(dest='command', required=True))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return args.run(args)


if __name__ == '__main__':
    sys.exit(main())
