"""Loom topic names: mapping to ROS 2 and Zenoh, refusals with reasons, patterns."""
import pytest
from hypothesis import given, strategies as st
from rclpy.validate_full_topic_name import validate_full_topic_name

from loom_ros.bus.names import (
    TopicNameError, TopicPattern, from_ros_topic, to_ros_topic, to_zenoh_key, validate_topic,
)

segment = st.from_regex(r'[A-Za-z][A-Za-z0-9]{0,6}(_[A-Za-z0-9]{1,4})?', fullmatch=True)
topic = st.lists(segment, min_size=1, max_size=6).map('.'.join)


def test_seed_topic_maps_to_relative_ros_topic_and_zenoh_key():
    assert to_ros_topic('camera.front.face') == 'loom/camera/front/face'
    assert to_zenoh_key('camera.front.face') == 'loom/camera/front/face'


@given(topic, st.sampled_from(['/', '/robot1', '/fleet/robot_2']))
def test_round_trip_through_ros_names_rclpy_accepts(name, namespace):
    relative = to_ros_topic(name)
    full = namespace.rstrip('/') + '/' + relative
    assert validate_full_topic_name(full)  # rclpy's own validator raises if ROS would refuse it
    assert from_ros_topic(relative) == name
    assert from_ros_topic(full, namespace) == name


def test_topics_outside_loom_or_namespace_are_not_loom_topics():
    assert from_ros_topic('/rosout') is None
    assert from_ros_topic('/robot2/loom/camera/front', '/robot1') is None
    assert from_ros_topic('/loom/camera/front', '/') == 'camera.front'


@pytest.mark.parametrize('name, why', [
    ('', 'empty'),
    ('camera..face', 'empty segment'),
    ('.camera', "starts with '.'"),
    ('camera.', "ends with '.'"),
    ('camera.2front', 'starts with a digit'),
    ('camera.front-left', "forbid: '-'"),
    ('camera/front', "contains '/'"),
    ('camera.front__left', "repeats '_'"),
    ('caméra.front', 'forbid'),
    ('camera.*', 'only allowed in subscription patterns'),
    ('a' * 201, 'longer than 200'),
])
def test_bad_names_are_refused_with_the_reason(name, why):
    with pytest.raises(TopicNameError) as info:
        validate_topic(name)
    assert why in str(info.value)


def test_non_string_name_is_refused():
    with pytest.raises(TopicNameError, match='expected a string'):
        validate_topic(42)


@pytest.mark.parametrize('pattern, topic, matches', [
    ('camera.front.face', 'camera.front.face', True),
    ('camera.front.face', 'camera.front', False),
    ('agent.*.intent', 'agent.face.intent', True),
    ('agent.*.intent', 'agent.intent', False),
    ('agent.*.intent', 'agent.a.b.intent', False),
    ('camera.**', 'camera', True),
    ('camera.**', 'camera.front.face', True),
    ('camera.**', 'mic.primary', False),
    ('**.face', 'camera.front.face', True),
    ('**', 'anything.at.all', True),
    ('a.**.z', 'a.z', True),
    ('a.**.z', 'a.b.c.z', True),
    ('a.**.z', 'a.b.c', False),
])
def test_pattern_semantics(pattern, topic, matches):
    assert TopicPattern.parse(pattern).matches(topic) is matches


@pytest.mark.parametrize('pattern, why', [
    ('camera.fr*', "'*' must stand alone"),
    ('camera.**.**', 'redundant'),
    ('camera..x', 'empty segment'),
])
def test_bad_patterns_are_refused(pattern, why):
    with pytest.raises(TopicNameError, match=why):
        TopicPattern.parse(pattern)


def test_pattern_as_zenoh_key_expression():
    assert TopicPattern.parse('agent.*.intent').to_zenoh_key_expr() == 'loom/agent/*/intent'
