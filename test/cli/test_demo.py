"""`loom demo` (the README's main job) runs the bus across processes and writes its summary."""
import json

from harness import loom_cli


def test_demo_runs_sensors_and_monitor_and_summarises(spawn, tmp_path):
    demo = spawn(*loom_cli('demo', '--duration', '120', '--stop-after-events', '300',
                           '--output', str(tmp_path)))
    code, out, err = demo.finish(limit=180)
    assert code == 0, out + err
    summary = json.loads((tmp_path / 'bus_summary.json').read_text())
    assert summary['events_total'] >= 300
    assert {'sensor.imu.motion', 'camera.front.face'} <= set(summary['events_received'])
    assert summary['rejected'] == {}
    assert summary['exit_codes'] == {'sim_sensors': 0, 'event_monitor': 0, 'agent_counter': 0}
    # The demo stopped early only after an intent from the agent, which it sends per 100 events
    # handled; its committed state, read from its SQLite file, agrees with its episodic memory.
    assert summary['events_received']['agent.counter.intent'] >= 1
    agent = summary['agent_counter']
    assert agent['events_handled'] == sum(agent['counts'].values()) == agent['episodes'] >= 100
    assert 'Loom demo summary' in out
