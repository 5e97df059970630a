"""Simulated sensors node, so Loom runs on a laptop: a front camera, a microphone and an IMU.

- camera: `sensor_msgs/Image` (rgb8) on `camera/front/image_raw` at `camera_rate_hz`, cycling
  through `camera_scenes` (real face photos, see scenes.py), each shown `camera_scene_s` seconds.
  The camera_adapter node turns these frames into `camera.front` Loom events (Flow 1).
- microphone: `mic.primary` Loom events, 16 kHz mono int16 PCM in `mic_chunk_ms` chunks, in real
  time: each of `mic_utterances` spoken by espeak-ng, then `mic_gap_s` of silence, in a loop
  (Flow 2; the `asr` plugin reads them), after 2 s of silence at start. The chunk where speech starts or ends says so in its
  metadata (`speech_start_ms` / `speech_end_ms`, wall-clock ms), so latencies can be measured
  from the moment the speaker stops. `mic_subjects` names who says each utterance (in turn, cycled;
  '' = anonymous): their id goes into every chunk's `loom.subject`, so consent, erasure and export
  follow the speech (the asr plugin carries it on to the transcripts).
- IMU: `sensor_msgs/Imu` on `imu/data` and `sensor.imu.motion` Loom events at `imu_rate_hz` (a
  slow walk with a bump every few seconds).
Signals are deterministic for a seed. The voice clips are synthesised on a background thread at
start (about a second), so the node is up at once; until then the microphone is silent.
"""
from __future__ import annotations

import math
import random
import threading
import time

import numpy as np
from rclpy.node import Node

from loom_ros.bus import topics
from loom_ros.bus.bus import create_bus
from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.executor import run_node, timer_callback
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY, check_subject
from loom_ros.bus.qos import QosLevel, to_qos_profile
from loom_ros.config.params import ParamSpec, declare_parameters
from loom_ros.sensors import scenes
from loom_ros.sensors.camera_adapter_node import warn_without_frame_transport
from loom_ros.telemetry.logs import mask_node_logger

CAMERA_IMAGE_TOPIC = 'camera/front/image_raw'
IMU_TOPIC = 'imu/data'
MIC_TOPIC = 'mic.primary'
LEAD_IN_S = 2

PARAMETERS = [
    ParamSpec('imu_rate_hz', 'IMU messages and motion events per second (0 turns it off)',
              read_only=True, min_value=0.0, max_value=10000.0),
    ParamSpec('camera_rate_hz', 'Camera frames per second (0 turns the camera off)',
              read_only=True, min_value=0.0, max_value=120.0),
    ParamSpec('camera_scenes', f'Scenes shown in turn ({", ".join(scenes.SCENES)})',
              read_only=True),
    ParamSpec('camera_scene_s', 'Seconds each scene is shown', read_only=True, min_value=0.1),
    ParamSpec('mic_enabled', 'Publish microphone audio on mic.primary', read_only=True),
    ParamSpec('mic_utterances', 'What the simulated speaker says, in turn (spoken by espeak-ng)',
              read_only=True),
    ParamSpec('mic_subjects', "Data subject saying each utterance, in turn and cycled ('' = "
              'anonymous); ids as bus/privacy.check_subject takes them', read_only=True),
    ParamSpec('mic_chunk_ms', 'Milliseconds of audio per mic event', read_only=True,
              min_value=10, max_value=1000),
    ParamSpec('mic_gap_s', 'Seconds of silence after each utterance', read_only=True,
              min_value=0.5),
    ParamSpec('seed', 'Seed of the simulated signals', read_only=True),
]


class SimSensorsNode(Node):

    def __init__(self, **kwargs):
        super().__init__('sim_sensors', **kwargs)
        mask_node_logger(self)   # every log line masked from the first (issue 13, fault 10)
        self.bus = create_bus(self, 'sim_sensors')
        params = declare_parameters(self, 'sim_sensors', PARAMETERS)
        self.params = params
        self._rng = random.Random(params['seed'])
        self._mic_subjects = mic_subjects(params['mic_subjects'])
        self.stats = {'frames': 0, 'imu': 0, 'mic_chunks': 0, 'utterances': 0}
        # IMU
        self._imu_seq = 0
        self._imu_dt = 1.0 / params['imu_rate_hz'] if params['imu_rate_hz'] > 0 else 0.0
        if params['imu_rate_hz'] > 0:
            from sensor_msgs.msg import Imu
            self._imu_msg = Imu
            self._imu_pub = self.create_publisher(Imu, IMU_TOPIC,
                                                  to_qos_profile(QosLevel.REALTIME))
            self.create_timer(1.0 / params['imu_rate_hz'], timer_callback(self._publish_imu))
        # Camera: every scene rendered once, as a ready sensor_msgs/Image.
        self._frames = []
        if params['camera_rate_hz'] > 0:
            from loom_ros.plugins.perception.image import image_to_msg
            names = list(params['camera_scenes'])
            for name in names:
                self._frames.append((name, image_to_msg(scenes.make_scene(name, params['seed']),
                                                        'rgb8', 'camera_front_optical')))
            if not self._frames:
                raise scenes.SceneError('camera_scenes is empty (set camera_rate_hz: 0 for no '
                                        'camera)')
            from sensor_msgs.msg import Image
            self._image_pub = self.create_publisher(Image, CAMERA_IMAGE_TOPIC,
                                                    to_qos_profile(QosLevel.REALTIME))
            self._start = time.monotonic()
            self.create_timer(1.0 / params['camera_rate_hz'],
                              timer_callback(self._publish_frame))
            warn_without_frame_transport(self.get_logger())
        # Microphone: clips synthesised off the executor; the timer plays them in real time.
        self._chunk = int(scenes.MIC_RATE * params['mic_chunk_ms'] / 1000)
        self._clips: list[scenes.Clip] | None = None
        self._mic_error = ''
        self._play: list[tuple[np.ndarray, str, int, int]] = []  # (chunk, text, start, end)
        self._play_at = 0
        self._loop_from = 0
        if params['mic_enabled'] and list(params['mic_utterances']):
            threading.Thread(target=self._synthesise, daemon=True, name='sim-mic-tts').start()
            self.create_timer(params['mic_chunk_ms'] / 1000.0, self._publish_mic)
        self.get_logger().info(
            f"simulating IMU at {params['imu_rate_hz']} Hz, camera at {params['camera_rate_hz']} "
            f"Hz ({', '.join(n for n, _ in self._frames) or 'off'}), microphone "
            f"{'on' if params['mic_enabled'] else 'off'}")

    # -- camera -------------------------------------------------------------------------------
    def current_scene(self) -> str:
        index = int((time.monotonic() - self._start) / self.params['camera_scene_s'])
        return self._frames[index % len(self._frames)][0]

    def _publish_frame(self) -> None:
        index = int((time.monotonic() - self._start) / self.params['camera_scene_s'])
        name, msg = self._frames[index % len(self._frames)]
        msg.header.stamp = self.get_clock().now().to_msg()
        self._image_pub.publish(msg)
        self.stats['frames'] += 1

    # -- microphone ---------------------------------------------------------------------------
    def _synthesise(self) -> None:
        try:
            self._clips = scenes.speak_clips(list(self.params['mic_utterances']))
        except Exception as exc:  # no espeak-ng: say so once, the other sensors go on
            self._mic_error = f'{type(exc).__name__}: {exc}'
            self.get_logger().error(f'simulated microphone is off: cannot synthesise speech: '
                                    f'{self._mic_error}')
            return
        gap = np.zeros(int(self.params['mic_gap_s'] * scenes.MIC_RATE), dtype=np.int16)
        # Two seconds of silence before the first utterance, once: the listeners of a system
        # starting together with these sensors are up by then.
        play = [(part, '', 0, -1, -1, '') for part in
                scenes.chunks(np.zeros(LEAD_IN_S * scenes.MIC_RATE, dtype=np.int16), self._chunk)]
        self._loop_from = len(play)
        for n, clip in enumerate(self._clips):
            audio = np.concatenate([clip.samples, gap])
            who = self._mic_subjects[n % len(self._mic_subjects)]
            for i, part in enumerate(scenes.chunks(audio, self._chunk)):
                play.append((part, clip.text, i * self._chunk, clip.speech_start,
                             clip.speech_end, who))
        self._play = play

    def _publish_mic(self) -> None:
        play = self._play
        if not play:
            return
        if self._play_at >= len(play):   # loop over the utterances, not the lead-in
            self._play_at = self._loop_from
        part, text, offset, start, end, who = play[self._play_at]
        self._play_at += 1
        now_ms = time.time() * 1000.0
        chunk_end = offset + part.size   # this chunk has just been "heard"
        metadata = {'sample_rate': str(scenes.MIC_RATE), 'channels': '1', 'encoding': 's16le'}
        if who:
            metadata[SUBJECT_METADATA_KEY] = who
        if offset <= start < chunk_end:
            metadata['speech_start_ms'] = f'{now_ms - (chunk_end - start) / 16.0:.1f}'
            metadata['utterance'] = text
            self.stats['utterances'] += 1
        if offset <= end < chunk_end:
            metadata['speech_end_ms'] = f'{now_ms - (chunk_end - end) / 16.0:.1f}'
            metadata['utterance'] = text
        self.bus.publish(MIC_TOPIC, Event(
            type=MIC_TOPIC, payload=part.astype('<i2').tobytes(), source='sim_sensors/mic',
            metadata=metadata, frame_id='mic_link', privacy=Privacy.SENSITIVE))
        self.stats['mic_chunks'] += 1

    # -- IMU ----------------------------------------------------------------------------------
    def _publish_imu(self) -> None:
        t = self._imu_seq * self._imu_dt
        self._imu_seq += 1
        bump = 3.0 if (self._imu_seq % 1000) < 20 else 0.0
        accel = [round(0.2 * math.sin(t) + bump + self._rng.gauss(0, 0.02), 4),
                 round(0.1 * math.cos(t) + self._rng.gauss(0, 0.02), 4),
                 round(9.81 + self._rng.gauss(0, 0.02), 4)]
        gyro = [round(self._rng.gauss(0, 0.01), 4) for _ in range(3)]
        msg = self._imu_msg()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = 'imu_link'
        msg.orientation_covariance[0] = -1.0   # no orientation estimate
        (msg.linear_acceleration.x, msg.linear_acceleration.y,
         msg.linear_acceleration.z) = accel
        msg.angular_velocity.x, msg.angular_velocity.y, msg.angular_velocity.z = gyro
        self._imu_pub.publish(msg)
        self.bus.publish(topics.SENSOR_IMU_MOTION, Event.with_json(
            'imu.motion', {'seq': self._imu_seq, 'accel': accel, 'gyro': gyro},
            source='sim_sensors/imu', frame_id='imu_link',
            tags=['sim', 'bump'] if bump else ['sim'], priority=1 if bump else 0))
        self.stats['imu'] += 1


def mic_subjects(values) -> list[str]:
    """The speakers of the utterances, each a valid subject id or '' (anonymous); SubjectError
    names a bad one (the node then does not start: a typo must not make speech anonymous)."""
    values = [str(v) for v in values] or ['']
    return [check_subject(v) if v else '' for v in values]


def main(args=None):
    run_node(SimSensorsNode, args)


if __name__ == '__main__':
    main()
