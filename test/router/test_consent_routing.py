"""Consent in the router's decision: an event naming a data subject without cloud consent is
routed as LocalOnly, the reason naming the consent (never the subject); consent withdrawn by
another process (`loom consent withdraw`) holds from the next decision; no registry, a failing
one or an invalid subject keep the event local. A real registry on real files throughout."""
from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from harness import WAIT_LIMIT_S
from loom_ros.bus.event import Privacy
from loom_ros.router.decision import CLOUD_ROUTES, RequestError, Route, RouteRequest, decide
from loom_ros.router.policy import RoutingPolicy
from loom_ros.security.audit import AuditLog
from loom_ros.storage.consent import PURPOSES, ConsentRegistry, SubjectRefs, consent_path

POLICY = RoutingPolicy(threshold=0.8, hybrid_floor=0.5, latency_local_ms=100, cost_cap=0.01)
NONE = dict.fromkeys(PURPOSES, False)


@pytest.fixture
def registry(tmp_path):
    audit = AuditLog(tmp_path / 'audit.db')
    reg = ConsentRegistry(consent_path(tmp_path), NONE, audit=audit,
                          refs=SubjectRefs.at(tmp_path / 'keys'))
    yield reg
    reg.close()
    audit.close()


def route(consent, subject='alice', conf=0.3, **request):
    req = RouteRequest(event_type='speech.utterance', local_confidence=conf, subject=subject,
                       **request)
    return decide(req, POLICY, cloud_cost=0.002, consent=consent)


def test_anonymous_events_are_not_affected(registry):
    assert route(registry.lookup, subject='').route is Route.CLOUD
    assert route(None, subject='', conf=0.6).route is Route.HYBRID


def test_a_subject_never_asked_stays_local_and_the_reason_names_the_consent(registry):
    decision = route(registry.lookup)
    assert (decision.route, decision.rule, decision.upload) == (Route.LOCAL, 'consent', 'none')
    assert 'cloud consent not granted (default for subjects never asked)' in decision.reason
    assert 'LocalOnly' in decision.reason and 'alice' not in decision.reason
    assert decision.values == {'consent': 'cloud', 'granted': False, 'asked': False,
                               'source': '', 'changed_ms': 0}


def test_granted_goes_by_the_rules_and_withdrawn_elsewhere_holds_at_once(registry, tmp_path):
    registry.grant('alice', 'cloud', 'app:setup')
    assert route(registry.lookup).route is Route.CLOUD
    assert route(registry.lookup, conf=0.6).route is Route.HYBRID
    assert route(registry.lookup, privacy=Privacy.SENSITIVE).upload == 'embedding'
    assert route(registry.lookup, subject='bob').rule == 'consent'    # per subject
    withdrawn = subprocess.run(
        [sys.executable, '-m', 'loom_ros.cli.consent', 'withdraw', 'alice', 'cloud', '--root',
         str(tmp_path), '--source', 'cli:dpo'], capture_output=True, text=True,
        timeout=WAIT_LIMIT_S)
    assert withdrawn.returncode == 0, withdrawn.stderr
    decision = route(registry.lookup)
    assert (decision.route, decision.rule) == (Route.LOCAL, 'consent')
    assert 'cloud consent withdrawn at' in decision.reason and 'by cli:dpo' in decision.reason
    assert decision.values['source'] == 'cli:dpo' and decision.values['asked'] is True


def test_privacy_still_decides_first_and_no_local_capability_falls_back(registry):
    registry.grant('alice', 'cloud', 'app')
    assert route(registry.lookup, privacy=Privacy.PRIVATE).rule == 'privacy'
    registry.withdraw('alice', 'cloud', 'app')
    decision = route(registry.lookup, local_supported=False)
    assert (decision.route, decision.rule) == (Route.LOCAL_FALLBACK, 'consent')
    assert 'no local capability' in decision.reason


def test_other_purposes_do_not_open_the_cloud(registry):
    for purpose in PURPOSES:
        if purpose != 'cloud':
            registry.grant('alice', purpose, 'app')
    assert route(registry.lookup).rule == 'consent'


def test_no_registry_a_failing_one_or_a_bad_subject_keep_it_local(registry):
    assert 'no consent registry' in route(None).reason
    registry.grant('alice', 'cloud', 'app')
    bad = route(registry.lookup, subject='../alice')
    assert (bad.route, bad.rule, bad.values['valid_subject']) == (Route.LOCAL, 'consent', False)
    assert '../alice' not in bad.reason
    registry.close()                                   # the registry can no longer answer
    failed = route(registry.lookup)
    assert failed.rule == 'consent' and 'cannot answer' in failed.reason
    with pytest.raises(RequestError, match='subject must be a string'):
        route(registry.lookup, subject=None)


def test_a_configured_default_can_allow_the_cloud(tmp_path):
    reader = ConsentRegistry(consent_path(tmp_path), {'cloud': True}, read_only=True)
    assert route(reader.lookup, subject='visitor').route is Route.CLOUD
    reader.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(subject=st.text(min_size=1, max_size=200), conf=st.floats(0.0, 1.0),
       privacy=st.sampled_from(list(Privacy)), local_supported=st.booleans())
def test_no_subject_without_cloud_consent_ever_gets_a_cloud_route(registry, subject, conf,
                                                                   privacy, local_supported):
    decision = route(registry.lookup, subject=subject, conf=conf, privacy=privacy,
                     local_supported=local_supported)
    assert decision.route not in CLOUD_ROUTES and decision.upload == 'none'


def test_the_history_names_a_subject_only_with_store_consent_and_never_trains_on_one(
        registry, tmp_path):
    """Review finding: the router's history kept every subject id it saw, with or without
    `store` consent (and an invalid id as given). It names a subject only with that consent;
    otherwise the row says only that it was someone's, and no such row is training data."""
    import sqlite3
    from loom_ros.router.history import NOT_KEPT, Outcome, RouterHistory
    from loom_ros.router.local import LocalRouter, RouteQuery
    from loom_ros.router.policy import PolicyFile
    registry.grant('alice', 'store', 'app:setup')
    history = RouterHistory(tmp_path / 'history.db', 3600.0)
    router = LocalRouter(PolicyFile(default=POLICY), history, consent=registry.lookup)
    ids = {}
    for who in ('alice', 'bob', ''):
        answer = router.decide(RouteQuery(event_id=f'e-{who or "anon"}', event_type='t',
                                          privacy=Privacy.PUBLIC, local_confidence=0.9,
                                          subject=who))
        ids[who] = answer.decision_id
        router.report(Outcome(answer.decision_id, 't', 'local', 5.0, 0.0, True, 0.9))
    history.close()
    with sqlite3.connect(tmp_path / 'history.db') as conn:
        stored = dict(conn.execute('select event_id, subject from decisions').fetchall())
    assert stored == {'e-alice': 'alice', 'e-bob': NOT_KEPT, 'e-anon': ''}
    assert router.subjects_not_kept == 1
    history = RouterHistory(tmp_path / 'history.db', 3600.0)
    assert len(history.training_rows()) == 1     # the anonymous decision only
    history.close()
