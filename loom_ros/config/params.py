"""Declare a node's ROS parameters with descriptors, taking defaults from the shipped config/loom.yaml.

The YAML is the single source of defaults, so `ros2 param dump` of a fresh node equals the file.
Sections follow ROS params-file layout: `/**` (every node) and one per node, keyed `/**/<node>` so
they apply in any namespace (`namespace:=robot1` starts `/robot1/router`, which a bare `router:`
key does not match). Bare `<node>` and `/<node>` keys are read too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from difflib import get_close_matches
from functools import lru_cache
from pathlib import Path

import yaml

DEFAULTS_FILE = 'loom.yaml'
# Agent nodes are named agent_<id> (or agent_host_<n>) and declare the `agent` section.
AGENT_SECTION = 'agent'
# Parameters rclpy declares on every node (qos_overrides.* too).
ROS_PARAMETERS = frozenset({'use_sim_time', 'start_type_description_service'})


class ConfigError(ValueError):
    """A config file that cannot be used; names the file, the key and the reason."""


@dataclass(frozen=True)
class ParamSpec:
    """What a node says about one parameter; the default comes from the YAML."""

    name: str
    description: str
    read_only: bool = False
    min_value: float | None = None
    max_value: float | None = None


def config_dir() -> Path:
    """config/ of this checkout when running from source, else share/loom/config of the install."""
    env = os.environ.get('LOOM_CONFIG_DIR')
    if env:
        return Path(env)
    source = Path(__file__).resolve().parents[2] / 'config'
    if (source / DEFAULTS_FILE).is_file():
        return source
    from ament_index_python.packages import get_package_share_directory
    return Path(get_package_share_directory('loom')) / 'config'


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f'{prefix}.{key}' if prefix else str(key), sub, out)
    else:
        out[prefix] = value


def read_yaml(path, error: type[Exception] = None):
    """The parsed YAML of `path`. A file that cannot be read or parsed raises `error` (default
    ConfigError) naming the file and the reason, so every config loader reports alike. A key
    given twice in one mapping is refused: PyYAML keeps the last silently (a second `budget:`
    replaced the first unseen)."""
    error = error or ConfigError
    try:
        with open(path, encoding='utf-8') as stream:
            text = stream.read(MAX_CONFIG_CHARS + 1)
    except OSError as exc:
        raise error(f'{path}: cannot read: {exc.strerror}') from None
    except UnicodeDecodeError as exc:
        raise error(f'{path}: not UTF-8 text: {exc.reason} at byte {exc.start}') from None
    # Limits, not syntax: said as such, outside the parse's "not valid YAML" wrapping.
    if len(text) > MAX_CONFIG_CHARS:
        raise error(f'{path}: larger than {MAX_CONFIG_CHARS} characters')
    if text.count('[') + text.count('{') > _MAX_FLOW_OPENERS:   # PyYAML: quadratic in depth
        raise error(f'{path}: more than {_MAX_FLOW_OPENERS} `[`/`{{` (nested too deep?)')
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as exc:
        raise error(f'{path}: {exc}') from None
    except (yaml.YAMLError, ValueError) as exc:   # ValueError: an integer of 100,000 digits
        raise error(f'{path}: not valid YAML: {str(exc)[:500]}') from None
    except RecursionError:   # PyYAML recurses per nesting level: `- - - - ...`
        raise error(f'{path}: nested too deep for the YAML parser') from None
    _check_shape(data, path, error)
    return data


class _DuplicateKey(Exception):
    """A mapping key given twice; the message has both lines."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping. Checked on the composed nodes,
    before merge keys (`<<: *base`) are expanded, so overriding a merged key stays allowed."""

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == 'tag:yaml.org,2002:merge':
                continue
            first = seen.setdefault((key.tag, key.value), key)
            if first is not key:
                raise _DuplicateKey(
                    f'line {key.start_mark.line + 1}: key {key.value[:80]!r} given twice in one '
                    f'mapping (first on line {first.start_mark.line + 1})')
        return node


MAX_CONFIG_CHARS = 4 * 1024 * 1024
_MAX_CONFIG_NODES = 1_000_000
_MAX_FLOW_OPENERS = 1_000   # the shipped files have under 100


def _check_shape(data, path, error) -> None:
    """Refuse what YAML aliases can build and every loader would choke on: a value that contains
    itself (endless recursion) or one that expands past _MAX_CONFIG_NODES (`billion laughs`)."""
    stack, on_path, count = [(data, False)], set(), 0
    while stack:
        value, leaving = stack.pop()
        if leaving:
            on_path.discard(id(value))
            continue
        count += 1
        if count > _MAX_CONFIG_NODES:
            raise error(f'{path}: more than {_MAX_CONFIG_NODES} values (aliases expanding?)')
        if isinstance(value, (dict, list)):
            if id(value) in on_path:
                raise error(f'{path}: a value contains itself (a recursive YAML alias)')
            on_path.add(id(value))
            stack.append((value, True))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, False) for _, v in items)


def refuse_unknown_keys(data: dict, known, where: str, error: type[Exception] = None) -> None:
    """Raise `error` (default ConfigError) naming `where` and the first key of `data` not in
    `known`: a typo (`out_denny`) must not be silently ignored. Keys are bounded before logging."""
    unknown = [str(k) for k in data if k not in known]
    if unknown:
        raise (error or ConfigError)(
            f'{where}: unknown key {unknown[0][:80]!r} (known: {", ".join(sorted(map(str, known)))})')


def _section_node(section: str) -> str:
    """The node name a params-file section applies to: `/ns/router` and `/**/router` ->
    `router`; `/**` -> `**`."""
    return section.rstrip('/').rsplit('/', 1)[-1]


def by_node(sections: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """{node name or '/**': params} from {section key: params}: `router`, `/router` and
    `/**/router` all count as router's (merged in file order); wildcard-only keys as `/**`."""
    out: dict[str, dict[str, object]] = {}
    for section, params in sections.items():
        node = _section_node(section)
        out.setdefault('/**' if '*' in node else node, {}).update(params)
    return out


def node_section(path: str, node_name: str) -> dict[str, object]:
    """What the params file at `path` sets for `node_name` in its own sections (any key style),
    without the `/**` section."""
    return dict(by_node(load_params_file(path)).get(node_name, {}))


def check_params_file(path: str, defaults_path: str | None = None) -> str:
    """Refuse (ConfigError naming the file, section and key) a params file with a section for no
    Loom node or a parameter that node does not declare; the declared set is config/loom.yaml,
    which test_params keeps equal to what the nodes declare. Returns `path`."""
    defaults_path = defaults_path or str(config_dir() / DEFAULTS_FILE)
    known = by_node(load_params_file(defaults_path))
    every = set().union(*known.values())
    for section, params in load_params_file(path).items():
        node = _section_node(section)
        if '*' in node:            # `/**` or `/ns/*`: any Loom node's parameter
            allowed = every
        else:
            base = node if node in known else AGENT_SECTION if node.startswith('agent_') else None
            if base is None:
                names = ', '.join(sorted(s for s in known if '*' not in s))
                raise ConfigError(f'{path}: unknown node section {section[:80]!r} (Loom nodes: '
                                  f'{names}; agents are agent_<id>)')
            allowed = set(known[base]) | set(known.get('/**', {}))
        unknown = sorted(p for p in params if p not in allowed and p not in ROS_PARAMETERS
                         and not p.startswith('qos_overrides.'))
        if unknown:
            near = get_close_matches(unknown[0], allowed, n=1)
            hint = f'did you mean {near[0]!r}? ' if near else ''
            raise ConfigError(f'{path}: {section[:80]}: unknown parameter {unknown[0][:80]!r} '
                              f'({hint}see {DEFAULTS_FILE} for what {node} declares)')
    return path


def load_params_file(path: str) -> dict[str, dict[str, object]]:
    """{section: {dotted.param: value}} from a ROS params file; ConfigError when malformed.
    Cached per file version, so a file edited in place is read again."""
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise ConfigError(f'{path}: cannot read: {exc.strerror}') from None
    return _load_params_file(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _load_params_file(path: str, _mtime_ns: int, _size: int) -> dict[str, dict[str, object]]:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: expected a mapping of node names to ros__parameters')
    sections = {}
    for section, body in data.items():
        if not isinstance(body, dict) or not isinstance(body.get('ros__parameters'), dict):
            raise ConfigError(f'{path}: section {section!r} has no ros__parameters mapping')
        flat: dict[str, object] = {}
        _flatten('', body['ros__parameters'], flat)
        sections[str(section)] = flat
    return sections


def node_defaults(node_name: str, path: str | None = None) -> dict[str, object]:
    """Defaults for `node_name`: the `/**` section overlaid by the node's own section."""
    path = path or str(config_dir() / DEFAULTS_FILE)
    sections = by_node(load_params_file(path))
    merged = dict(sections.get('/**', {}))
    merged.update(sections.get(node_name, {}))
    return merged


def declare_parameters(node, defaults_section: str, specs: list[ParamSpec]) -> dict[str, object]:
    """Declare each spec on `node` with its YAML default; return {name: current value}."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
    defaults = node_defaults(defaults_section)
    values = {}
    for spec in specs:
        if spec.name not in defaults:
            raise ConfigError(f'{DEFAULTS_FILE}: no default for parameter {spec.name!r} of '
                              f'{defaults_section} (add it under {defaults_section} or /**)')
        default = defaults[spec.name]
        descriptor = ParameterDescriptor(description=spec.description, read_only=spec.read_only)
        if spec.min_value is not None or spec.max_value is not None:
            lo = spec.min_value if spec.min_value is not None else -1e300
            hi = spec.max_value if spec.max_value is not None else 1e300
            if isinstance(default, int) and not isinstance(default, bool):
                descriptor.integer_range = [IntegerRange(from_value=int(max(lo, -2**63)),
                                                         to_value=int(min(hi, 2**63 - 1)), step=0)]
            else:
                descriptor.floating_point_range = [FloatingPointRange(
                    from_value=float(lo), to_value=float(hi), step=0.0)]
        values[spec.name] = node.declare_parameter(spec.name, default, descriptor).value
    return values
