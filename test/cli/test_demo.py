"""`loom demo` (the README's main job) runs both seed flows across processes (one per robot node,
as launch starts them) and leaves its summary and artifacts; its recording (camera frames
included, `--record-camera`) replays into a fresh router and face agent with the same face
decisions (issue 18). One demo run serves both tests."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from harness import (REPO, WAIT_LIMIT_S, FaceCamera, decision_fields, face_system_config,
                     loom_cli, start_face_system, stop_procs)

CAMERA = '/loom/camera/front'      # the demo runs in the root namespace
DECISIONS = '/router/decisions'
PLAY = '/demo_replay'              # the fresh system's namespace
REPLAY_FRAMES = 30                 # recorded frames played back (3 s of the 10 Hz camera)


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """One `loom demo` run: (exit code, stdout, stderr, output folder)."""
    out = tmp_path_factory.mktemp('demo')
    # A guard against a hang, not a timing bound: up to 120 s of flows after bring-up is ready
    # (it stops at 300 events: 30-60 s here), then bring-up may take STOP_BOUND_S (86 s) to stop
    # under load; under the suite's 300 s per test (pytest.ini).
    limit = 280
    try:
        run = subprocess.run([sys.executable, *loom_cli(
            'demo', '--duration', '120', '--stop-after-events', '300', '--record-camera',
            '--output', str(out))], cwd=REPO, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f'loom demo did not finish in {limit} s\n{exc.stdout}\n{exc.stderr}')
    return run.returncode, run.stdout, run.stderr, out


def test_demo_runs_both_flows_and_leaves_its_artifacts(demo):
    code, out, err, folder = demo
    assert code == 0, out + err
    summary = json.loads((folder / 'summary.json').read_text())
    assert summary['events_total'] >= 300
    assert {'sensor.imu.motion', 'camera.front', 'mic.primary'} <= set(summary['events_received'])
    assert summary['rejected'] == {}
    assert 0 < summary['mean_rate'] <= summary['peak_rate']   # both over the demo's own time
    assert summary['exit_codes'] == {'bringup': 0, 'event_monitor': 0, 'record': 0}
    # It stopped early only once both flows had delivered.
    assert summary['face']['updates'] >= 1 and summary['routes'].get('local', 0) >= 1
    # Camera-to-emoji counts from bring-up's ready line; every sample is kept (runs pool).
    lat = summary['face']['camera_to_emoji_ms']
    assert lat['updates'] + lat['during_bringup']['updates'] == summary['face']['updates']
    assert len(lat['samples_ms']) == lat['updates'] and all(v > 0 for v in lat['samples_ms'])
    assert len(lat['sample_frames_s']) == lat['updates'] and \
        all(t >= 0 for t in lat['sample_frames_s'])
    assert summary['voice']['answers'] and summary['voice']['intents'].get('weather')
    # Tracing off, as a robot runs (its cost would be in the latencies): no trace file.
    assert set(summary['artifacts']) == {'answer.wav', 'recording.mcap'}
    assert summary['tracing'].startswith('as the params file says') and \
        not (folder / 'trace.jsonl').exists()
    assert 'Loom demo summary' in out
    # Camera frames are counted where they enter Loom and where the face flow handled them.
    camera = summary['camera']
    assert camera['frames_sent'] >= 1 and 1 <= camera['frames_handled']
    assert f"{camera['frames_handled']} handled by the face flow" in out


def _demo_recording(path):
    """The demo's face decisions by event id, and its camera frames in file order as
    (event id, seconds from the file's first message, as `loom play --start/--end` count)."""
    from loom_msgs.msg import Event, RouteDecision
    from rclpy.serialization import deserialize_message

    from loom_ros.replay.mcap_source import McapSource
    from loom_ros.replay.player import NS as SECOND
    from loom_ros.replay.ros import RosTypes
    decisions, frames, t0 = {}, [], None
    for m in McapSource(path, RosTypes()).messages():
        t0 = m.log_time_ns if t0 is None else t0
        if m.topic == DECISIONS:
            msg = deserialize_message(m.data, RouteDecision)
            if msg.agent_id == 'face':
                decisions.setdefault(msg.event_id, msg)
        elif m.topic == CAMERA:
            frames.append((deserialize_message(m.data, Event).id, (m.log_time_ns - t0) / SECOND))
    return decisions, frames


def _decided(camera, face, procs) -> list[str]:
    """Frames of ours until the router's decision on one reaches the test (the agent answered
    it, and the decisions' reliable writer knows our reader: none is lost from then on); the ids
    sent."""
    sent = []
    while not any(i in camera.decisions for i in sent):
        sent += camera.warm_up(face, procs)
        assert len(sent) < 1000, 'no decision ever reached the test'
    return sent


def test_the_demos_recording_replays_into_a_fresh_system(demo, ros, spawn, tmp_path,
                                                          monkeypatch):
    """Frames from the demo's recording, played by `loom play` into another namespace, get the
    decisions the demo's face flow made on them. The fresh agent's mailbox holds 100 frames, so
    it decides every frame it receives; the demo's held one (the shipped setting) and decided
    only some (docs/replay.md): those are compared."""
    from loom_ros.bus.qos import fastdds_environment
    from loom_ros.config.params import config_dir
    from loom_ros.sensors.scenes import make_scene
    code, out, err, folder = demo
    assert code == 0, out + err
    # The fresh system: its own namespace and storage root, Loom's Fast DDS profile (as bring-up
    # gives its nodes: 786 KB frames in shared memory), the shipped face settings.
    for name, value in fastdds_environment(os.environ, config_dir()).items():
        monkeypatch.setenv(name, value)
    agents, params = face_system_config(tmp_path)
    camera = FaceCamera(ros, PLAY, name='demo_replay_camera')   # it sees PLAY's decisions
    try:
        procs = start_face_system(spawn, tmp_path, PLAY, agents, params)
        # While they start: the REPLAY_FRAMES frames in which the demo decided the most. Not
        # simply from its first decision: that can fall in the face agent's warm-up, when its
        # one-frame mailbox keeps few frames (a fresh-clone run: the demo decided 1 of the 30
        # from there, where the fresh system found 8 with a face).
        recorded, frames = _demo_recording(folder / 'recording.mcap')
        decided = [int(i in recorded) for i, _ in frames]
        starts = range(max(0, len(frames) - REPLAY_FRAMES) + 1)
        first = max(starts, key=lambda n: (sum(decided[n:n + REPLAY_FRAMES]), -n))
        window = frames[first:first + REPLAY_FRAMES]
        assert len(window) == REPLAY_FRAMES, f'{len(frames)} frames recorded'
        played_ids = {i for i, _ in window}
        expected = {i: m for i, m in recorded.items() if i in played_ids}

        face = np.asarray(Image.fromarray(make_scene('astronaut')).resize((128, 128)))
        warm = _decided(camera, face, procs)   # the agent is active, its decisions reach us
        player = spawn('-m', 'loom_ros.cli.play', str(folder / 'recording.mcap'),
                       '--topics', CAMERA, '--start', repr(window[0][1]),
                       '--end', repr(window[-1][1]), '--wait-subscribers', str(WAIT_LIMIT_S),
                       '--quiet', '--ros-args', '-r', f'{CAMERA}:={PLAY}/loom/camera/front')
        played_code, played_out, played_err = player.finish()
        played = json.loads(played_out.strip().splitlines()[-1])
        assert played_code == 0 and played['played'] == len(window) and not played['skipped'], \
            (played, played_err)
        # Frames of ours after the player's: once a decision on one is here, the agent has
        # handled every frame it got before (one mailbox, in order) and their decisions came
        # before it on the same reliable writer.
        after = _decided(camera, face, procs)
    finally:
        camera.close()
    seen = camera.decisions
    # Nothing from elsewhere: only the played frames and our own.
    assert set(seen) <= played_ids | set(warm) | set(after), set(seen) - played_ids
    replayed = {i: m for i, m in seen.items() if i in played_ids}
    both = sorted(set(replayed) & set(expected))
    for event_id in both:
        assert decision_fields(replayed[event_id]) == decision_fields(expected[event_id])
        assert replayed[event_id].decision_id != expected[event_id].decision_id   # new ids
    counts = (f'{len(window)} frames played, the demo decided {len(expected)} of them, the '
              f'fresh system {len(replayed)}, {len(both)} in both')
    print(counts)
    # Frames are best effort: one lost on the way to the fresh agent is not decided again.
    assert len(both) >= max(3, len(expected) / 2), counts
    # No mailbox drop: as many decisions as the demo made on these frames (up to half the
    # window). Not half the window always: the simulated camera changes scenes by time, and a
    # window that reaches the scene without a face has fewer frames to decide (a fresh-clone
    # run: 30 played, the demo decided 10, the fresh system the same 10).
    assert len(replayed) >= min(len(window) / 2, len(expected)), counts
    stopped = stop_procs(procs)
    assert [code for code, _, _ in stopped] == [0, 0], [(c, e[-3000:]) for c, _, e in stopped]
    assert (tmp_path / PLAY.strip('/') / 'router.db').exists()   # its own history
