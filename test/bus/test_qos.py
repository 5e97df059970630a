"""The QoS table: rclpy profiles and Zenoh options made from it, and per-topic levels."""
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import zenoh
from rclpy.qos import DurabilityPolicy, HistoryPolicy, ReliabilityPolicy

from loom_ros.bus.qos import (
    QOS_TABLE, QosLevel, TopicQosTable, UnknownQosLevel, fastdds_environment, parse_level,
    to_qos_profile, to_zenoh_options,
)
from loom_ros.config.params import config_dir


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


# -- the Fast DDS profile for large payloads ------------------------------------------------------
def test_fastdds_environment_points_at_the_shipped_profile(tmp_path):
    env = fastdds_environment({}, config_dir())
    assert list(env) == ['FASTDDS_DEFAULT_PROFILES_FILE']
    assert Path(env['FASTDDS_DEFAULT_PROFILES_FILE']).is_file()
    assert fastdds_environment({'RMW_IMPLEMENTATION': 'rmw_fastrtps_dynamic_cpp'}, tmp_path) == {
        'FASTDDS_DEFAULT_PROFILES_FILE': str(tmp_path / 'fastdds.xml')}


def test_fastdds_environment_uses_the_variable_fast_dds_2_reads_on_jazzy(tmp_path):
    assert fastdds_environment({'ROS_DISTRO': 'jazzy'}, tmp_path) == {
        'FASTRTPS_DEFAULT_PROFILES_FILE': str(tmp_path / 'fastdds.xml')}


@pytest.mark.parametrize('environ', [
    {'FASTDDS_DEFAULT_PROFILES_FILE': '/etc/robot/dds.xml'},
    {'FASTRTPS_DEFAULT_PROFILES_FILE': '/etc/robot/dds.xml'},
    {'FASTDDS_BUILTIN_TRANSPORTS': 'LARGE_DATA'},
    {'RMW_IMPLEMENTATION': 'rmw_cyclonedds_cpp'},
    {'RMW_IMPLEMENTATION': 'rmw_zenoh_cpp'},
])
def test_fastdds_environment_leaves_a_users_choice_alone(environ, tmp_path):
    assert fastdds_environment(environ, tmp_path) == {}


def test_shipped_profile_gives_shared_memory_room_for_camera_frames():
    """The profile's point: a shared-memory segment that holds several 640x480 RGB events."""
    ns = {'d': 'http://www.eprosima.com'}
    root = ET.parse(config_dir() / 'fastdds.xml').getroot()
    shm = [t for t in root.iterfind('.//d:transport_descriptor', ns)
           if t.findtext('d:type', namespaces=ns) == 'SHM']
    assert len(shm) == 1
    assert int(shm[0].findtext('d:segment_size', namespaces=ns)) >= 8 * 640 * 480 * 3
    participant = root.find('.//d:participant', ns)
    assert participant.get('is_default_profile') == 'true'
    used = [e.text for e in participant.iterfind('.//d:userTransports/d:transport_id', ns)]
    assert shm[0].findtext('d:transport_id', namespaces=ns) in used
    assert participant.findtext('.//d:useBuiltinTransports', namespaces=ns) == 'false'
