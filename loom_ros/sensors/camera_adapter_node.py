"""Camera adapter node: `sensor_msgs/Image` frames from any camera driver (or sim_sensors) become
`camera.front` Loom events, the input of Flow 1.

Why a node of its own: camera drivers speak sensor_msgs/Image, agents and plugins speak Loom
events; one small adapter keeps the plugin host and the agents free of driver topics. Each event
carries the raw pixels with metadata `width`, `height`, `encoding`, `step` (what
perception.image reads), the frame's stamp as `timestamp_ms` (so latency is measured from the
camera), the frame_id, and Sensitive privacy (faces are personal data). It starts the frame's
trace: the PublishEvent span is the first hop. Frames faster than `max_rate_hz` are dropped and
counted; a malformed frame is counted and logged, never a crash. A sensor_msgs/Image carries no
metadata, so whom the camera sees is this node's `subject` parameter ('' = anonymous, the
default): set, every event names that data subject (`loom.subject`), for consent and erasure.
Frames cross processes whole only with Loom's Fast DDS profile (config/fastdds.xml; Fast DDS's
builtin shared memory is smaller than one frame): a process started without it says so at once.
"""
from __future__ import annotations

import os
import time

from rclpy.node import Node

from loom_ros.bus.bus import create_bus
from loom_ros.bus.event import Event, EventRejected, Privacy
from loom_ros.bus.executor import run_node
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY, check_subject
from loom_ros.bus.qos import QosLevel, fastdds_environment, to_qos_profile
from loom_ros.config.params import ParamSpec, config_dir, declare_parameters
from loom_ros.plugins.perception.image import CHANNELS
from loom_ros.telemetry.logs import mask_node_logger

PARAMETERS = [
    ParamSpec('image_topic', 'sensor_msgs/Image topic to read (relative: under the namespace)',
              read_only=True),
    ParamSpec('loom_topic', 'Loom topic the frame events go to', read_only=True),
    ParamSpec('max_rate_hz', 'Most frames per second passed on (0: all)', read_only=True,
              min_value=0.0),
    ParamSpec('subject', "Data subject every frame shows ('' = anonymous), in loom.subject",
              read_only=True),
]


def warn_without_frame_transport(logger, environ=os.environ, configs=None) -> bool:
    """Log (and return True) when this process runs Fast DDS without Loom's profile or any
    transport setting of the user's: camera frames to other processes would then be lost."""
    missing = fastdds_environment(environ, configs if configs is not None else config_dir())
    if missing:
        setting = ' '.join(f'{k}={v}' for k, v in missing.items())
        logger.warning(f'Fast DDS runs with its builtin transports: camera frames (larger than '
                       f'its 512 KB shared-memory segment) will be lost between processes. '
                       f'Start Loom with {setting} (loom bringup and the launch file set it).')
    return bool(missing)


def frame_to_event(msg, loom_topic: str, subject: str = '') -> Event:
    """A sensor_msgs/Image as a Loom camera event (raw pixels, no copy beyond bytes()), naming
    `subject` when one is given (already checked)."""
    if msg.encoding not in CHANNELS:
        raise ValueError(f'encoding {msg.encoding!r} is not one of {", ".join(CHANNELS)}')
    if msg.height * msg.step > len(msg.data) or msg.width == 0 or msg.height == 0:
        raise ValueError(f'image {msg.width}x{msg.height} step {msg.step} does not fit its '
                         f'{len(msg.data)} bytes')
    stamp_ms = msg.header.stamp.sec * 1000 + msg.header.stamp.nanosec // 1_000_000
    metadata = {'width': str(msg.width), 'height': str(msg.height), 'encoding': msg.encoding,
                'step': str(msg.step)}
    if subject:
        metadata[SUBJECT_METADATA_KEY] = subject
    return Event(type=loom_topic, payload=bytes(msg.data), source='camera_adapter',
                 timestamp_ms=int(stamp_ms) or int(time.time() * 1000), metadata=metadata,
                 frame_id=msg.header.frame_id, privacy=Privacy.SENSITIVE)


class CameraAdapterNode(Node):

    def __init__(self, **kwargs):
        super().__init__('camera_adapter', **kwargs)
        mask_node_logger(self)   # every log line masked from the first (issue 13, fault 10)
        self.bus = create_bus(self, 'camera_adapter')
        self.params = declare_parameters(self, 'camera_adapter', PARAMETERS)
        # A bad id stops the node (SubjectError): a typo must not make the frames anonymous.
        self._subject = check_subject(self.params['subject']) if self.params['subject'] else ''
        self.stats = {'frames': 0, 'published': 0, 'rate_limited': 0, 'bad_frames': 0}
        self._min_gap = 1.0 / self.params['max_rate_hz'] if self.params['max_rate_hz'] else 0.0
        self._last = 0.0
        from sensor_msgs.msg import Image
        self.create_subscription(Image, self.params['image_topic'], self._on_image,
                                 to_qos_profile(QosLevel.REALTIME))
        warn_without_frame_transport(self.get_logger())

    def _on_image(self, msg) -> None:
        self.stats['frames'] += 1
        now = time.monotonic()
        if self._min_gap and now - self._last < self._min_gap:
            self.stats['rate_limited'] += 1
            return
        self._last = now
        try:
            event = frame_to_event(msg, self.params['loom_topic'], self._subject)
            self.bus.publish(self.params['loom_topic'], event)
        except (ValueError, EventRejected) as exc:
            self.stats['bad_frames'] += 1
            self.get_logger().warning(f'frame dropped: {exc}', throttle_duration_sec=1.0)
            return
        self.stats['published'] += 1


def main(args=None):
    run_node(CameraAdapterNode, args)


if __name__ == '__main__':
    main()
