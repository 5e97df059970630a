"""How every Loom process starts: the console scripts (setup.py) and the `python -m` spawns of
bring-up, the demo and the lifecycle manager all come here, which imports the process's module
and runs its main().

Why: a node's module imports rclpy, numpy, onnxruntime, faiss, ... for a second or more. A
Ctrl-C in that window (`ros2 launch` stopped as it starts) raised KeyboardInterrupt inside an
import: every such process printed a traceback and died by SIGINT, which launch reports as
"process has died [exit code -2]". Nothing has started then, so there is nothing to clean up:
the process exits 0, quietly, as its main() does for a Ctrl-C once it runs (main() installs
its own handler early; a Ctrl-C that escapes it came before, when nothing had started either).
This module imports only the standard library (5 ms; the node table, loom_ros.bringup.nodes,
takes 70 ms with yaml), so its own window is as short as it can be; MODULES repeats the
table's executables for that reason, and test_node_table keeps the two in step.

    python -m loom_ros.bringup.entry loom_ros.agents.agent_node --ros-args ...
"""
from __future__ import annotations

import importlib
import sys

# console script -> the module whose main() it runs (setup.py points each script here)
MODULES = {
    'sim_sensors': 'loom_ros.sensors.sim_sensors_node',
    'camera_adapter': 'loom_ros.sensors.camera_adapter_node',
    'loom_record': 'loom_ros.cli.record',
    'event_monitor': 'loom_ros.bus.event_monitor_node',
    'router': 'loom_ros.router.router_node',
    'agent': 'loom_ros.agents.agent_node',
    'lifecycle_manager': 'loom_ros.bringup.lifecycle_manager_node',
    'plugin_host': 'loom_ros.plugins.host_node',
    'zenoh_bridge': 'loom_ros.bridge.bridge_node',
    'storage_node': 'loom_ros.storage.ros2.node',
    'zenoh_router': 'loom_ros.bridge.zenoh_router',
    'loom_cloud': 'loom_ros.cloud.server',
}
STARTABLE = frozenset(MODULES.values())


def start(module: str) -> int:
    """Import `module` and return what its main() returns (0 when it returns None); 0 when a
    Ctrl-C stops it before main() took over."""
    try:
        main = importlib.import_module(module).main
        code = main()
    except KeyboardInterrupt:
        return 0
    return 0 if code is None else code


def command(module: str, python: str | None = None) -> list[str]:
    """The argv that starts `module` as its own process through here (add its arguments)."""
    if module not in STARTABLE:
        raise ValueError(f'{module!r} is not a Loom process module')
    return [python or sys.executable, '-m', __name__, module]


def _script(name: str):
    module = MODULES[name]

    def script() -> int:
        return start(module)
    script.__name__ = script.__qualname__ = name
    script.__doc__ = f'The `{name}` console script: {module}.main().'
    return script


def __getattr__(name: str):
    """`loom_ros.bringup.entry:<script>` (setup.py): each console script is a function that
    starts its module; made when asked for (PEP 562), one per MODULES entry."""
    if name in MODULES:
        return _script(name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or argv[1] not in STARTABLE:
        print(f'usage: python -m {__name__} MODULE [ARGS...]; MODULE one of: '
              f'{", ".join(sorted(STARTABLE))}', file=sys.stderr)
        return 2
    module = argv.pop(1)   # the module's main() reads sys.argv as if it were run itself
    return start(module)


if __name__ == '__main__':
    sys.exit(main())
