"""The player's core: which recorded messages go out, when, and what is counted. No rclpy.

Timing: the first message played is the anchor; each later message goes out when the wall clock
has advanced (its log time - the anchor's) / rate, or at once with `fast`. While it waits the
player ticks the simulated clock (`Sink.clock`) every `clock_period_s` with the recording time
that corresponds to now, and once more with each message's own log time, so nodes on
`use_sim_time` follow the recording. A message logged before the anchor (out of order) goes out
at once. The clock (`now`, `sleep`) is passed in: tests drive it, `loom play` uses monotonic time.

`start_s`/`end_s` are seconds from the file's first message; `topics` keeps only those (fully
qualified names). Reading stops at the first message past `end_s` (recordings are in time
order). With `loop` the file is played again from its start (the clock jumps back, as with
rosbag2) until stopped; a pass that plays nothing ends the loop. A file error stops the play and
is reported with what was played before it.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from loom_ros.replay.mcap_source import McapSource, RecordedMessage, RecordingError

NS = 1_000_000_000
PUBLISH_FAILED = 'publish_failed'
UNDECODABLE = 'undecodable'
ACTUATOR_TOPIC = 'actuator_topic'


@dataclass(frozen=True)
class ActuatorGuard:
    """Which recorded topics reach a robot's actuators, refused unless named in `allowed`: a
    file is input anyone can mail an operator, and one 9 KB recording released the e-stop and
    drove cmd_vel at 50 m/s around robot_control's limits. `is_actuator(loom_topic)`: the
    inbound contract's rule for Loom topics (bridge/inbound.py: motion, speech); `ros_names`:
    the last segments of the ROS topics robot_control drives (cmd_vel, estop), in any
    namespace. `allowed`: fully qualified ROS topics played all the same (--allow-actuator)."""

    is_actuator: Callable[[str], bool]
    ros_names: frozenset[str]
    allowed: frozenset[str] = frozenset()

    def refuses(self, ros_topic: str) -> bool:
        if ros_topic in self.allowed:
            return False
        parts = [p for p in ros_topic.split('/') if p]
        if parts and parts[-1] in self.ros_names:
            return True
        if 'loom' in parts:   # /<namespace>/loom/a/b is Loom topic a.b
            rest = parts[len(parts) - 1 - parts[::-1].index('loom') + 1:]
            return bool(rest) and self.is_actuator('.'.join(rest))
        return False


class Sink(Protocol):
    """Where played messages go (the ROS graph, or a list in a test)."""

    def open(self, message: RecordedMessage) -> tuple[str, str] | None:
        """Called once per topic before its first message: None, or (reason, detail) to skip
        the topic. It may wait (e.g. for subscribers): the time it takes is not played late."""

    def publish(self, message: RecordedMessage) -> tuple[str, str] | None:
        """None when sent, else (reason, detail): the message is counted as skipped."""

    def clock(self, stamp_ns: int) -> None:
        """The recording's time now (what /clock carries)."""


class Clock(Protocol):
    def now(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The wall clock `loom play` runs on."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


@dataclass(frozen=True)
class PlayOptions:
    rate: float = 1.0
    fast: bool = False                  # as fast as possible: no waiting
    loop: bool = False
    topics: frozenset[str] | None = None
    start_s: float | None = None
    end_s: float | None = None
    clock_period_s: float = 0.01        # /clock ticks while waiting (100 Hz, rosbag2's --clock)
    progress_period_s: float = 1.0

    def check(self) -> 'PlayOptions':
        if not (self.rate > 0 and self.rate < 1e6):
            raise ValueError(f'rate must be > 0, got {self.rate!r}')
        for name in ('start_s', 'end_s'):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f'{name} must be >= 0 seconds, got {value!r}')
        if self.start_s is not None and self.end_s is not None and self.end_s < self.start_s:
            raise ValueError(f'end ({self.end_s}) is before start ({self.start_s})')
        if not self.clock_period_s > 0:
            raise ValueError('clock_period_s must be > 0')
        return self


@dataclass
class Summary:
    file: str
    played: int = 0
    by_topic: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)     # reason -> first detail
    filtered: int = 0                                 # outside --topics / --start / --end
    passes: int = 0
    recording_s: float = 0.0                          # log time span played (last pass)
    error: str = ''
    stopped: bool = False                             # asked to stop (SIGINT)

    def as_dict(self) -> dict:
        return {'file': self.file, 'played': self.played, 'by_topic': dict(self.by_topic),
                'skipped': dict(self.skipped), 'skip_examples': self.examples,
                'filtered': self.filtered, 'passes': self.passes,
                'recording_s': round(self.recording_s, 3), 'error': self.error,
                'stopped': self.stopped}


class Player:
    """Plays one file into a Sink (see the module doc)."""

    def __init__(self, open_source: Callable[[], McapSource], sink: Sink, clock: Clock,
                 options: PlayOptions = PlayOptions(),
                 progress: Callable[[Summary, float], None] | None = None,
                 should_stop: Callable[[], bool] = lambda: False, file: str = '',
                 actuators: ActuatorGuard | None = None):
        """`actuators`: topics refused before the sink sees them (None: none refused, for a
        sink that drives nothing)."""
        self.open_source = open_source
        self.actuators = actuators
        self.sink = sink
        self.clock = clock
        self.options = options.check()
        self.progress = progress
        self.should_stop = should_stop
        self.summary = Summary(file)
        self._opened: dict[str, tuple[str, str] | None] = {}
        self._last_progress = 0.0
        self._last_clock = -1

    def run(self) -> Summary:
        self._last_progress = self.clock.now()
        while not self.should_stop():
            before = self.summary.played
            source = self.open_source()
            try:
                self._pass(source)
            except RecordingError as exc:
                self.summary.error = str(exc)
            finally:
                self._merge(source)
            self.summary.passes += 1
            if self.summary.error or not self.options.loop or self.summary.played == before:
                break
        self.summary.stopped = self.should_stop()
        return self.summary

    def _merge(self, source: McapSource) -> None:
        self.summary.skipped.update(source.skipped)
        for reason, detail in source.examples.items():
            self.summary.examples.setdefault(reason, detail)

    def _skip(self, reason: str, detail: str) -> None:
        self.summary.skipped[reason] += 1
        self.summary.examples.setdefault(reason, detail[:200])

    def _pass(self, source: McapSource) -> None:
        opts = self.options
        self._last_clock = -1   # a new pass starts the recording's time again
        first_ns = anchor_ns = None
        anchor_wall = 0.0
        for message in source.messages():
            if self.should_stop():
                return
            if first_ns is None:
                first_ns = message.log_time_ns
            offset_s = (message.log_time_ns - first_ns) / NS
            if opts.end_s is not None and offset_s > opts.end_s:
                return
            if (opts.start_s is not None and offset_s < opts.start_s) or (
                    opts.topics is not None and message.topic not in opts.topics):
                self.summary.filtered += 1
                continue
            if message.topic not in self._opened:
                began = self.clock.now()
                if self.actuators is not None and self.actuators.refuses(message.topic):
                    self._opened[message.topic] = (
                        ACTUATOR_TOPIC, f'{message.topic[:120]}: drives an actuator (motion, '
                        'speech, e-stop); played only with --allow-actuator TOPIC')
                else:
                    self._opened[message.topic] = self.sink.open(message)
                anchor_wall += self.clock.now() - began   # waiting to open is not lateness
            refusal = self._opened[message.topic]
            if refusal is not None:
                self._skip(*refusal)
                continue
            if anchor_ns is None:
                anchor_ns, anchor_wall = message.log_time_ns, self.clock.now()
            if not opts.fast and not self._wait_until(
                    anchor_wall + (message.log_time_ns - anchor_ns) / NS / opts.rate,
                    anchor_wall, anchor_ns):
                return
            self._tick(message.log_time_ns)
            problem = self.sink.publish(message)
            if problem is not None:
                self._skip(*problem)
            else:
                self.summary.played += 1
                self.summary.by_topic[message.topic] += 1
            self.summary.recording_s = max(0.0, (message.log_time_ns - anchor_ns) / NS)
            self._report()

    def _wait_until(self, target: float, anchor_wall: float, anchor_ns: int) -> bool:
        """Ticks the clock until the wall clock reaches `target`; False if asked to stop."""
        period = self.options.clock_period_s
        while True:
            now = self.clock.now()
            if now >= target:
                return True
            if self.should_stop():
                return False
            self._tick(anchor_ns + int((now - anchor_wall) * self.options.rate * NS))
            self._report()
            self.clock.sleep(min(period, target - now))

    def _tick(self, stamp_ns: int) -> None:
        if stamp_ns > self._last_clock:   # never backwards within a pass
            self._last_clock = stamp_ns
            self.sink.clock(stamp_ns)

    def _report(self) -> None:
        if self.progress is None:
            return
        now = self.clock.now()
        if now - self._last_progress >= self.options.progress_period_s:
            self._last_progress = now
            self.progress(self.summary, now)
