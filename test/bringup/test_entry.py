"""How Loom processes start (loom_ros/bringup/entry.py): a Ctrl-C while a node's module is still
being imported ends the process quietly with 0 instead of a KeyboardInterrupt traceback and a
death by SIGINT (what `ros2 launch` stopped as it starts printed for every node); main()'s code
and argv pass through. Real processes and a real SIGINT; the slow import is a module that
waits in it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from harness import REPO, WAIT_LIMIT_S, console_scripts
from loom_ros.bringup import entry

# A module whose import lasts until a signal interrupts it, after saying it has begun.
SLOW_IMPORT = '''import os, pathlib, signal
pathlib.Path(os.environ['LOOM_TEST_IMPORTING']).write_text('importing')
while True:
    signal.pause()
'''


def _interrupted_while_importing(tmp_path, code: str) -> subprocess.CompletedProcess:
    """Run `python -c code` (which imports slow_start), SIGINT it once it is inside the import."""
    (tmp_path / 'slow_start.py').write_text(SLOW_IMPORT)
    marker = tmp_path / 'importing'
    marker.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), str(REPO), os.environ.get('PYTHONPATH', '')]),
        LOOM_TEST_IMPORTING=str(marker))
    # SIGINT as a terminal or launch leaves it: an xdist worker ignores it, and its children
    # would inherit that (Python then installs no KeyboardInterrupt at all).
    proc = subprocess.Popen([sys.executable, '-c', code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not marker.exists():   # a condition: the import has begun
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, 'the import never began'
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=WAIT_LIMIT_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_ctrl_c_during_the_import_ends_the_process_quietly_with_0(tmp_path):
    done = _interrupted_while_importing(
        tmp_path, 'import sys; from loom_ros.bringup.entry import start; '
        'sys.exit(start("slow_start"))')
    assert done.returncode == 0 and done.stderr == '' and done.stdout == '', done


def test_without_the_entry_the_same_ctrl_c_prints_a_traceback(tmp_path):
    # What every node did before (the console script imported the module itself).
    done = _interrupted_while_importing(tmp_path, 'import slow_start')
    assert done.returncode == -signal.SIGINT and 'KeyboardInterrupt' in done.stderr, done


def test_main_s_code_passes_through(tmp_path, monkeypatch):
    (tmp_path / 'entry_three.py').write_text('def main():\n    return 3\n')
    (tmp_path / 'entry_none.py').write_text('def main():\n    pass\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert entry.start('entry_three') == 3
    assert entry.start('entry_none') == 0


def test_python_m_entry_hands_the_module_its_arguments():
    done = subprocess.run([*entry.command('loom_ros.bridge.zenoh_router'), '--no-such-option'],
                          capture_output=True, text=True, cwd=REPO, timeout=WAIT_LIMIT_S)
    # argparse of zenoh_router's main() saw the arguments after the module, not the module
    assert done.returncode == 2, done
    assert 'zenoh_router: error: unrecognized arguments: --no-such-option' in done.stderr


def test_only_loom_process_modules_are_started():
    done = subprocess.run([sys.executable, '-m', 'loom_ros.bringup.entry', 'os'],
                          capture_output=True, text=True, cwd=REPO, timeout=WAIT_LIMIT_S)
    assert done.returncode == 2 and 'MODULE one of' in done.stderr, done
    with pytest.raises(ValueError, match='not a Loom process module'):
        entry.command('subprocess')


def test_every_process_console_script_goes_through_the_entry():
    scripts = console_scripts()
    through = {name for name, target in scripts.items()
               if target.startswith('loom_ros.bringup.entry:')}
    assert through == set(entry.MODULES)
    assert set(scripts) - through == {'loom', 'loom_status'}   # commands, not processes
    for name in through:
        assert scripts[name] == f'loom_ros.bringup.entry:{name}'
        assert callable(getattr(entry, name))
