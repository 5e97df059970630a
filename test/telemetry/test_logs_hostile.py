"""Hostile strings against log masking (issue 13, faults 2 and 10).

Fault 2: one event with a 20,000-character id froze a process for a minute (a 1 MB id: for good)
because the key=value masking regex was quadratic and ran on every message. Now every string is
bounded before a pattern sees it, and every pattern is linear: the unbounded masker gets
megabyte-sized worst cases that a quadratic pattern would spend hours on.
Fault 10: the bus took its node's logger before telemetry masked it, so secrets in bus log lines
reached stderr and ~/.ros/log in clear.
"""
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from harness import REPO, WAIT_LIMIT_S, loom_cli
from loom_ros.bus.event import Event, Privacy
from loom_ros.telemetry import logs

# Shapes that made at least one of the old patterns quadratic (a run a match attempt rescans
# from every position), each 200,000 characters: quadratic would be ~10^10 steps per pattern.
SIZE = 200_000
WORST_CASES = {
    'key characters': 'a' * SIZE,
    'sensitive key parts': 'token' * (SIZE // 5),
    'JWT starts': 'eyJ-' * (SIZE // 4),
    'e-mail local part': 'a.' * (SIZE // 2),
    'e-mail domain': 'a@' + 'b.' * (SIZE // 2),
    'separators': 'a= ' * (SIZE // 3),
    'bearer spaces': 'Bearer' + ' ' * SIZE,
    'key then spaces': 'password' + ' ' * SIZE,
}


@pytest.mark.parametrize('text', WORST_CASES.values(), ids=WORST_CASES.keys())
def test_every_pattern_is_linear_on_worst_case_shapes(text):
    # No bound here: the patterns alone must cope (pytest's timeout is the guard, not a margin).
    assert len(logs._mask_patterns(text)) <= len(text)


def test_a_megabyte_string_is_cut_before_masking_with_a_marker():
    masked = logs.mask_text('a' * 1_000_000)
    assert len(masked) < logs.MAX_TEXT_CHARS + 64
    assert masked.endswith(f'...[{1_000_000 - logs.MAX_TEXT_CHARS} more chars not logged]')


def test_a_cut_never_leaves_half_a_secret_for_the_patterns_to_miss():
    text = 'x ' * (logs.MAX_TEXT_CHARS // 2 - 5) + 'password=hunter2'
    masked = logs.mask_text(text)
    assert 'hunt' not in masked and 'more chars not logged' in masked


def test_masking_still_finds_every_kind_of_secret():
    text = ('password=hunter2 api_key: "abc" "secret": "s3" foo=token=t0k mail a.b@c.com '
            'Authorization: Bearer abcdefgh eyJabcdef.abcdefg.xyz sk-live-0123456789abcdef '
            'ghp_0123456789abcdef AKIAABCDEFGHIJKLMNOP monkey=banana')
    assert logs.mask_text(text) == (
        'password=*** api_key: "***" "secret": "***" foo=token=*** mail <email> '
        'Authorization: *** *** *** *** *** *** monkey=banana')


def test_containers_and_events_are_bounded():
    masked = logs.mask_value({f'k{i}': 'v' * 10_000 for i in range(1000)})
    assert len(masked) == logs.MAX_ITEMS + 1 and masked['...'] == '936 more items not logged'
    assert all(len(v) < logs.MAX_TEXT_CHARS + 64 for v in masked.values())
    assert len(logs.mask_value(list(range(10_000)))) == logs.MAX_ITEMS + 1
    event = Event(type='t' * 100_000, id='i' * 1_000_000, source='password=hunter2',
                  tags=['x'] * 10_000, privacy=Privacy.PUBLIC)
    view = logs.mask_event(event)
    assert len(json.dumps(view)) < 4 * logs.MAX_TEXT_CHARS
    assert view['source'] == 'password=***'


class LiveProc:
    """A Loom entry point whose stdout and stderr are read while it runs (for SIGINT tests)."""

    def __init__(self, args, env):
        self.popen = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        self.out, self.err = [], []
        self._readers = [threading.Thread(target=self._read, args=(s, d), daemon=True)
                         for s, d in ((self.popen.stdout, self.out), (self.popen.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines):
        for line in stream:
            lines.append(line)

    def interrupt(self) -> int:
        self.popen.send_signal(signal.SIGINT)
        code = self.popen.wait(timeout=WAIT_LIMIT_S)
        for reader in self._readers:
            reader.join(timeout=WAIT_LIMIT_S)
        return code

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture
def echo(ros, tmp_path):
    """start(topic) runs `loom echo topic` (ROS logs under tmp_path) and a raw Event publisher
    this process drives, matched to it: returns (proc, publisher, log_dir)."""
    from loom_msgs.msg import Event as EventMsg

    from loom_ros.bus.qos import to_qos_profile
    made = []

    def start(topic: str):
        log_dir = tmp_path / topic
        proc = LiveProc(loom_cli('echo', topic, '--qos', 'background'),
                        {**os.environ, 'ROS_LOG_DIR': str(log_dir)})
        raw = ros.node.create_publisher(EventMsg, 'loom/' + topic.replace('.', '/'),
                                        to_qos_profile('background'))
        made.append((proc, raw))
        ros.wait_for(lambda: raw.get_subscription_count() >= 1 or proc.popen.poll() is not None,
                     f'loom echo {topic} to match')
        assert proc.popen.poll() is None, ''.join(proc.err)
        return proc, raw, log_dir
    yield start
    for proc, raw in made:
        proc.kill()
        ros.node.destroy_publisher(raw)


def _printed(proc, event_id):
    return any(json.loads(line).get('id') == event_id for line in list(proc.out))


def test_a_megabyte_id_leaves_the_node_responsive_and_interruptible(ros, echo):
    proc, raw, _ = echo('hostile.id')
    huge = 'a' * 1_000_000
    # No type: refused, and the refusal is logged (the old path that quoted the id in full).
    raw.publish(Event(type='', id=huge).to_msg())
    raw.publish(Event(type='hostile', id=huge, source='s' * 100_000).to_msg())
    good = Event(type='good', id='after-the-attack')
    raw.publish(good.to_msg())
    ros.wait_for(lambda: _printed(proc, good.id), 'the valid event handled after the attack')
    assert proc.interrupt() == 0
    stats = json.loads(proc.err[-1])['stats']
    assert stats['rejected'] == {'oversize_field': 2}
    assert len(''.join(proc.err)) < 16_384    # the refusal was logged bounded
    assert 'oversize_field: id of 1000000 characters' in ''.join(proc.err)


def test_bus_log_lines_are_masked_on_stderr_and_in_the_ros_log_file(ros, echo):
    proc, raw, log_dir = echo('hostile.masking')
    secret = 'sk-live-0123456789abcdefSECRET'
    # The bus logs the refusal, quoting the id: a secret there must not reach any log.
    raw.publish(Event(type='', id=f'api_key={secret}').to_msg())
    good = Event(type='good', id='after-the-secret')
    raw.publish(good.to_msg())
    ros.wait_for(lambda: _printed(proc, good.id), 'the valid event after the secret')
    assert proc.interrupt() == 0
    stderr = ''.join(proc.err)
    assert 'missing_type: event api_key=*** has no type' in stderr
    files = [p for p in log_dir.rglob('*') if p.is_file()]
    assert files, 'rclpy wrote no log file'
    written = stderr + ''.join(p.read_text(errors='replace') for p in files)
    assert 'SECRET' not in written and '0123456789' not in written
