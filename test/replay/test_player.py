"""The player's core on recordings written by the real recorder, with a driven clock: original
timing scaled by the rate, as fast as possible, topic and time windows, loops, /clock ticks that
follow the recording, and a file cut short mid-play (what came before is played, the error
says where)."""
from __future__ import annotations

import struct

import pytest

from mcap_files import T0, recorded
from loom_ros.replay.mcap_source import McapSource
from loom_ros.replay.player import NS, PlayOptions, Player
from loom_ros.replay.ros import RosTypes

STEP_NS = 100_000_000   # 100 ms between recorded messages


class DrivenClock:
    """Wall time that moves only when the player sleeps."""

    def __init__(self):
        self.t = 1000.0
        self.slept = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds
        self.slept += seconds


class ListSink:
    def __init__(self, wall, refuse=(), fail=()):
        self.wall, self.refuse, self.fail = wall, refuse, fail
        self.sent, self.ticks, self.opened = [], [], []

    def open(self, message):
        self.opened.append(message.topic)
        return ('test_refused', message.topic) if message.topic in self.refuse else None

    def publish(self, message):
        if message.data in self.fail:
            return 'undecodable', 'bad'
        self.sent.append((self.wall.now(), message.topic, message.log_time_ns))

    def clock(self, stamp_ns):
        self.ticks.append((self.wall.now(), stamp_ns))


@pytest.fixture
def recording(tmp_path):
    from loom_msgs.msg import RouteDecision
    from std_msgs.msg import String
    messages = []
    for i in range(10):
        messages.append(('/chatter', 'std_msgs/msg/String', String(data=str(i)),
                         T0 + i * STEP_NS))
        messages.append(('/router/decisions', 'loom_msgs/msg/RouteDecision',
                         RouteDecision(decision_id=str(i)), T0 + i * STEP_NS + 1))
    return recorded(tmp_path / 'rec.mcap', messages)


def play(path, clock, sink=None, **options):
    sink = sink or ListSink(clock)
    stop = options.pop('stop', lambda: False)
    player = Player(lambda: McapSource(path, RosTypes()), sink, clock, PlayOptions(**options),
                    should_stop=stop)
    return player.run(), sink


@pytest.mark.parametrize('rate', [1.0, 2.0, 0.5])
def test_messages_go_out_at_their_recorded_offsets_divided_by_the_rate(recording, rate):
    clock = DrivenClock()
    summary, sink = play(recording, clock, rate=rate)
    assert summary.played == 20 and not summary.skipped and not summary.error
    start = sink.sent[0][0]
    for wall, _topic, log_ns in sink.sent:
        assert wall - start == pytest.approx((log_ns - T0) / NS / rate, abs=1e-9)
    assert clock.slept == pytest.approx(0.9 / rate, abs=1e-6)


def test_the_clock_follows_the_recording_while_waiting_and_at_each_message(recording):
    clock = DrivenClock()
    summary, sink = play(recording, clock, rate=2.0, clock_period_s=0.01)
    stamps = [s for _, s in sink.ticks]
    assert stamps == sorted(stamps) and stamps[0] == T0 and stamps[-1] == T0 + 9 * STEP_NS + 1
    for wall, stamp in sink.ticks:   # recording time = anchor + elapsed wall time x rate
        assert stamp == pytest.approx(T0 + (wall - sink.sent[0][0]) * 2.0 * NS, abs=2)
    gaps = [b - a for (a, _), (b, _) in zip(sink.ticks, sink.ticks[1:])]
    assert max(gaps) <= 0.01 + 1e-9   # ticks at least every clock period while waiting


def test_as_fast_as_possible_never_waits(recording):
    clock = DrivenClock()
    summary, sink = play(recording, clock, fast=True)
    assert summary.played == 20 and clock.slept == 0.0
    assert [s for _, s in sink.ticks][-1] == T0 + 9 * STEP_NS + 1


def test_topics_and_the_time_window_filter(recording):
    clock = DrivenClock()
    summary, sink = play(recording, clock, topics=frozenset({'/chatter'}), start_s=0.2,
                         end_s=0.5)
    assert [(log - T0) // STEP_NS for _, _, log in sink.sent] == [2, 3, 4, 5]
    # Before the window or on other topics: filtered; reading stops past the end.
    assert summary.played == 4 and summary.filtered == 7
    assert clock.slept == pytest.approx(0.3, abs=1e-6)   # timing starts at the window


def test_loop_plays_again_until_stopped(recording):
    clock = DrivenClock()
    sink = ListSink(clock)
    summary, _ = play(recording, clock, sink, fast=True, loop=True,
                      stop=lambda: len(sink.sent) >= 45)
    assert summary.passes == 3 and summary.played == 45 and summary.stopped


def test_refused_topics_and_failed_messages_are_counted_not_fatal(recording):
    from rclpy.serialization import serialize_message
    from std_msgs.msg import String
    clock = DrivenClock()
    sink = ListSink(clock, refuse={'/router/decisions'},
                    fail={serialize_message(String(data='3'))})
    summary, _ = play(recording, clock, sink, fast=True)
    assert summary.played == 9 and summary.by_topic == {'/chatter': 9}
    assert summary.skipped == {'test_refused': 10, 'undecodable': 1}
    assert sink.opened == ['/chatter', '/router/decisions']   # opened once per topic


def _data_end(data: bytes) -> int:
    """The byte offset of the data end record (what follows the last chunk's indexes)."""
    offset = 8
    while data[offset] != 0x0F:
        offset += 9 + struct.unpack_from('<Q', data, offset + 1)[0]
    return offset


def test_a_file_cut_short_plays_what_came_before_and_says_where(recording, tmp_path):
    data = recording.read_bytes()
    cut = tmp_path / 'cut.mcap'
    cut.write_bytes(data[: _data_end(data) - 5])   # inside the last record before the end
    summary, sink = play(cut, DrivenClock(), fast=True)
    assert 'cut short' in summary.error and summary.passes == 1
    assert summary.played == 20   # the chunk before the damage was played whole
    cut.write_bytes(data[:200])   # inside the first chunk: nothing to play
    summary, sink = play(cut, DrivenClock(), fast=True)
    assert 'cut short' in summary.error and summary.played == 0


@pytest.mark.parametrize('bad', [dict(rate=0), dict(rate=-1), dict(rate=float('nan')),
                                 dict(start_s=-1), dict(start_s=2, end_s=1)])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        PlayOptions(**bad).check()
