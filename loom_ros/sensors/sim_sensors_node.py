"""Simulated sensors node: IMU motion and face detection events at configured rates.

Signals are deterministic for a seed (a slow walk with a bump every few seconds, faces that come
and go), so demos and tests repeat. Real camera and microphone simulation comes with bring-up.
"""
from __future__ import annotations

import math
import random

from rclpy.node import Node

from loom_ros.bus import topics
from loom_ros.bus.bus import create_bus
from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.executor import run_node
from loom_ros.config.params import ParamSpec, declare_parameters

PARAMETERS = [
    ParamSpec('imu_rate_hz', 'IMU motion events per second (0 turns it off)',
              read_only=True, min_value=0.0, max_value=10000.0),
    ParamSpec('face_rate_hz', 'Face detection events per second (0 turns it off)',
              read_only=True, min_value=0.0, max_value=1000.0),
    ParamSpec('seed', 'Seed of the simulated signals', read_only=True),
]


class SimSensorsNode(Node):

    def __init__(self, **kwargs):
        super().__init__('sim_sensors', **kwargs)
        self.bus = create_bus(self, 'sim_sensors')
        params = declare_parameters(self, 'sim_sensors', PARAMETERS)
        self._rng = random.Random(params['seed'])
        self._imu_seq = 0
        self._face_seq = 0
        self._imu_dt = 1.0 / params['imu_rate_hz'] if params['imu_rate_hz'] > 0 else 0.0
        if params['imu_rate_hz'] > 0:
            self.create_timer(1.0 / params['imu_rate_hz'], self._publish_imu)
        if params['face_rate_hz'] > 0:
            self.create_timer(1.0 / params['face_rate_hz'], self._publish_face)
        self.get_logger().info(
            f"simulating IMU at {params['imu_rate_hz']} Hz and faces at {params['face_rate_hz']} Hz")

    def _publish_imu(self) -> None:
        t = self._imu_seq * self._imu_dt
        self._imu_seq += 1
        bump = 3.0 if (self._imu_seq % 1000) < 20 else 0.0
        data = {
            'seq': self._imu_seq,
            'accel': [round(0.2 * math.sin(t) + bump + self._rng.gauss(0, 0.02), 4),
                      round(0.1 * math.cos(t) + self._rng.gauss(0, 0.02), 4),
                      round(9.81 + self._rng.gauss(0, 0.02), 4)],
            'gyro': [round(self._rng.gauss(0, 0.01), 4) for _ in range(3)],
        }
        self.bus.publish(topics.SENSOR_IMU_MOTION, Event.with_json(
            'imu.motion', data, source='sim_sensors/imu', frame_id='imu_link',
            tags=['sim', 'bump'] if bump else ['sim'], priority=1 if bump else 0))

    def _publish_face(self) -> None:
        self._face_seq += 1
        present = (self._face_seq // 90) % 3 != 2  # faces for 6 s, none for 3 s at 30 Hz
        faces = []
        if present:
            faces.append({'bbox': [0.42 + self._rng.uniform(-0.01, 0.01), 0.30, 0.18, 0.24],
                          'score': round(0.9 + self._rng.uniform(0, 0.09), 3)})
        self.bus.publish(topics.CAMERA_FRONT_FACE, Event.with_json(
            'face.detections', {'seq': self._face_seq, 'faces': faces},
            source='sim_sensors/camera_front', frame_id='camera_front_optical',
            confidence=faces[0]['score'] if faces else 1.0, tags=['sim'],
            privacy=Privacy.SENSITIVE))


def main(args=None):
    run_node(SimSensorsNode, args)


if __name__ == '__main__':
    main()
