"""Camera adapter node: `sensor_msgs/Image` frames from any camera driver (or sim_sensors) become
`camera.front` Loom events, the input of Flow 1.

Why a node of its own: camera drivers speak sensor_msgs/Image, agents and plugins speak Loom
events; one small adapter keeps the plugin host and the agents free of driver topics. Each event
carries the raw pixels with metadata `width`, `height`, `encoding`, `step` (what
perception.image reads), the frame's stamp as `timestamp_ms` (so latency is measured from the
camera), the frame_id, and Sensitive privacy (faces are personal data). It starts the frame's
trace: the PublishEvent span is the first hop. Frames beyond `max_rate_hz` on average (30 by
default; bursts of up to RATE_BURST_S seconds' worth pass, so a camera's jitter costs no frames)
are dropped and counted `rate_limited`, so a flood on the image topic is not republished whole.
Every frame is checked as perception.image reads it (`check_raw`: encoding, bounded sizes, rows
at least a row of pixels, enough bytes); a malformed one is counted `bad_frames` and logged
(throttled), never published nor a crash. A sensor_msgs/Image carries no
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
from loom_ros.plugins.perception.image import check_raw
from loom_ros.telemetry.logs import mask_node_logger

PARAMETERS = [
    ParamSpec('image_topic', 'sensor_msgs/Image topic to read (relative: under the namespace)',
              read_only=True),
    ParamSpec('loom_topic', 'Loom topic the frame events go to', read_only=True),
    ParamSpec('max_rate_hz', 'Most frames per second passed on, on average (0: all)',
              read_only=True, min_value=0.0),
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


def check_frame(msg) -> None:
    """An ImageError (a ValueError) for a sensor_msgs/Image perception could not read: the
    checks perception.image applies to the event (`check_raw`), on the sizes alone."""
    check_raw(len(msg.data), int(msg.width), int(msg.height), str(msg.encoding), int(msg.step))


def frame_to_event(msg, loom_topic: str, subject: str = '') -> Event:
    """A sensor_msgs/Image as a Loom camera event (raw pixels, no copy beyond bytes()), naming
    `subject` when one is given (already checked); a ValueError (ImageError) for a frame
    perception could not read (`check_frame`)."""
    check_frame(msg)
    stamp_ms = msg.header.stamp.sec * 1000 + msg.header.stamp.nanosec // 1_000_000
    metadata = {'width': str(msg.width), 'height': str(msg.height), 'encoding': msg.encoding,
                'step': str(msg.step)}
    if subject:
        metadata[SUBJECT_METADATA_KEY] = subject
    return Event(type=loom_topic, payload=bytes(msg.data), source='camera_adapter',
                 timestamp_ms=int(stamp_ms) or int(time.time() * 1000), metadata=metadata,
                 frame_id=msg.header.frame_id, privacy=Privacy.SENSITIVE)


RATE_BURST_S = 2.0   # seconds of frames at max_rate_hz that may arrive at once


class FrameRateLimit:
    """A token bucket: on average at most `rate_hz` frames a second (0: no limit), in bursts of
    up to `burst_s` seconds' worth (at least one frame). A minimum gap would instead drop half of
    a camera's frames at its own rate whenever two arrive close together (DDS delivers them
    bunched). `clock` (seconds, monotonic) is injectable for tests."""

    def __init__(self, rate_hz: float, burst_s: float = RATE_BURST_S, clock=time.monotonic):
        self.rate = float(rate_hz)
        self.capacity = max(1.0, self.rate * burst_s)
        self.clock = clock
        self._tokens = self.capacity
        self._last: float | None = None

    def allow(self) -> bool:
        if not self.rate:
            return True
        now = self.clock()
        if self._last is not None and now > self._last:
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now if self._last is None else max(now, self._last)   # never backwards
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class CameraAdapterNode(Node):

    def __init__(self, **kwargs):
        super().__init__('camera_adapter', **kwargs)
        mask_node_logger(self)   # every log line masked from the first (issue 13, fault 10)
        self.bus = create_bus(self, 'camera_adapter')
        self.params = declare_parameters(self, 'camera_adapter', PARAMETERS)
        # A bad id stops the node (SubjectError): a typo must not make the frames anonymous.
        self._subject = check_subject(self.params['subject']) if self.params['subject'] else ''
        self.stats = {'frames': 0, 'published': 0, 'rate_limited': 0, 'bad_frames': 0}
        self.rate_limit = FrameRateLimit(self.params['max_rate_hz'])
        from sensor_msgs.msg import Image
        self.create_subscription(Image, self.params['image_topic'], self._on_image,
                                 to_qos_profile(QosLevel.REALTIME))
        warn_without_frame_transport(self.get_logger())

    def _on_image(self, msg) -> None:
        self.stats['frames'] += 1
        try:
            check_frame(msg)   # first: malformed frames spend none of the rate limit's budget
        except ValueError as exc:
            return self._bad_frame(exc)
        if not self.rate_limit.allow():
            self.stats['rate_limited'] += 1
            return
        try:
            event = frame_to_event(msg, self.params['loom_topic'], self._subject)
            self.bus.publish(self.params['loom_topic'], event)
        except (ValueError, EventRejected) as exc:
            return self._bad_frame(exc)
        self.stats['published'] += 1

    def _bad_frame(self, exc: Exception) -> None:
        self.stats['bad_frames'] += 1
        self.get_logger().warning(f'frame dropped: {exc}', throttle_duration_sec=1.0)


def main(args=None):
    run_node(CameraAdapterNode, args)


if __name__ == '__main__':
    main()
