"""A camera node started without Loom's Fast DDS profile says so at once (its frames would be
lost between processes), and says nothing when the profile or the user's own setting is there."""
from loom_ros.sensors.camera_adapter_node import warn_without_frame_transport


class Lines:
    def __init__(self):
        self.lines = []

    def warning(self, text):
        self.lines.append(text)


def test_warns_without_a_profile(tmp_path):
    log = Lines()
    assert warn_without_frame_transport(log, {}, tmp_path)
    assert len(log.lines) == 1
    assert f'FASTDDS_DEFAULT_PROFILES_FILE={tmp_path / "fastdds.xml"}' in log.lines[0]
    assert 'lost between processes' in log.lines[0]


def test_quiet_with_the_profile_or_a_users_transport_or_another_rmw(tmp_path):
    for environ in ({'FASTDDS_DEFAULT_PROFILES_FILE': str(tmp_path / 'fastdds.xml')},
                    {'FASTDDS_BUILTIN_TRANSPORTS': 'LARGE_DATA'},
                    {'RMW_IMPLEMENTATION': 'rmw_cyclonedds_cpp'}):
        log = Lines()
        assert not warn_without_frame_transport(log, environ, tmp_path)
        assert log.lines == []
