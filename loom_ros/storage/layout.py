"""Where everything lives: one root (storage.root, default ~/.loom) and every path derived from
it, so no component invents its own folder and tools read what agents wrote."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from loom_ros.config.params import ParamSpec, declare_parameters
from loom_ros.storage.backend import ObjectSettings
from loom_ros.storage.errors import StorageError

DEFAULT_ROOT = '~/.loom'
# The one parameter every path is derived from; in the params file's `/**` section, so one line
# moves everything a robot keeps (tests and the demo set it to their own folder).
ROOT_PARAMETER = ParamSpec(
    'storage.root', "Folder every file Loom keeps is derived from ('~' expands): databases, "
    'agents, router history, audit, plugin data, keys, traces, recordings, objects', read_only=True)
# With it in `/**`, so every node that writes under the root encrypts alike (docs/encryption.md).
ENCRYPTION_PARAMETERS = [
    ParamSpec('storage.encryption.enabled', 'Encrypt payloads, summaries, blobs and archives at '
              'rest under per-subject keys (docs/encryption.md)', read_only=True),
    ParamSpec('storage.encryption.master_key_file', "The master key's 0600 file ('' = the "
              'LOOM_STORAGE_MASTER_KEY environment variable; never the key itself)',
              read_only=True),
]
# With them in `/**` too, so every process under the root puts its blobs and archives in the same
# store, and erasure finds them there (docs/storage.md, "Blobs").
OBJECT_PARAMETERS = [
    ParamSpec('storage.objects.endpoint', "S3-compatible endpoint (host[:port]) for blobs and "
              "archive files ('' = <storage.root>/objects); keys from LOOM_S3_ACCESS_KEY / "
              'LOOM_S3_SECRET_KEY, never parameters', read_only=True),
    ParamSpec('storage.objects.bucket', 'Bucket of the S3 endpoint', read_only=True),
    ParamSpec('storage.objects.prefix', "Folder in the bucket this robot keeps to ('' = none)",
              read_only=True),
    ParamSpec('storage.objects.secure', 'https to the S3 endpoint', read_only=True),
]
# With it in `/**` too: the root's total byte budget, which every writer under the root stops at
# (storage/budget.py BudgetGate) and the storage node's lifecycle frees space for.
BUDGET_PARAMETER = ParamSpec(
    'storage.budget.total_bytes', 'Bytes every file under storage.root may use together (0: no '
    'limit); writes stop at it with a clear error, nothing committed is lost', read_only=True,
    min_value=0)
# What every node writing under the root declares (node_layout).
STORAGE_PARAMETERS = [ROOT_PARAMETER, *ENCRYPTION_PARAMETERS, *OBJECT_PARAMETERS,
                      BUDGET_PARAMETER]
_NAME = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$')


def check_name(name: str, what: str = 'name') -> str:
    """A file-name part (a unit, an agent, a plugin): letters, digits, _ . -; no path tricks."""
    if not isinstance(name, str) or not _NAME.match(name) or '..' in name:
        raise StorageError(f'{what} {str(name)[:80]!r}: use 1-64 letters, digits, _ . - '
                           '(no path separators)')
    return name


@dataclass(frozen=True)
class StorageLayout:
    """Every path Loom writes, derived from `root`."""

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike = DEFAULT_ROOT) -> 'StorageLayout':
        if not str(root):
            raise StorageError('storage.root: empty path')
        return cls(Path(os.path.expanduser(str(root))).absolute())

    @classmethod
    def of_plugin_data(cls, data_dir: str | os.PathLike) -> 'StorageLayout | None':
        """The layout a plugin's data folder belongs to (`<root>/plugins/<name>`, what the plugin
        host hands a plugin), so a tool finds the agents' memory under the same root the host
        and the agents were given; None when the folder is not laid out that way."""
        if not str(data_dir):
            return None
        folder = Path(os.path.expanduser(str(data_dir))).absolute()
        if folder.parent.name != 'plugins' or folder.parent.parent == folder.parent:
            return None
        return cls(folder.parent.parent)

    # One SQLite database per writing process (its `unit`): see docs/storage.md for why.
    def database(self, unit: str) -> Path:
        return self.root / 'db' / f'{check_name(unit, "storage unit")}.db'

    def databases(self) -> list[Path]:
        folder = self.root / 'db'
        return sorted(folder.glob('*.db')) if folder.is_dir() else []

    def cold_index(self, unit: str) -> Path:
        return self.root / 'cold' / f'{check_name(unit, "storage unit")}.faiss'

    @property
    def objects(self) -> Path:
        """The local object store (blobs and archive files) when no S3 endpoint is configured."""
        return self.root / 'objects'

    @property
    def agents(self) -> Path:
        return self.root / 'agents'

    @property
    def router_history(self) -> Path:
        """The router's history_db as shipped (config/loom.yaml: ~/.loom/router.db)."""
        return self.root / 'router.db'

    @property
    def audit(self) -> Path:
        """The audit log every auditing process shares (their audit_db, as shipped)."""
        return self.root / 'audit.db'

    def plugin_data(self, plugin: str) -> Path:
        return self.root / 'plugins' / check_name(plugin, 'plugin')

    @property
    def recordings(self) -> Path:
        return self.root / 'recordings'

    @property
    def traces(self) -> Path:
        return self.root / 'traces'

    @property
    def keys(self) -> Path:
        return self.root / 'keys'


def node_layout(node, defaults_section: str) -> StorageLayout:
    """Declare `storage.root`, `storage.encryption.*`, `storage.objects.*` and
    `storage.budget.total_bytes` on `node` (once,
    whoever asks first: the node or its telemetry) and return the layout under the root."""
    missing = [spec for spec in STORAGE_PARAMETERS if not node.has_parameter(spec.name)]
    if missing:
        declare_parameters(node, defaults_section, missing)
    return StorageLayout.at(node.get_parameter(ROOT_PARAMETER.name).value)


def node_objects(node, env) -> ObjectSettings:
    """The object store `node` was configured with (node_layout declared it); S3 keys from
    `env` (the process's environment)."""
    return ObjectSettings.from_params(
        {spec.name: node.get_parameter(spec.name).value for spec in OBJECT_PARAMETERS}, env)


def derived(value: str, default: Path) -> str:
    """A path parameter that may override the layout: '' means the path under the root."""
    return str(value) if str(value) else str(default)
