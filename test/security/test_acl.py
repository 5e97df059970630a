"""security/acl.py (pure): the access-control config a fleet's router runs. What the rules do on
a real router is tested in test/bridge/test_link_security.py."""
import pytest

from loom_ros.security.acl import AclError, access_control, fleet


def rules_of(config, name):
    policy, = [p for p in config['policies'] if p['subjects'] == [name]]
    return [r for r in config['rules'] if r['id'] in policy['rules']]


def allowed(config, name, flow, message, key_expr):
    return any(r['permission'] == 'allow' and flow in r['flows'] and message in r['messages']
               and key_expr in r['key_exprs'] for r in rules_of(config, name))


def test_roles_hold_their_own_key_space_and_only_the_cloud_serves_loom_cloud():
    config = access_control(fleet([('robot1', 'robot'), ('cloud', 'cloud'), ('ops', 'operator')]))
    assert config['enabled'] and config['default_permission'] == 'deny'
    assert {s['id']: s['cert_common_names'] for s in config['subjects']} == {
        'robot1': ['robot1'], 'cloud': ['cloud'], 'ops': ['ops']}
    assert allowed(config, 'robot1', 'ingress', 'put', 'loom/robot1/**')
    assert allowed(config, 'robot1', 'ingress', 'declare_subscriber', 'loom/robot1/**')
    assert allowed(config, 'robot1', 'ingress', 'query', 'loom/cloud/**')
    assert not any(allowed(config, 'robot1', 'ingress', m, 'loom/cloud/**')
                   for m in ('declare_queryable', 'reply', 'put'))
    assert allowed(config, 'cloud', 'ingress', 'declare_queryable', 'loom/cloud/**')
    assert allowed(config, 'cloud', 'ingress', 'reply', 'loom/cloud/**')
    assert not allowed(config, 'cloud', 'ingress', 'put', 'loom/**')
    assert not allowed(config, 'ops', 'ingress', 'declare_queryable', 'loom/cloud/**')


def test_grants_add_to_a_role_and_bad_grants_are_refused():
    config = access_control(fleet([('robot1', 'robot')],
                                  {'robot1': {'subscribe': ['loom/fleet/**']}}))
    assert allowed(config, 'robot1', 'ingress', 'declare_subscriber', 'loom/fleet/**')
    assert allowed(config, 'robot1', 'egress', 'put', 'loom/fleet/**')
    for grants in ({'robot9': {'put': ['loom/x']}},          # nobody by that name
                   {'robot1': {'publish': ['loom/x']}},       # no such action
                   {'robot1': {'put': ['@/admin/**']}},       # outside loom/
                   {'robot1': {'put': ['loom/x?y=1']}},       # a selector, not a key expression
                   {'robot1': {'put': ['loom/x'] * 65}}):     # too many
        with pytest.raises(AclError):
            fleet([('robot1', 'robot')], grants)
    with pytest.raises(AclError):
        fleet([('robot1', 'admin')])
