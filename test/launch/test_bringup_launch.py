"""Runs the launch_testing test of bringup.launch.py (bringup_launch_checks.py) with `launch_test`,
where launch, launch_ros and launch_testing are installed (a ROS install, or built by hand as
/work/shared/ENVIRONMENT.md says); skipped elsewhere (CI installs ROS from PyPI wheels, which have
no launch)."""
import importlib
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import REPO, WAIT_LIMIT_S

# Not named test_*.py or *_test.py: pytest must not collect it (it needs launch_test's fixtures).
LAUNCH_TEST = Path(__file__).with_name('bringup_launch_checks.py')


def _launch_test_command() -> list[str]:
    for module in ('launch', 'launch_testing'):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f'{module} is not installed')
    try:
        importlib.import_module('launch_ros.actions')
    except ImportError as exc:   # launch_ros needs composition_interfaces
        pytest.skip(f'launch_ros is not usable here: {exc}')
    runner = shutil.which('launch_test')
    if runner is None:
        pytest.skip('no launch_test executable on PATH')
    return [runner, str(LAUNCH_TEST)]


def test_bringup_launch_file_under_launch_testing(tmp_path):
    cmd = _launch_test_command()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                            timeout=8 * WAIT_LIMIT_S)   # its own waits are bounded inside
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert 'test_every_node_is_active_and_an_event_goes_through_each_flow' in out
    assert 'test_every_process_exits_cleanly_on_sigint' in out and 'FAILED' not in out
    assert 'terminate called' not in out and 'Fatal Python error' not in out
