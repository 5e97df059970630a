"""launch_testing test of `ros2 launch loom bringup.launch.py`, as a robot runs it: the launch file
starts every node of the table under a namespace with the simulated sensors; every lifecycle node
and the agents become active (the manager's ~/is_active); an event goes through each seed flow
(the astronaut's happy emoji on the UI; the spoken question's transcript on the UI); on shutdown
(launch's SIGINT, what Ctrl-C sends) every process exits 0.

Run: `launch_test test/launch/bringup_launch_checks.py` (test_bringup_launch.py does, where launch,
launch_ros and launch_testing are installed). The Zenoh bridge is left out (bridge:=false): it
needs fleet credentials and a router, which `loom bringup` makes and launch leaves to the fleet.
"""
import json
import os
import tempfile
import time
import unittest
from pathlib import Path

import launch_testing
import launch_testing.actions
import launch_testing.asserts
import yaml
from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource

NAMESPACE = 'launch_test'
LIMIT_S = 240.0   # upper bound on each wait (a loaded 2-core machine); reaching it fails


def _params(tmp: Path) -> str:
    share = Path(get_package_share_directory('loom'))
    data = yaml.safe_load((share / 'config' / 'loom.yaml').read_text())

    def section(name):
        return data[f'/**/{name}']['ros__parameters']
    section('sim_sensors').update(imu_rate_hz=20.0, camera_rate_hz=5.0, mic_gap_s=1.0,
                                  camera_scenes=['astronaut'],
                                  mic_utterances=['what is the weather in london'])
    section('router')['history_db'] = str(tmp / 'router.db')
    section('plugin_host').update(audit_db=str(tmp / 'audit.db'), data_dir=str(tmp / 'plugins'))
    data['/**']['ros__parameters'].setdefault('storage', {})['root'] = str(tmp)   # every file
    path = tmp / 'params.yaml'
    path.write_text(yaml.safe_dump(data))
    return str(path)


def generate_test_description():
    tmp = Path(tempfile.mkdtemp(prefix='loom_launch_test_'))
    bringup = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(
            get_package_share_directory('loom'), 'launch', 'bringup.launch.py')),
        launch_arguments={'namespace': NAMESPACE, 'sim_sensors': 'true', 'bridge': 'false',
                          'params_file': _params(tmp)}.items())
    return LaunchDescription([bringup, launch_testing.actions.ReadyToTest()]), {}


class TestBringup(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        import rclpy
        rclpy.init()
        cls.node = rclpy.create_node('loom_launch_test')

    @classmethod
    def tearDownClass(cls):
        import rclpy
        cls.node.destroy_node()
        rclpy.shutdown()

    def _spin_until(self, condition, what: str) -> None:
        import rclpy
        deadline = time.monotonic() + LIMIT_S
        while not condition():
            self.assertLess(time.monotonic(), deadline, f'timed out waiting for {what}')
            rclpy.spin_once(self.node, timeout_sec=0.1)

    def _call(self, srv_type, name: str, request, resend_s: float = 5.0):
        """A request that is safe to repeat (a query), sent again every `resend_s` until one
        answer comes: `service_is_ready` can be true before the server's reply writer has
        matched this new client's reply reader, and then the answer is lost (test/conftest.py's
        RosHarness.call does the same)."""
        import rclpy
        client = self.node.create_client(srv_type, name)
        try:
            self._spin_until(client.service_is_ready, name)
            deadline = time.monotonic() + LIMIT_S
            while True:
                future = client.call_async(request)
                resend = min(deadline, time.monotonic() + resend_s)
                while not future.done() and time.monotonic() < resend:
                    rclpy.spin_once(self.node, timeout_sec=0.1)
                if future.done():
                    return future.result()
                client.remove_pending_request(future)
                self.assertLess(time.monotonic(), deadline,
                                f'timed out waiting for {name} to answer')
        finally:
            self.node.destroy_client(client)

    def test_every_node_is_active_and_an_event_goes_through_each_flow(self):
        from lifecycle_msgs.srv import GetState
        from std_msgs.msg import String
        from std_srvs.srv import Trigger
        ui = []
        self.node.create_subscription(String, f'/{NAMESPACE}/loom/ui/state',
                                      lambda m: ui.append(json.loads(m.data)), 10)
        answer = {}

        def manager_active():
            answer['reply'] = self._call(Trigger, f'/{NAMESPACE}/lifecycle_manager/is_active',
                                         Trigger.Request())
            return answer['reply'].success
        self._spin_until(manager_active, 'every lifecycle node and agent active')
        for node in ('router', 'plugin_host'):
            state = self._call(GetState, f'/{NAMESPACE}/{node}/get_state', GetState.Request())
            self.assertEqual(state.current_state.label, 'active', node)
        self._spin_until(lambda: any(s.get('label') == 'happy' for s in ui),
                         'the face flow: a happy emoji on the UI')
        self._spin_until(lambda: any(s.get('text') == 'heard: what is the weather in london'
                                     for s in ui), 'the voice flow: the transcript on the UI')


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):

    def test_every_process_exits_cleanly_on_sigint(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info)   # 0 for each, no abort, no SIGTERM
