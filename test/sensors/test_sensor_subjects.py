"""Whom the simulated sensors show and hear (issue 17): a camera event names the camera_adapter's
`subject`, a mic chunk the speaker sim_sensors' `mic_subjects` gives its utterance; ids are
checked like every data subject's, so a typo stops the node instead of making data anonymous.
The flows with these subjects, through to erasure, are in test/flows/test_flows.py."""
from __future__ import annotations

import pytest

from loom_ros.bus.privacy import SUBJECT_METADATA_KEY, SubjectError
from loom_ros.sensors.camera_adapter_node import frame_to_event
from loom_ros.sensors.sim_sensors_node import mic_subjects


def _image():
    from sensor_msgs.msg import Image
    msg = Image(width=2, height=2, encoding='rgb8', step=6, data=bytes(range(12)))
    msg.header.frame_id = 'camera_front_optical'
    return msg


def test_a_camera_event_names_the_adapters_subject_and_none_by_default():
    named = frame_to_event(_image(), 'camera.front', 'face:1234')
    assert named.metadata[SUBJECT_METADATA_KEY] == 'face:1234'
    assert named.payload == bytes(range(12)) and named.metadata['width'] == '2'
    assert SUBJECT_METADATA_KEY not in frame_to_event(_image(), 'camera.front').metadata


def test_mic_subjects_are_checked_and_empty_means_anonymous():
    assert mic_subjects([]) == [''] and mic_subjects(['']) == ['']
    assert mic_subjects(['alice', '', 'bob@example.org']) == ['alice', '', 'bob@example.org']
    for hostile in ('../etc', 'x y', 'a' * 5000, 'a..b'):
        with pytest.raises(SubjectError):
            mic_subjects(['alice', hostile])
