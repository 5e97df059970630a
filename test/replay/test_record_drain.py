"""`loom record` writes what already reached its readers when it is told to stop (`drain`). Found
in a full parallel test run: a loaded recorder was stopped with the recorded run's decisions
(reliable) delivered but not yet taken, and they were missing from the file. Real rclpy: a
reliable publisher and a subscription in this process, 200 messages in the reader's history and
none taken, then drain takes them all; and a drain with nothing waiting returns after one turn."""
from __future__ import annotations

from loom_ros.bus.qos import to_qos_profile
from loom_ros.cli.record import drain


def test_drain_takes_what_reached_the_reader_before_the_stop(ros):
    from std_msgs.msg import String
    got = []
    topic = 'record_drain_probe'
    qos = to_qos_profile('background')            # reliable, keep last 1000
    ros.node.create_subscription(String, topic, lambda m: got.append(m.data), qos)
    pub = ros.node.create_publisher(String, topic, qos)
    ros.wait_for(lambda: pub.get_subscription_count() >= 1, 'the subscription matched')
    for i in range(200):
        pub.publish(String(data=str(i)))
    assert got == []                               # delivered to the reader, not taken yet
    # generous turns: a turn that takes nothing ends the drain, so it must not end on a stall
    assert drain(ros.executor, lambda: len(got), turn_s=0.5, limit_s=60.0) == 200
    assert got == [str(i) for i in range(200)]
    assert drain(ros.executor, lambda: len(got), turn_s=0.05, limit_s=60.0) == 0


def test_a_failing_callback_does_not_end_the_drain(ros):
    """Found in a fresh clone's full run: the shared executor still held a timer event of a
    node an earlier test had destroyed, its callback raised inside drain, and the drain (and
    with it the file's last messages) ended there. Now it is counted, as spin_until counts it."""
    from std_msgs.msg import String

    from loom_ros.bus.executor import callback_errors
    got, fired = [], []
    topic = 'record_drain_failing'
    qos = to_qos_profile('background')

    def fail():
        fired.append(1)
        raise RuntimeError('a callback that fails')
    ros.node.create_subscription(String, topic, lambda m: got.append(m.data), qos)
    pub = ros.node.create_publisher(String, topic, qos)
    ros.wait_for(lambda: pub.get_subscription_count() >= 1, 'the subscription matched')
    before = callback_errors[ros.node.get_fully_qualified_name()]
    timer = ros.node.create_timer(0.05, fail)
    for i in range(50):
        pub.publish(String(data=str(i)))
    try:
        assert drain(ros.executor, lambda: len(got), turn_s=0.5, limit_s=60.0) == 50
    finally:
        ros.node.destroy_timer(timer)
    assert fired and callback_errors[ros.node.get_fully_qualified_name()] >= before + 1
