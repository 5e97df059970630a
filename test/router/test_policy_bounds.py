"""Policy files that loaded and then switched the router's limits off, refused at load: NaN and
infinite model costs (NaN compared false with the cost cap and never added to the spend), a
cloud_model with no cost (every decision failed), a budget period too short to count anything,
and a key given twice (YAML kept the last one silently). Also: a file past the loader's size or
depth limits says so, not "not valid YAML"."""
import pytest

from harness import REPO
from loom_ros.config.params import MAX_CONFIG_CHARS
from loom_ros.router.policy import MIN_BUDGET_PERIOD_S, PolicyError, load_policy


def write(tmp_path, text):
    path = tmp_path / 'policy.yaml'
    path.write_text(text)
    return path


def refused(tmp_path, text) -> str:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    return message


@pytest.mark.parametrize('cost', ['.nan', '.inf', '-.inf', '-0.1'])
def test_a_model_cost_must_be_finite_and_not_negative(tmp_path, cost):
    message = refused(tmp_path, f'models: {{cloud-default: {cost}}}\nbudget: {{limit: 1.0}}\n')
    assert 'models.cloud-default: cost per call must be >= 0 and finite' in message


@pytest.mark.parametrize('text, key', [
    ('event_types: {x: {cloud_model: nosuch}}\n', 'event_types.x.cloud_model'),
    ('agents: {voice: {cloud_model: nosuch}}\n', 'agents.voice.cloud_model'),
    ('default: {cloud_model: nosuch}\n', 'default.cloud_model'),
    # the default's model is cloud-default: a models section without it leaves it with no cost
    ('models: {other: 0.1}\n', 'default.cloud_model'),
], ids=['event_type', 'agent', 'default', 'models_without_the_default'])
def test_every_cloud_model_named_must_have_a_cost(tmp_path, text, key):
    message = refused(tmp_path, text)
    assert f'{key}: ' in message and 'has no cost under models' in message, message


def test_an_override_naming_a_listed_model_loads(tmp_path):
    policy = load_policy(write(tmp_path, 'models: {cloud-default: 0.002, big: 0.5}\n'
                                         'event_types: {x: {cloud_model: big}}\n'))
    assert policy.cost_of(policy.policy_for('x').cloud_model) == 0.5


@pytest.mark.parametrize('period', ['1.0e-320', '0.5', '.inf', '.nan'])
def test_a_budget_period_is_finite_and_at_least_the_minimum(tmp_path, period):
    assert 'budget.period_s: ' in refused(tmp_path, f'budget: {{period_s: {period}}}\n')


def test_the_minimum_period_and_the_shipped_policy_load(tmp_path):
    policy = load_policy(write(tmp_path, f'budget: {{period_s: {MIN_BUDGET_PERIOD_S}}}\n'))
    assert policy.budget.period_s == MIN_BUDGET_PERIOD_S
    assert load_policy(REPO / 'config' / 'policy.yaml').budget.period_s == 86400


@pytest.mark.parametrize('text, key, line, first', [
    ('budget: {limit: 1.0}\ndefault: {threshold: 0.8}\nbudget: {limit: 1000000.0}\n',
     'budget', 3, 1),
    ('default:\n  threshold: 0.9\n  threshold: 0.0\n', 'threshold', 3, 2),
    ('models:\n  m: 0.1\n  "m": 0.0\n', 'm', 3, 2),
], ids=['top_level', 'nested', 'quoted'])
def test_a_key_given_twice_is_refused_with_its_lines(tmp_path, text, key, line, first):
    message = refused(tmp_path, text)
    assert f'line {line}: key {key!r} given twice in one mapping (first on line {first})' in \
        message, message


def test_a_merged_key_may_still_be_overridden(tmp_path):
    policy = load_policy(write(tmp_path, 'agents:\n  voice: &base {threshold: 0.9}\n'
                                         'default:\n  <<: *base\n  threshold: 0.7\n'))
    assert policy.default.threshold == 0.7 and policy.policy_for('', 'voice').threshold == 0.9


def test_limits_of_the_loader_say_what_they_are(tmp_path):
    big = refused(tmp_path, 'x' * (MAX_CONFIG_CHARS + 10))
    assert f'larger than {MAX_CONFIG_CHARS} characters' in big and 'not valid YAML' not in big
    brackets = refused(tmp_path, '[' * 2000)
    assert 'nested too deep' in brackets and 'not valid YAML' not in brackets
    deep = refused(tmp_path, '- ' * 5000 + 'x\n')
    assert 'nested too deep' in deep and 'not valid YAML' not in deep
    assert 'not valid YAML' in refused(tmp_path, 'default: {threshold: [}\n')
