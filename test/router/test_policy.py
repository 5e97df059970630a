"""Policy files: overrides per event type and agent, validation that names the key and reason."""
import pytest

from harness import REPO
from loom_ros.router.policy import PolicyError, load_policy, parse_policy


def test_shipped_policy_loads_and_overrides_apply_in_order():
    policy = load_policy(REPO / 'config' / 'policy.yaml')
    assert policy.policy_for('speech.utterance').threshold == 0.85
    assert policy.policy_for('speech.utterance', 'voice').latency_local_ms == 50
    assert policy.policy_for('other').threshold == 0.8
    assert policy.cost_of('intent-large') == 0.004
    with pytest.raises(PolicyError, match="no cost configured for cloud model 'gpt'"):
        policy.cost_of('gpt')


@pytest.mark.parametrize('data, message', [
    ({'default': {'threshold': 1.5}}, 'default.threshold: Input should be less than or equal to 1'),
    ({'default': {'treshold': 0.5}}, 'default.treshold: Extra inputs are not permitted'),
    ({'default': {'threshold': 0.4, 'hybrid_floor': 0.6}}, 'hybrid_floor (0.6) must not exceed'),
    ({'event_types': {'face': {'cost_cap': -1}}}, 'event_types.face: cost_cap'),
    ({'agents': {'voice': {'sensitive_upload': 'raw'}}}, 'agents.voice: sensitive_upload'),
    ({'models': {'m': -0.1}}, 'models.m: cost per call must be >= 0'),
    ({'budget': {'period_s': 0}}, 'budget.period_s'),
    ([1, 2], 'expected a mapping'),
])
def test_bad_policies_are_refused_with_key_and_reason(data, message):
    with pytest.raises(PolicyError) as info:
        parse_policy(data, 'test.yaml')
    assert message in str(info.value) and str(info.value).startswith('test.yaml')


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / 'p.yaml'
    bad.write_text('default: {threshold: [}\n')
    with pytest.raises(PolicyError, match='not valid YAML'):
        load_policy(bad)
    with pytest.raises(PolicyError, match='cannot read'):
        load_policy(tmp_path / 'missing.yaml')
