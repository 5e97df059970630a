"""Fuzzing the YAML config loaders (issue 13, standing test): any text in a params, agents,
policy, plugins or actuators file gives that loader's clear config error (naming the file),
never another exception: arbitrary text, damaged copies of the shipped files, and hostile YAML
(deep nesting, self-referencing aliases)."""
import itertools
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom_ros.agents.config import AgentConfigError, load_agents
from loom_ros.config.params import ConfigError, check_params_file, config_dir, load_params_file
from loom_ros.plugins.actuators.config import UiConfig, load_section
from loom_ros.plugins.contract import PluginError
from loom_ros.plugins.host import PluginsFileError, load_plugins_file
from loom_ros.router.policy import PolicyError, load_policy

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

LOADERS = {   # shipped file, loader, the one error type it may raise
    'loom.yaml': (load_params_file, ConfigError),
    'params': (check_params_file, ConfigError),
    'agents.yaml': (load_agents, AgentConfigError),
    'policy.yaml': (load_policy, PolicyError),
    'plugins.yaml': (load_plugins_file, PluginsFileError),
    'actuators.yaml': (lambda path: load_section('ui', UiConfig, None, path), PluginError),
}
SHIPPED = {name: (config_dir() / ('loom.yaml' if name == 'params' else name)).read_text()
           for name in LOADERS}
_names = itertools.count()
_folder = tempfile.TemporaryDirectory(prefix='loom_fuzz_config_')

json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12)),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
    max_leaves=12)
DEEP = ['[' * 100_000, '[' * 999, '{a: ' * 999, '- ' * 50_000 + 'x']   # one reader for all
HOSTILE = [
    'a: &a {b: *a}\n',                                  # a mapping that contains itself
    'a: &a [*a]\nagents: *a\nplugins: *a\n',
    '/**: &s {ros__parameters: {x: *s}}\n',
    'agents: &l [*l]\n', 'plugins: &l [*l]\n', 'ui: &u {frame_id: *u}\n',
    '\x00\x01\x02', '\ufeff\ufeff: x', 'a: !!python/object:os.system x\n', "a: 'unterminated\n",
    '? [a, b]\n: 1\n', 'a: 1e999999\n', 'a: ' + '9' * 100_000 + '\n',
]


def _load(name: str, text: str) -> None:
    path = Path(_folder.name) / f'{next(_names)}.yaml'
    path.write_text(text, encoding='utf-8', errors='surrogatepass')
    loader, error = LOADERS[name]
    try:
        loader(str(path))
    except error as exc:
        assert str(path) in str(exc) or name in ('agents.yaml', 'actuators.yaml', 'plugins.yaml')
    finally:
        path.unlink()


@pytest.mark.parametrize('name', LOADERS)
@pytest.mark.parametrize('text', HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_yaml(name, text):
    _load(name, text)


@pytest.mark.parametrize('text', DEEP, ids=range(len(DEEP)))
def test_deep_nesting(text):
    _load('loom.yaml', text)


@FUZZ
@given(st.sampled_from(list(LOADERS)), st.text(max_size=300))
def test_arbitrary_text(name, text):
    _load(name, text)


@FUZZ
@given(st.sampled_from(list(LOADERS)), json_value)
def test_arbitrary_yaml_documents(name, value):
    _load(name, yaml.safe_dump(value))


@FUZZ
@given(st.sampled_from(list(LOADERS)), st.lists(st.tuples(st.integers(0, 10**6),
                                                          st.sampled_from(['del', 'dup', 'char']),
                                                          st.characters()), min_size=1, max_size=5))
def test_damaged_shipped_files(name, edits):
    lines = SHIPPED[name].splitlines(keepends=True)
    for pos, how, char in edits:
        i = pos % len(lines)
        if how == 'del':
            del lines[i]
        elif how == 'dup':
            lines.insert(i, lines[i])
        else:
            line = lines[i]
            j = pos % (len(line) or 1)
            lines[i] = line[:j] + char + line[j + 1:]
        if not lines:
            break
    _load(name, ''.join(lines))
