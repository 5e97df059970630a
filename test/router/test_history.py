"""Router history in SQLite: spend per budget period, rates, per-backend performance, reopening."""
import pytest

from loom_ros.router.decision import Decision, Route, RouteRequest
from loom_ros.router.history import Outcome, RouterHistory


def test_spend_rates_and_backend_stats_survive_reopening(tmp_path):
    path = tmp_path / 'h.db'
    history = RouterHistory(path, budget_period_s=100.0)
    req = RouteRequest(event_type='speech.utterance', local_confidence=0.7)
    for i, route in enumerate([Route.CLOUD, Route.LOCAL, Route.HYBRID, Route.CLOUD]):
        history.record_decision(f'd{i}', f'e{i}', req, Decision(route, 0.7, 'r', 'why'))
    history.record_outcome(Outcome('d0', 'speech.utterance', 'cloud', 200.0, 0.004, True, 0.9),
                           now=150.0)   # this period (100..200)
    history.record_outcome(Outcome('d3', 'speech.utterance', 'cloud', 400.0, 0.004, False, 0.4),
                           now=99.0)    # the previous period
    history.record_outcome(Outcome('d1', 'speech.utterance', 'local', 12.0, 0.0, True, 0.7),
                           now=160.0)
    assert history.spend(now=199.0) == pytest.approx(0.004)
    assert history.spend(now=201.0) == 0.0  # a new period starts at 200
    history.close()

    reopened = RouterHistory(path, budget_period_s=100.0)
    assert reopened.decisions == 4 and reopened.outcomes == 3
    assert reopened.rates() == {'local': 0.25, 'cloud': 0.5, 'hybrid': 0.25, 'local_fallback': 0.0}
    cloud = reopened.backend_stats('speech.utterance', 'cloud')
    assert cloud == {'n': 2, 'latency_ms': 300.0, 'cost': 0.004, 'success_rate': 0.5,
                     'confidence': pytest.approx(0.65)}
    assert reopened.training_rows() == [{
        'event_type': 'speech.utterance', 'privacy': 0, 'local_confidence': 0.7,
        'payload_bytes': 0, 'latency_budget_ms': None, 'local_ok': 1}]


def test_a_history_file_from_before_the_storage_layer_opens_and_grows(tmp_path):
    """Robots have router.db files written by the old sqlite-utils code (its own column types
    and index names): they open as they are, keep their rows, and take new ones."""
    import sqlite3

    import sqlite_utils
    path = tmp_path / 'router.db'
    old = sqlite_utils.Database(sqlite3.connect(str(path)))
    old['decisions'].create({
        'id': str, 'time': float, 'event_id': str, 'event_type': str, 'agent_id': str,
        'privacy': int, 'route': str, 'rule': str, 'confidence': float, 'cloud_cost': float,
        'local_confidence': float, 'payload_bytes': int, 'latency_budget_ms': float}, pk='id')
    old['outcomes'].create({
        'decision_id': str, 'time': float, 'event_type': str, 'backend': str,
        'latency_ms': float, 'cost': float, 'success': int, 'confidence': float})
    old['outcomes'].create_index(['time'])
    old['decisions'].insert({'id': 'old', 'time': 1.0, 'event_id': 'e', 'event_type': 't',
                             'agent_id': 'a', 'privacy': 0, 'route': 'cloud', 'rule': 'r',
                             'confidence': 0.5, 'cloud_cost': 0.01, 'local_confidence': None,
                             'payload_bytes': 3, 'latency_budget_ms': None})
    old['outcomes'].insert({'decision_id': 'old', 'time': 150.0, 'event_type': 't',
                            'backend': 'cloud', 'latency_ms': 9.0, 'cost': 0.01, 'success': 1,
                            'confidence': 0.5})
    old.close()
    history = RouterHistory(path, budget_period_s=100.0)
    assert history.decisions == 1 and history.outcomes == 1
    history.record_decision('new', 'e2', RouteRequest(event_type='t'),
                            Decision(Route.LOCAL, 0.9, 'r', 'why'))
    history.record_outcome(Outcome('new', 't', 'cloud', 5.0, 0.02, True, 0.9), now=160.0)
    assert history.spend(now=199.0) == pytest.approx(0.03)
    assert history.rates()['local'] == 0.5
    history.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute('pragma journal_mode').fetchone()[0] == 'wal'
        assert conn.execute('pragma integrity_check').fetchone()[0] == 'ok'


def test_a_corrupt_history_file_is_an_sqlite_error_naming_it(tmp_path):
    """The router catches sqlite3.Error to refuse configure with the file and the reason."""
    import sqlite3

    from loom_ros.router.history import HistoryError
    bad = tmp_path / 'router.db'
    bad.write_bytes(b'this is no SQLite file' * 100)
    with pytest.raises(sqlite3.Error) as err:
        RouterHistory(bad, budget_period_s=100.0)
    assert isinstance(err.value, HistoryError)
    assert str(bad) in str(err.value) and 'file is not a database' in str(err.value)
