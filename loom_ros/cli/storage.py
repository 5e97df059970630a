"""`loom storage stats|query|compact|keygen|rotate-key`: the storage layer from the command line,
straight on the files under storage.root (no node needed). stats and query open everything
read-only; compact runs lifecycle rounds until nothing is due (refused while a storage node runs
them); keygen writes a master key file for encryption at rest and rotate-key rewraps every data
key under a new master key while the nodes keep running (docs/encryption.md). stats also says
how many fleet erasures are still owed a cloud receipt (storage/pending_erasures.py)."""
from __future__ import annotations

import json
import os
import sys
import time

from loom_ros.security.keyring import (KEYRING_FILE, Keyring, MasterKey, MasterKeySource,
                                      read_key_file, write_key_file)
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.pending_erasures import read_summary
from loom_ros.storage.service import StorageService, default_params, settings_from_params


def add_parser(sub) -> None:
    p = sub.add_parser('storage', help='storage layer: loom storage stats | query | compact')
    actions = p.add_subparsers(dest='storage_action', required=True)
    stats = actions.add_parser('stats', help='rows, bytes and oldest record per tier, budgets')
    query = actions.add_parser('query', help='episodes by time, or memories by meaning')
    query.add_argument('kind', choices=['episodes', 'memories'])
    query.add_argument('text', nargs='?', default='', help='what to search for (memories)')
    query.add_argument('--unit', default='', help="one database (default: all)")
    query.add_argument('--agent', default='')
    query.add_argument('--type', default='')
    query.add_argument('--source', default='')
    query.add_argument('--since-ms', type=int, default=0)
    query.add_argument('--until-ms', type=int, default=2**63 - 1)
    query.add_argument('--limit', type=int, default=20)
    compact = actions.add_parser('compact', help='run the lifecycle until nothing is due')
    compact.add_argument('--rebuild-index', action='store_true',
                         help='make each cold index anew from its rows (no re-embedding)')
    compact.add_argument('--rounds', type=int, default=1000, help='at most this many rounds')
    for q in (stats, query, compact):
        q.add_argument('--root', default='', help='storage.root (default: config/loom.yaml)')
        q.add_argument('--embedder', default='', choices=['', 'minilm', 'hash'])
        q.add_argument('--json', action='store_true', help='machine-readable output')
    keygen = actions.add_parser('keygen', help='write a new master key file (mode 0600) for '
                                'storage.encryption.master_key_file; - prints it instead')
    keygen.add_argument('file', help="where to write it (never over an existing file); '-' "
                        f'prints the key for the environment variable')
    rotate = actions.add_parser('rotate-key', help='rewrap every data key under a new master key '
                                '(no downtime; run again to resume one cut short)')
    rotate.add_argument('--root', default='', help='storage.root (default: the shipped config)')
    rotate.add_argument('--key-file', default='',
                        help='the master key file (default: storage.encryption.master_key_file, '
                        'else the LOOM_STORAGE_MASTER_KEY environment variable)')
    rotate.add_argument('--new-key-file', default='',
                        help='take the new master key from this file (default: generate one, '
                        'with a key file; required with the environment variable)')
    rotate.add_argument('--json', action='store_true', help='machine-readable output')
    p.set_defaults(run=run_storage)


def _service(args, read_only: bool, rebuild: bool = False) -> StorageService:
    params = default_params()
    if args.root:
        params['storage.root'] = args.root
    if args.embedder:
        params['storage.embedder'] = args.embedder
    return StorageService(settings_from_params(params, os.environ), read_only=read_only,
                          rebuild=rebuild)


def run_storage(args) -> int:
    try:
        if args.storage_action == 'keygen':
            return _keygen(args.file)
        if args.storage_action == 'rotate-key':
            return _rotate_key(args)
        if args.storage_action == 'compact':
            service = _service(args, read_only=False, rebuild=args.rebuild_index)
            try:
                if args.rebuild_index:
                    for unit, lc in service.lifecycles.items():
                        print(f'{unit}: cold index rebuilt ({lc.index.ntotal} vectors)')
                for _ in range(max(1, args.rounds)):
                    report = service.run_round()
                    if not any((report.condensed, report.archived, report.deleted,
                                report.archive_deleted, report.budget_deleted)):
                        break
                for lc in service.lifecycles.values():
                    lc.conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')
                _print(service.stats(), args.json)
            finally:
                service.close()
            return 1 if service.error else 0
        service = _service(args, read_only=True)
        try:
            if args.storage_action == 'stats':
                stats = service.stats()
                stats['fleet_erasures'] = read_summary(service.settings.layout.root)
                _print(stats, args.json)
            else:
                found = service.query(args.kind, unit=args.unit, agent_id=args.agent,
                                      type=args.type, source=args.source, text=args.text,
                                      start_ms=args.since_ms, end_ms=args.until_ms,
                                      limit=max(1, min(args.limit, 1000)))
                for item in found:
                    print(json.dumps(item, separators=(',', ':')))
                if not args.json:
                    print(f'({len(found)} {args.kind})', file=sys.stderr)
        finally:
            service.close()
        return 0
    except StorageError as exc:
        print(f'loom storage: {exc}', file=sys.stderr)
        return 1


def _keygen(path: str) -> int:
    key = MasterKey.generate()
    if path == '-':
        print(key.encoded())
        return 0
    write_key_file(path, [key])
    print(f'master key {key.id} written to {path} (mode 0600); set '
          f'storage.encryption.master_key_file to it and keep a copy off this machine: without '
          'it nothing encrypted can be read')
    return 0


def _rotate_key(args) -> int:
    """Make the new master current, rewrap every data key under it, retire the old one. With a
    key file the file holds new and old keys while it runs (running nodes re-read it when they
    meet a key under the new master), then the new key alone."""
    params = default_params()
    root = args.root or str(params.get('storage.root', '~/.loom'))
    key_file = args.key_file or str(params.get('storage.encryption.master_key_file', ''))
    source = MasterKeySource.of(key_file, os.environ)
    given = source.load()
    path = StorageLayout.at(root).keys / KEYRING_FILE
    if not path.is_file():
        raise StorageError(f'{path}: no key table (is storage.encryption on under this root?)')
    keyring = Keyring(path, source)
    try:
        old = keyring.master_id
        if keyring.rotating():
            target = next(k for k in given if k.id == old)     # resume the one cut short
        elif args.new_key_file:
            target = read_key_file(args.new_key_file)[0]
        else:
            target = next((k for k in given if k.id != old), None)
            if target is None and not source.file:
                raise StorageError('the master key comes from LOOM_STORAGE_MASTER_KEY: make one '
                                   '(loom storage keygen FILE) and pass --new-key-file FILE, or '
                                   'list the new key first in LOOM_STORAGE_MASTER_KEY=new,old')
            target = target or MasterKey.generate()
        if source.file:   # both keys in the file while rewrapping: nodes pick up the new one
            write_key_file(source.file, [target] + [k for k in given if k.id != target.id],
                           replace=True)
        result = keyring.rotate(target)
        if source.file:
            write_key_file(source.file, [target], replace=True)
    finally:
        keyring.close()
    result['previous_master_id'] = old
    if args.json:
        print(json.dumps(result))
    else:
        print(f'master key rotated: {old} -> {result["master_id"]}; {result["rewrapped"]} data '
              f'keys rewrapped; retired: {", ".join(result["retired"]) or "-"}')
        if not source.file:
            print(f'now set LOOM_STORAGE_MASTER_KEY to the new key ({result["master_id"]}) '
                  'alone: the old one no longer opens this key table', file=sys.stderr)
    return 0


def _when(ms: int) -> str:
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ms / 1000)) if ms else '-'


def _print(stats: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(stats, indent=1))
        return
    print(f'root {stats["root"]}: {len(stats["units"])} databases ({", ".join(stats["units"])})')
    print(f'{"tier":8} {"rows":>12} {"bytes":>14} {"budget":>14}  oldest')
    for name, tier in stats['tiers'].items():
        budget = tier.get('budget_bytes', 0)
        print(f'{name:8} {tier["rows"]:>12,} {tier["bytes"]:>14,} '
              f'{(f"{budget:,}" if budget else "-"):>14}  {_when(tier["oldest_ms"])}')
    budget = stats['total_budget_bytes']
    print(f'total on disk {stats["total_bytes"]:,} bytes'
          + (f' of {budget:,} ({100 * stats["total_bytes"] / budget:.1f} %)' if budget else ''))
    if stats['rounds']:
        print(f'moved: {stats["condensed"]:,} condensed into {stats["memories"]:,} memories, '
              f'{stats["archived"]:,} archived, {stats["deleted"]:,} deleted, '
              f'{stats["archive_deleted"]:,} archive files and {stats["budget_deleted"]:,} cold '
              'rows deleted for budgets')
        if stats.get('clock_untrusted') or stats.get('budget_unreachable'):
            print(f'skipped: {stats.get("clock_untrusted", 0):,} rounds with an untrusted clock, '
                  f'{stats.get("budget_unreachable", 0):,} past a budget nothing deletable can meet')
    if stats['error']:
        print(f'errors: {stats["error"]}')
    owed = stats.get('fleet_erasures')
    if owed and owed['pending']:
        age_s = max(0, int(time.time() * 1000) - owed['oldest_ms']) / 1000
        print(f'fleet erasures: {owed["pending"]} pending (oldest {age_s:.0f} s, next try '
              f'{_when(owed["next_ms"])}); the storage node retries them'
              + (f'; last error: {owed["last_error"]}' if owed['last_error'] else ''))
    elif owed is not None:
        print(f'fleet erasures: none pending ({owed["done"]} done)')
