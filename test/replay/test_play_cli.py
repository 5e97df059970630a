"""`loom play` as a user runs it (a real process): a recording written by the real recorder comes
back on the same topics with the same bytes, in order, with /clock following the recording; a
hostile file plays what it can and its summary counts every skipped message under its reason;
a cut file says so (exit 1); bad arguments exit 2."""
from __future__ import annotations

import json

from mcap_files import T0, channel, message, raw, recorded, string_cdr, string_schema, write
from loom_ros.replay.mcap_source import (
    BAD_RECORD, INVALID_TOPIC, SCHEMA_MISMATCH, UNKNOWN_CHANNEL, UNKNOWN_TYPE,
)

NS = '/rpc'


def _summary(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_a_recording_plays_back_on_its_topics_in_order_with_the_clock(ros, spawn, tmp_path):
    from loom_msgs.msg import RouteDecision
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from std_msgs.msg import String
    step = 50_000_000
    path = recorded(tmp_path / 'rec.mcap', [
        msg for i in range(20) for msg in (
            (f'{NS}/chatter', 'std_msgs/msg/String', String(data=f'hello {i}'), T0 + i * step),
            (f'{NS}/router/decisions', 'loom_msgs/msg/RouteDecision',
             RouteDecision(decision_id=f'd{i}', route='local', confidence=0.5),
             T0 + i * step + 1))])
    got = {'chatter': [], 'decisions': [], 'clock': []}
    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    subs = [ros.node.create_subscription(String, f'{NS}/chatter',
                                         lambda m: got['chatter'].append(m.data), qos),
            ros.node.create_subscription(RouteDecision, f'{NS}/router/decisions',
                                         lambda m: got['decisions'].append(m.decision_id), qos),
            ros.node.create_subscription(Clock, '/clock', lambda m: got['clock'].append(
                m.clock.sec * 1_000_000_000 + m.clock.nanosec), qos)]
    try:
        # --drain: late in a full suite this process's side of a match can come after the
        # player's (which --wait-subscribers waits for), and the play ended before it did.
        player = spawn('-m', 'loom_ros.cli.play', str(path), '--rate', '4',
                       '--wait-subscribers', '60', '--drain', '60')
        ros.wait_for(lambda: len(got['chatter']) == 20 and len(got['decisions']) == 20,
                     'the played messages', alive=[player])
        code, out, err = player.finish()
    finally:
        for sub in subs:
            ros.node.destroy_subscription(sub)
    summary = _summary(out)
    assert code == 0 and summary['played'] == 40 and not summary['skipped'], (summary, err)
    assert summary['unacknowledged'] == [], summary
    assert got['chatter'] == [f'hello {i}' for i in range(20)]
    assert got['decisions'] == [f'd{i}' for i in range(20)]
    clock = [c for c in got['clock'] if c >= T0]
    assert clock and clock == sorted(clock) and clock[-1] <= T0 + 19 * step + 1
    assert summary['recording_s'] >= 0.95 and 'played 40' in err   # progress on stderr


def test_a_hostile_file_plays_what_it_can_and_counts_the_rest(spawn, tmp_path):
    from loom_ros.cli.record import ros2msg_schema
    real = ros2msg_schema('std_msgs/msg/String')
    path = write(
        tmp_path / 'hostile.mcap',
        string_schema(1, 'std_msgs/msg/String', real), channel(1, f'{NS}/ok'),
        string_schema(2, 'evil/msg/Nope', 'string data\n'), channel(2, f'{NS}/evil', 2),
        string_schema(3, 'std_msgs/msg/String', 'float64[] data\n'), channel(3, f'{NS}/other', 3),
        channel(4, '/no spaces allowed'),
        message(1, string_cdr('one'), T0), message(2, b'x'), message(3, b'x'), message(4, b'x'),
        message(1, b'\x00\x01\x00\x00\xff\xff\xff\x7f truncated CDR', T0 + 1),   # 2 GiB string
        message(9, b'x'), raw(0x05, b'\x01'),
        message(1, string_cdr('two'), T0 + 2))
    code, out, err = spawn('-m', 'loom_ros.cli.play', str(path), '--as-fast-as-possible',
                           '--quiet').finish()
    summary = _summary(out)
    assert code == 0, err
    assert summary['played'] == 2 and summary['by_topic'] == {f'{NS}/ok': 2}
    assert summary['skipped'] == {UNKNOWN_TYPE: 1, SCHEMA_MISMATCH: 1, INVALID_TOPIC: 1,
                                  'undecodable': 1, UNKNOWN_CHANNEL: 1, BAD_RECORD: 1}, summary
    assert set(summary['skip_examples']) == set(summary['skipped'])


def test_a_cut_file_and_bad_arguments_exit_non_zero(spawn, tmp_path, capsys):
    from std_msgs.msg import String

    from loom_ros.cli import play
    path = recorded(tmp_path / 'rec.mcap', [('/rpc/x', 'std_msgs/msg/String', String(data='a'),
                                             T0)])
    cut = tmp_path / 'cut.mcap'
    cut.write_bytes(path.read_bytes()[:60])
    code, out, err = spawn('-m', 'loom_ros.cli.play', str(cut), '--quiet').finish()
    assert code == 1 and 'cut short' in _summary(out)['error']
    # Refused before anything starts (no ROS context is made for them).
    for args, why in ((['--rate', '0'], 'rate must be > 0'),
                      (['--start', '5', '--end', '1'], 'before start'),
                      (['--wait-subscribers', '-1'], 'must be >= 0'),
                      (['--drain', '-1'], 'drain must be 0-3600'),
                      (['--drain', '1e9'], 'drain must be 0-3600'),
                      (['--drain', 'nan'], 'drain must be 0-3600'),
                      (['--max-message-mb', '1e9'], 'max-message-mb')):
        assert play.main([str(path), *args]) == 2
        assert why in capsys.readouterr().err
    assert play.main([str(tmp_path / 'none.mcap')]) == 2
    assert 'no such file' in capsys.readouterr().err


def test_the_loom_command_has_play_and_router_train():
    from loom_ros.cli import build_parser
    from loom_ros.cli.play import options_of
    args = build_parser().parse_args(['play', 'x.mcap', '--rate', '2', '--topics', 'a', '/b',
                                      '--start', '1', '--end', '2', '--loop'])
    options = options_of(args)
    assert options.rate == 2 and options.loop and options.topics == {'/a', '/b'}
    assert (options.start_s, options.end_s) == (1, 2) and callable(args.run)
    args = build_parser().parse_args(['router', 'train', '--from', 'recordings/'])
    assert args.sources == ['recordings/'] and callable(args.run)


def test_a_mailed_recording_never_drives_the_actuators_unless_named(ros, spawn, tmp_path):
    """One 9 KB file had released the e-stop, driven cmd_vel at 50 m/s around robot_control's
    limits and sent robot.move and tts.say: every actuator topic is refused and counted unless
    --allow-actuator names it; the rest plays."""
    from geometry_msgs.msg import Twist
    from loom_msgs.msg import Event as EventMsg
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from std_msgs.msg import Bool, String
    fast = Twist()
    fast.linear.x, fast.angular.z = 50.0, 30.0
    path = recorded(tmp_path / 'mailed.mcap', [
        msg for i in range(3) for msg in (
            ('/estop', 'std_msgs/msg/Bool', Bool(data=False), T0 + 10 * i),
            (f'{NS}/cmd_vel', 'geometry_msgs/msg/Twist', fast, T0 + 10 * i + 1),
            (f'{NS}/loom/robot/move', 'loom_msgs/msg/Event',
             EventMsg(type='robot.move', payload=list(b'{"duration_s": 60}')), T0 + 10 * i + 2),
            ('/loom/tts/say', 'loom_msgs/msg/Event', EventMsg(type='tts.say'), T0 + 10 * i + 3),
            (f'{NS}/chatter', 'std_msgs/msg/String', String(data=f'hi {i}'), T0 + 10 * i + 4))])
    got = {'estop': [], 'chatter': []}
    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    subs = [ros.node.create_subscription(Bool, '/estop', lambda m: got['estop'].append(m.data),
                                         qos),
            ros.node.create_subscription(String, f'{NS}/chatter',
                                         lambda m: got['chatter'].append(m.data), qos)]
    try:
        code, out, err = spawn('-m', 'loom_ros.cli.play', str(path), '--as-fast-as-possible',
                               '--drain', '0', '--quiet').finish()
        summary = _summary(out)
        assert code == 0 and summary['played'] == 3, (summary, err)
        assert summary['skipped'] == {'actuator_topic': 12}, summary
        assert summary['by_topic'] == {f'{NS}/chatter': 3}
        # named, it plays (loudly): the e-stop release reaches a subscriber
        player = spawn('-m', 'loom_ros.cli.play', str(path), '--as-fast-as-possible',
                       '--allow-actuator', '/estop', '--wait-subscribers', '60', '--drain', '60',
                       '--quiet')
        ros.wait_for(lambda: len(got['estop']) == 3, 'the allowed e-stop messages',
                     alive=[player])
        code, out, err = player.finish()
        summary = _summary(out)
        assert code == 0 and summary['skipped'] == {'actuator_topic': 9}, summary
        assert 'WARNING: playing actuator topics' in err and got['estop'] == [False] * 3
    finally:
        for sub in subs:
            ros.node.destroy_subscription(sub)
