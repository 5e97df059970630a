"""What in-process Bridge tests share: a clock the test steps, a transport that takes every put,
a robot.move event and a bridge that takes signed commands. No ROS, no Zenoh."""
from __future__ import annotations

from loom_ros.bridge.core import Bridge, BridgeConfig
from loom_ros.bus.event import Event
from loom_ros.bus.qos import QosLevel


class Clock:
    """Seconds (what Bridge's clock reads) and ms (its wall_ms), stepped by setting `s`."""

    def __init__(self):
        self.s = 1000.0

    def __call__(self):
        return self.s

    def ms(self):
        return int(self.s * 1000)


class Recorder:
    """A connected transport that keeps what was put."""

    connected = True

    def __init__(self):
        self.puts = []

    def ready(self, key, level):
        return True

    def put(self, key, data, level):
        self.puts.append((key, data))


def move(x=0.2):
    return Event.with_json('robot.move', {'linear': {'x': x}}, metadata={'privacy': 'public'})


def command_bridge(ca_root, clock, contract, **kwargs) -> tuple[Bridge, list]:
    """Robot r1's Bridge (everything allowed out, an outbox of 10, Batched) taking inbound
    commands under `contract`, signed by members of the fleet whose authority is in `ca_root`:
    (the bridge, its command audit as a list). `kwargs` go to Bridge (seal_to, keys_dir...)."""
    audit = []
    config = BridgeConfig.from_params({'robot_id': 'r1', 'out_allow': ['**'], 'out_deny': [],
                                       'buffer_max_events': 10}, contract)
    bridge = Bridge(config, Recorder(), lambda t: QosLevel.BATCHED, command_audit=audit.append,
                    ca_pem=(ca_root / 'ca.pem').read_bytes(), clock=clock, wall_ms=clock.ms,
                    **kwargs)
    return bridge, audit

