"""The QoS table: rclpy profiles and Zenoh options made from it, and per-topic levels."""
import pytest
import zenoh
from rclpy.qos import DurabilityPolicy, HistoryPolicy, ReliabilityPolicy

from loom_ros.bus.qos import (
    QOS_TABLE, QosLevel, TopicQosTable, UnknownQosLevel, parse_level, to_qos_profile,
    to_zenoh_options,
)


def test_ros_profiles():
    rt = to_qos_profile('realtime')
    assert (rt.reliability, rt.durability, rt.history, rt.depth) == (
        ReliabilityPolicy.BEST_EFFORT, DurabilityPolicy.VOLATILE, HistoryPolicy.KEEP_LAST, 10)
    batched = to_qos_profile(QosLevel.BATCHED)
    assert (batched.reliability, batched.durability) == (
        ReliabilityPolicy.RELIABLE, DurabilityPolicy.VOLATILE)
    bg = to_qos_profile('BACKGROUND')
    assert (bg.reliability, bg.durability, bg.depth) == (
        ReliabilityPolicy.RELIABLE, DurabilityPolicy.TRANSIENT_LOCAL, 1000)


def test_zenoh_options_are_accepted_by_a_real_zenoh_publisher():
    conf = zenoh.Config()
    conf.insert_json5('scouting/multicast/enabled', 'false')
    conf.insert_json5('listen/endpoints', '[]')
    with zenoh.open(conf) as session:
        for level in QosLevel:
            options = to_zenoh_options(level)
            publisher = session.declare_publisher('loom/test/qos', **options)
            assert publisher.priority == options['priority']
            assert publisher.congestion_control == options['congestion_control']
            publisher.undeclare()
    assert to_zenoh_options('realtime') == {'priority': zenoh.Priority.REAL_TIME,
                                            'congestion_control': zenoh.CongestionControl.DROP,
                                            'express': True}


def test_every_level_has_a_row():
    assert set(QOS_TABLE) == set(QosLevel)


@pytest.mark.parametrize('bad', ['fast', '', None, 3])
def test_unknown_level_is_refused(bad):
    with pytest.raises(UnknownQosLevel, match='expected one of realtime, batched, background'):
        parse_level(bad)


def test_topic_table_first_match_wins_and_default():
    table = TopicQosTable(['camera.front.face=background', 'camera.**=realtime'], 'batched')
    assert table.level_for('camera.front.face') is QosLevel.BACKGROUND
    assert table.level_for('camera.rear') is QosLevel.REALTIME
    assert table.level_for('mic.primary') is QosLevel.BATCHED


@pytest.mark.parametrize('entry', ['camera.**', 'camera.**=fast', 'a=b=c', 'bad..x=realtime'])
def test_topic_table_refuses_bad_entries(entry):
    with pytest.raises(ValueError):
        TopicQosTable([entry])
