"""The view as a person sees it: `loom view` (a real process) attached over ROS while this test
publishes real camera frames (through a Loom bus, as the camera adapter does), the robot's screen
and route decisions; headless Chromium opens the printed URL (the web viewer served from the
rerun-sdk package, data from the loopback server) and a screenshot must show the frame: many
pixels of the test card's colours, which nothing else in the viewer draws. Skipped, with the
reason, where Chromium is not installed (a Debian package, not part of Loom's setup)."""
from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest

import browser
from harness import WAIT_LIMIT_S, LinePeer, free_port, loom_cli

pytestmark = pytest.mark.skipif(browser.find() is None,
                                reason='chromium is not installed (apt-get install chromium)')

MAGENTA, CYAN = (255, 0, 255), (0, 255, 255)
RENDER_LIMIT_S = 180.0   # the viewer's wasm compiles on SwiftShader on a loaded 2-core machine


def _test_card() -> np.ndarray:
    """A 320x240 frame of magenta and cyan halves: colours the viewer's own UI does not use."""
    card = np.zeros((240, 320, 3), dtype=np.uint8)
    card[:, :160] = MAGENTA
    card[:, 160:] = CYAN
    return card


def _share(image, colour, tolerance: int = 40) -> float:
    pixels = np.asarray(image).astype(int)
    return float((np.abs(pixels - colour).max(axis=2) <= tolerance).mean())


def test_a_browser_shows_the_live_camera_image_and_plots(ros, bus, tmp_path):
    from std_msgs.msg import String

    from loom_msgs.msg import RouteDecision
    from loom_ros.bus.qos import to_qos_profile
    from loom_ros.plugins.perception.image import image_to_msg
    from loom_ros.sensors.camera_adapter_node import frame_to_event
    web, grpc = free_port(), free_port()
    view = LinePeer('view', loom_cli('view', '--web-port', str(web), '--grpc-port', str(grpc)),
                    env=None)
    screen = ros.node.create_publisher(String, 'loom/ui/state', to_qos_profile('batched'))
    decisions = ros.node.create_publisher(RouteDecision, 'router/decisions',
                                          to_qos_profile('batched'))
    firsts, url, sent = set(), None, [0.0]
    card = image_to_msg(_test_card(), 'rgb8', 'camera_front_optical')

    def publish():
        """Five frames a second with the screen and a decision each, as the face flow does."""
        if view.popen.poll() is not None:
            pytest.fail(f'loom view exited with {view.popen.returncode}: '
                        f'{view.popen.stderr.read()[-3000:]}')
        line = view.poll_line(0)
        while line:
            data = json.loads(line) if line.startswith('{') else {}
            nonlocal url
            url = data.get('view', url)
            firsts.update([data['first']] if 'first' in data else [])
            line = view.poll_line(0)
        if time.monotonic() - sent[0] < 0.2:
            return
        sent[0] = time.monotonic()
        bus.publish('camera.front', frame_to_event(card, 'camera.front'))
        screen.publish(String(data=json.dumps({'emoji': '😀', 'label': 'happy',
                                               'boxes': [[40, 40, 120, 140]]})))
        decisions.publish(RouteDecision(agent_id='face', event_type='face.detected',
                                        route='local', rule='threshold', reason='0.99 >= 0.7'))
    try:
        ros.wait_for(lambda: {'image', 'faces', 'route', 'screen'} <= firsts,
                     'the view to show a frame, its faces, the screen and a decision',
                     spin=publish)
        assert url and url.startswith(f'http://127.0.0.1:{web}/')
        chrome = browser.Browser(str(tmp_path / 'profile'))
        try:
            session = chrome.open(url)
            deadline = time.monotonic() + RENDER_LIMIT_S
            shot = None
            while time.monotonic() < deadline:
                publish()
                ros.executor.spin_once(timeout_sec=0.02)
                try:
                    shot = chrome.screenshot(session, limit=max(1.0, deadline - time.monotonic()))
                except TimeoutError:   # the page had no frame to give before the deadline
                    break
                if _share(shot, MAGENTA) > 0.02 and _share(shot, CYAN) > 0.02:
                    break
        finally:
            chrome.close()
        assert shot is not None, f'no screenshot within {RENDER_LIMIT_S:.0f} s'
        shot.save(tmp_path / 'view.png')
        pixels = np.asarray(shot)
        assert pixels.std() > 20, 'a blank page'
        assert _share(shot, MAGENTA) > 0.02 and _share(shot, CYAN) > 0.02, \
            f'no camera frame on the page (see {tmp_path / "view.png"})'
    finally:
        ros.node.destroy_publisher(screen)
        ros.node.destroy_publisher(decisions)
        view.popen.send_signal(2)
        try:
            view.popen.wait(timeout=WAIT_LIMIT_S)
        except subprocess.TimeoutExpired:
            view.popen.kill()
        lines = []
        while (line := view.poll_line(1.0)) is not None:
            lines.append(line)
    summary = json.loads(lines[-1])
    assert view.popen.returncode == 0 and summary['shown']['image'] >= 1, summary
