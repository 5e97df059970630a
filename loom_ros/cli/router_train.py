"""`loom router train --from DIR_OR_FILES`: the learned router trained on recorded decisions and
outcomes, evaluated against the rules on held-out recordings (router/train_recorded.py says how
rows, labels and the split are made). Rows of data subjects without `learning` consent in the
storage root's consent registry (read only) are left out, counted and printed. Exit status: 0
evaluated, 1 nothing to train on, 2 bad arguments."""
from __future__ import annotations

import argparse
import json
import sys

from loom_ros.config.params import config_dir
from loom_ros.storage.layout import DEFAULT_ROOT


def add_parser(sub) -> None:
    p = sub.add_parser('router', help='the router: loom router train --from recordings/')
    actions = p.add_subparsers(dest='router_action', required=True)
    train = actions.add_parser('train', help='train the learned router on recordings and '
                                             'compare it with the rules on held-out ones')
    _arguments(train)
    train.set_defaults(run=run)


def _arguments(p) -> None:
    p.add_argument('--from', dest='sources', nargs='+', required=True, metavar='PATH',
                   help='MCAP recordings, or folders searched for *.mcap')
    # Not evaluate.REPO_CONFIG: importing the evaluator pulls in scikit-learn (~2 s), which every
    # `loom` command would pay at start.
    p.add_argument('--policy', default=str(config_dir() / 'policy.yaml'),
                   help='routing policy YAML (prices)')
    p.add_argument('--root', default=DEFAULT_ROOT,
                   help=f'storage.root whose consent registry says whose rows may be learned '
                        f'from (default {DEFAULT_ROOT}; its consent.db, read only)')
    p.add_argument('--consent-config', default='',
                   help='consent defaults (default: the shipped config/consent.yaml)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--max-files', type=int, default=1000, help='refuse more recordings')
    p.add_argument('--max-rows', type=int, default=200_000, help='use at most this many rows')
    p.add_argument('--json', action='store_true', help='print the result as JSON')


def run(args) -> int:
    from loom_ros.router.policy import PolicyError, load_policy
    from loom_ros.router.train_recorded import TrainingError, evaluate_recorded, load, report
    from loom_ros.storage.consent import (ConsentError, ConsentRegistry, consent_path,
                                          load_defaults)
    from loom_ros.storage.errors import StorageError
    if not 1 <= args.max_files <= 100_000 or not 10 <= args.max_rows <= 10_000_000:
        print('loom router train: --max-files in [1, 100000], --max-rows in [10, 10000000]',
              file=sys.stderr)
        return 2
    try:
        policy = load_policy(args.policy)
        registry = ConsentRegistry(
            consent_path(args.root), load_defaults(args.consent_config or
                                                   config_dir() / 'consent.yaml'),
            read_only=True)
    except (PolicyError, ConsentError, StorageError) as exc:
        print(f'loom router train: {exc}', file=sys.stderr)
        return 2
    try:
        result = evaluate_recorded(load(args.sources, args.max_files, args.max_rows,
                                        consent=registry.lookup), policy, args.seed)
    except TrainingError as exc:
        print(f'loom router train: {exc}', file=sys.stderr)
        return 1
    finally:
        registry.close()
    result.pop('model')
    print(json.dumps(result, indent=1, default=str) if args.json else report(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='loom router train', description=__doc__.splitlines()[0])
    _arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
