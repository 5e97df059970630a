"""bench/face_flow_stages.py reads a trace file as the demo writes it: each complete face-flow
trace becomes one frame's stages (the ui plugin in plugin_host or in the agent's host); a trace
without a ui_update, a line that is not a span and an oversized line are skipped."""
import json
import subprocess
import sys

from harness import REPO

MS = 1_000_000


def _span(trace, service, name, start_ms, end_ms, topic=''):
    return json.dumps({'name': name, 'trace_id': trace, 'service': service,
                       'start_ns': start_ms * MS, 'end_ns': end_ms * MS,
                       'attributes': {'loom.topic': topic} if topic else {}})


def _frame(trace, base, ui_service):
    return [
        _span(trace, 'camera_adapter', 'PublishEvent', base, base + 2, 'camera.front'),
        _span(trace, 'agent_host_0', 'HandleEvent', base + 5, base + 6, 'camera.front'),
        _span(trace, 'agent_host_0', 'FaceAgent', base + 7, base + 30),
        _span(trace, 'agent_host_0', 'LocalInference', base + 8, base + 20),
        _span(trace, 'agent_host_0', 'PublishEvent', base + 23, base + 24, 'agent.face.action'),
        _span(trace, ui_service, 'HandleEvent', base + 26, base + 29, 'agent.face.action')]


def test_stages_of_complete_traces_only(tmp_path):
    lines = _frame('a', 1000, 'plugin_host') + _frame('b', 1100, 'agent_face') + [
        _span('c', 'camera_adapter', 'PublishEvent', 1200, 1201, 'camera.front'),  # no face
        'not json', '{"name": "PublishEvent"}', 'x' * 70000]
    trace = tmp_path / 'trace.jsonl'
    trace.write_text('\n'.join(lines) + '\n')
    tool = str(REPO / 'bench' / 'face_flow_stages.py')
    done = subprocess.run([sys.executable, tool, str(trace), '--json'], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result['frames'] == 2
    expected = {'adapter_publish': 2, 'to_agent': 5, 'mailbox': 2, 'inference': 12,
                'route': 3, 'to_ui': 3, 'ui': 3, 'total': 29}
    assert {k: v['p50'] for k, v in result['stages_ms'].items()} == expected
    assert {k: v['max'] for k, v in result['stages_ms'].items()} == expected
    table = subprocess.run([sys.executable, tool, str(trace), '--slowest', '1'],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and '2 frames with every span' in table.stdout
    empty = tmp_path / 'empty.jsonl'
    empty.write_text(lines[-3] + '\n')
    none = subprocess.run([sys.executable, tool, str(empty)], capture_output=True, text=True,
                          timeout=60)
    assert none.returncode == 1 and 'no complete face-flow trace' in none.stderr


def test_the_hops_before_the_adapter_and_after_the_ui_come_from_the_stamp_and_the_watcher(
        tmp_path):
    """The adapter's span carries the frame's stamp, the demo's watcher names it in UiStateSeen:
    the two ends the traced stages do not cover, for the frames the watcher saw."""
    def span(trace, service, name, start_ms, end_ms, **attributes):
        return json.dumps({'name': name, 'trace_id': trace, 'service': service,
                           'start_ns': start_ms * MS, 'end_ns': end_ms * MS,
                           'attributes': attributes})
    lines = []
    for trace, base in (('a', 1000), ('b', 1100)):
        frame = _frame(trace, base, 'plugin_host')
        frame[0] = span(trace, 'camera_adapter', 'PublishEvent', base, base + 2,
                        **{'loom.topic': 'camera.front', 'loom.event.timestamp_ms': base - 4})
        lines += frame
    lines += [span('w1', 'loom_demo', 'UiStateSeen', 1036, 1036, **{'loom.frame_ms': 996}),
              span('w2', 'loom_demo', 'UiStateSeen', 9, 9, **{'loom.frame_ms': 'x'}),  # bad
              span('w3', 'loom_demo', 'UiStateSeen', 9, 9)]                              # none
    trace = tmp_path / 'trace.jsonl'
    trace.write_text('\n'.join(lines) + '\n')
    done = subprocess.run([sys.executable, str(REPO / 'bench' / 'face_flow_stages.py'),
                           str(trace), '--json'], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    stages = json.loads(done.stdout)['stages_ms']
    assert stages['total']['frames'] == 2   # both frames have the traced stages
    for name, ms in (('capture', 4), ('to_watcher', 7), ('camera_to_emoji', 40)):
        assert stages[name]['p50'] == ms and stages[name]['frames'] == 1   # only 'a' was seen
