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
