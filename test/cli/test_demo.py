"""`loom demo` (the README's main job) runs both seed flows across processes (one per robot node,
as launch starts them) and leaves its summary and artifacts."""
import json

from harness import loom_cli


def test_demo_runs_both_flows_and_leaves_its_artifacts(spawn, tmp_path):
    demo = spawn(*loom_cli('demo', '--duration', '120', '--stop-after-events', '300',
                           '--output', str(tmp_path)))
    code, out, err = demo.finish(limit=180)
    assert code == 0, out + err
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert summary['events_total'] >= 300
    assert {'sensor.imu.motion', 'camera.front', 'mic.primary'} <= set(summary['events_received'])
    assert summary['rejected'] == {}
    assert summary['exit_codes'] == {'bringup': 0, 'event_monitor': 0, 'record': 0}
    # It stopped early only once both flows had delivered.
    assert summary['face']['updates'] >= 1 and summary['routes'].get('local', 0) >= 1
    assert summary['voice']['answers'] and summary['voice']['intents'].get('weather')
    assert set(summary['artifacts']) == {'answer.wav', 'recording.mcap', 'trace.jsonl'}
    assert 'Loom demo summary' in out
    # Camera frames are counted where they enter Loom and where the face flow handled them.
    camera = summary['camera']
    assert camera['frames_sent'] >= 1 and 1 <= camera['frames_handled']
    assert f"{camera['frames_handled']} handled by the face flow" in out
