"""`loom forget SUBJECT` and `loom export SUBJECT --output FILE`: the right to erasure and the
right of access for one data subject under a storage root (storage/erasure.py), no node needed.
forget refuses while an agent host or the storage node holds a unit database (stop them
first); it audits the request first (no audit, no erasure) and a tombstone after, naming the
subject only by its keyed hash. With a fleet link (config/loom.yaml storage.forget.*, or
--connect) it then asks every cloud server to erase what it kept and prints their signed,
verified receipts (storage/fleet_erasure.py); --no-fleet keeps it to this robot. Exit 0 on
success (the fleet's status is printed, and 2 when a fleet link was asked for and not every
server's receipt came), 1 with the reason otherwise. A fleet erasure without every receipt is
queued under the root (storage/pending_erasures.py) and said ("fleet: pending, will retry"): the
storage node asks again with back-off until a signed receipt verifies; `loom forget
--retry-pending` asks again now for all of them."""
from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys

from loom_ros.bridge.zenoh_link import INSECURE_WARNING
from loom_ros.bus.privacy import SubjectError, check_subject
from loom_ros.config.params import ConfigError, node_defaults
from loom_ros.security.audit import AuditError, AuditLog
from loom_ros.security.keyring import (KEYRING_FILE, MASTER_KEY_ENV, EncryptionSettings,
                                       Keyring, env_master_key_given)
from loom_ros.storage.consent import ConsentError, SubjectRefs
from loom_ros.storage.erasure import export
from loom_ros.storage.errors import StorageError
from loom_ros.storage.fleet_erasure import (
    FleetConfigError, FleetLink, ask_fleet, check_timeout, forget_everywhere, retry_pending,
)
from loom_ros.storage.layout import DEFAULT_ROOT, StorageLayout
from loom_ros.storage.pending_erasures import PendingErasures, pending_path
from loom_ros.storage.service import default_params, object_backend, settings_from_params


def add_parsers(sub) -> None:
    p = sub.add_parser('forget', help='erase everything held about a data subject on this robot')
    p.add_argument('subject', nargs='?', default='')
    p.add_argument('--retry-pending', action='store_true', help='no subject: ask the cloud '
                   'tier again now for every pending fleet erasure under the root (what the '
                   'storage node does on its timer); exit 2 while any stays pending')
    p.add_argument('--requested-by', default='', help='who asked (default cli:<user>); goes '
                   'into the audit tombstone')
    p.add_argument('--json', action='store_true', help='the receipt as JSON')
    p.add_argument('--no-fleet', action='store_true', help='erase on this robot only (do not '
                   'ask the cloud tier)')
    p.add_argument('--fleet-timeout', type=float, default=0.0, help='seconds to wait for the '
                   'cloud servers\' receipts (default: storage.forget.fleet_timeout_s)')
    p.add_argument('--connect', action='append', default=[], help='the fleet router\'s Zenoh '
                   'endpoint (repeatable; default: storage.forget.fleet_connect)')
    p.add_argument('--fleet-server', action='append', default=[], help='a cloud server '
                   'instance that must send a receipt (repeatable; default: '
                   'storage.forget.fleet_servers)')
    p.add_argument('--keys-dir', default='', help='fleet credentials (default: '
                   'storage.forget.keys_dir, else <root>/keys)')
    p.add_argument('--identity', default='', help='this robot\'s identity in them (default: '
                   'storage.forget.identity)')
    p.add_argument('--insecure', action='store_true', help='plain TCP to the fleet router')
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
    if not args.master_key_file and not env_master_key_given():   # also once a keyring took it
        return None
    return Keyring.open(layout.root, EncryptionSettings(True, args.master_key_file), os.environ)


def _backend(layout: StorageLayout):
    """The object store the storage node writes (storage.objects in config/loom.yaml: S3, or
    the local folder under the root), so archives and blobs are erased where they are."""
    params = {**default_params(), 'storage.root': str(layout.root)}
    return object_backend(settings_from_params(params, os.environ))


def _fleet_link(layout: StorageLayout, args) -> FleetLink | None:
    """The fleet link from storage.forget.* in config/loom.yaml, the flags over it; None when
    none is configured or --no-fleet."""
    if args.no_fleet:
        return None
    params = {k: v for k, v in node_defaults('storage').items() if k.startswith('forget.')}
    for flag, key in ((args.connect, 'fleet_connect'), (args.fleet_server, 'fleet_servers'),
                      (args.keys_dir, 'keys_dir'),
                      (args.identity, 'identity'), (args.fleet_timeout, 'fleet_timeout_s')):
        if flag:
            params[f'forget.{key}'] = flag
    if args.insecure:
        params['forget.insecure'] = True
    link = FleetLink.from_params(params, layout.keys, prefix='forget.')
    if link is not None and link.insecure:   # the flag or storage.forget.insecure: said loudly
        print(f'loom forget: WARNING fleet erasure link: {INSECURE_WARNING}', file=sys.stderr,
              flush=True)
    return link


RETRY_LIMIT = 1000   # entries one --retry-pending asks for


def run_retry(args) -> int:
    """`loom forget --retry-pending`: every open entry of the root's queue asked again now."""
    audit = pending = None
    try:
        layout = StorageLayout.at(args.root)
        if not pending_path(layout.root).is_file():
            print('no pending fleet erasure')
            return 0
        link = _fleet_link(layout, args)
        if link is None:
            raise FleetConfigError('no fleet link: set storage.forget.fleet_connect or --connect')
        pending = PendingErasures(layout.root)
        audit = AuditLog(layout.audit)
        results = retry_pending(pending, lambda ref, wait: ask_fleet(link, ref, wait),
                                timeout_s=link.timeout_s, limit=RETRY_LIMIT, audit=audit,
                                servers=link.servers, every=True)
        left = pending.count()
    except (AuditError, StorageError, FleetConfigError, ConfigError) as exc:
        print(f'loom forget: {exc}', file=sys.stderr)
        return 1
    finally:
        for held in (audit, pending):
            if held is not None:
                held.close()
    for r in results:
        print(f'{r.subject_ref}: ' + (f'done ({len(r.receipts)} signed receipts)'
                                      if r.status == 'done' else f'{r.status} ({r.error})'))
    print(f'fleet erasures: {left} pending' + (', will retry' if left else ''))
    return 2 if left else 0


def run_forget(args) -> int:
    if args.retry_pending:
        if args.subject:
            print('loom forget: --retry-pending takes no subject', file=sys.stderr)
            return 1
        return run_retry(args)
    audit = keyring = pending = None
    try:
        check_subject(args.subject)   # before anything is opened or created
        if args.fleet_timeout:
            check_timeout(args.fleet_timeout, '--fleet-timeout')
        layout = StorageLayout.at(args.root)
        if not layout.root.is_dir():
            raise StorageError(f'storage.root {layout.root}: no such folder')
        link = _fleet_link(layout, args)
        keyring = _keyring(layout, args)
        audit = AuditLog(layout.audit)
        if link is not None:
            try:
                pending = PendingErasures(layout.root)
            except StorageError as exc:   # the erasure still runs; the outcome says not queued
                print(f'loom forget: the fleet erasure queue cannot be opened: {exc}',
                      file=sys.stderr)
        outcome = forget_everywhere(
            layout, args.subject, requested_by=_who(args), keyring=keyring, audit=audit,
            refs=SubjectRefs.at(layout.keys),
            fleet=(lambda ref, wait: ask_fleet(link, ref, wait)) if link else None,
            fleet_timeout_s=link.timeout_s if link else 0.0,
            no_fleet_status='skipped' if args.no_fleet else 'not_configured',
            objects=_backend(layout), pending=pending,
            fleet_servers=link.servers if link else ())
    except (SubjectError, ConsentError, AuditError, StorageError, FleetConfigError,
            ConfigError) as exc:
        print(f'loom forget: {exc}', file=sys.stderr)
        return 1
    finally:
        for held in (audit, keyring, pending):
            if held is not None:
                held.close()
    code = 2 if link is not None and outcome.fleet_status != 'done' else 0
    if args.json:
        print(json.dumps(outcome.as_dict()))
        return code
    receipt = outcome.receipt
    print(f'erased data subject {receipt.subject_ref} (audit record {receipt.audit_id})')
    for tier, count in receipt.counts.items():
        print(f'  {tier}\t{count}')
    print(f'fleet: {outcome.fleet_status}' + (f' ({outcome.fleet_error})'
                                               if outcome.fleet_error else ''))
    if outcome.fleet_pending:
        print('fleet: pending, will retry (queued under the storage root; the storage node asks '
              'the cloud tier again until a signed receipt verifies: see loom storage stats)')
    for got in outcome.fleet.receipts if outcome.fleet else []:
        r = got['receipt']
        counts = ', '.join(f'{k} {v}' for k, v in r.get('counts', {}).items())
        print(f"  cloud server {r.get('server', '?')} (signed by {got['signer']}): {counts}; "
              f"{'scrubbed' if r.get('scrubbed') else 'NOT scrubbed yet'}")
    for note in outcome.notes:
        print(f'note: {note}')
    print('not covered: ' + '; '.join(receipt.not_covered))
    return code


def run_export(args) -> int:
    keyring = None
    try:
        check_subject(args.subject)
        layout = StorageLayout.at(args.root)
        keyring = _keyring(layout, args)
        counts = export(layout, args.subject, args.output, keyring=keyring,
                        objects=_backend(layout))
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
