"""The one place where Loom's QoS levels are defined and mapped onto ROS 2 and Zenoh.

| level      | ROS 2 reliability | durability      | history        | Zenoh priority | congestion | express |
|------------|-------------------|-----------------|----------------|----------------|------------|---------|
| realtime   | best effort       | volatile        | keep last 10   | REAL_TIME      | DROP       | yes     |
| batched    | reliable          | volatile        | keep last 100  | DATA           | BLOCK      | no      |
| background | reliable          | transient local | keep last 1000 | BACKGROUND     | BLOCK      | no      |

Realtime trades delivery for latency (a late frame is worth nothing); Batched guarantees delivery
between live endpoints; Background is delay tolerant and keeps history for late joiners.
No lifespan or deadline by default: both compare clocks across hosts, and robots' clocks drift.
The table is plain data; `to_qos_profile` and `to_zenoh_options` turn a row into library objects.

Large payloads across processes (camera frames) also need a transport setting, not a QoS row:
Fast DDS's builtin shared-memory segment (512 KB) is smaller than one 640x480 RGB frame, and
best-effort frames were lost in it (bench/results/camera.md). `fastdds_environment` says which
environment variables point a Loom process at config/fastdds.xml, the profile that fixes it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from loom_ros.bus.names import TopicPattern


class QosLevel(str, Enum):
    REALTIME = 'realtime'
    BATCHED = 'batched'
    BACKGROUND = 'background'


class UnknownQosLevel(ValueError):
    """A QoS level that is not one of realtime / batched / background."""


@dataclass(frozen=True)
class QosSpec:
    reliability: str      # 'best_effort' | 'reliable'
    durability: str       # 'volatile' | 'transient_local'
    depth: int            # KEEP_LAST depth
    zenoh_priority: str   # name of a zenoh.Priority member
    zenoh_congestion: str  # name of a zenoh.CongestionControl member
    zenoh_express: bool


QOS_TABLE: dict[QosLevel, QosSpec] = {
    QosLevel.REALTIME: QosSpec('best_effort', 'volatile', 10, 'REAL_TIME', 'DROP', True),
    QosLevel.BATCHED: QosSpec('reliable', 'volatile', 100, 'DATA', 'BLOCK', False),
    QosLevel.BACKGROUND: QosSpec('reliable', 'transient_local', 1000, 'BACKGROUND', 'BLOCK', False),
}

DEFAULT_LEVEL = QosLevel.BATCHED


def parse_level(value: object) -> QosLevel:
    """Accept a QosLevel or its name in any case; anything else raises UnknownQosLevel."""
    if isinstance(value, QosLevel):
        return value
    if isinstance(value, str):
        try:
            return QosLevel(value.strip().lower())
        except ValueError:
            pass
    raise UnknownQosLevel(
        f'unknown QoS level {value!r}: expected one of {", ".join(l.value for l in QosLevel)}')


class TopicQosTable:
    """Per-topic QoS levels from config: entries `pattern=level`, first match wins."""

    def __init__(self, entries: list[str] | tuple[str, ...] = (), default: QosLevel = DEFAULT_LEVEL):
        self.default = parse_level(default)
        self.rules: list[tuple[TopicPattern, QosLevel]] = []
        for entry in entries:
            if not isinstance(entry, str) or entry.count('=') != 1:
                raise ValueError(f"topic_qos entry {entry!r}: expected 'pattern=level'")
            pattern, level = (part.strip() for part in entry.split('='))
            self.rules.append((TopicPattern.parse(pattern), parse_level(level)))

    def level_for(self, topic: str) -> QosLevel:
        for pattern, level in self.rules:
            if pattern.matches(topic):
                return level
        return self.default


def to_qos_profile(level: QosLevel | str):
    """The rclpy QoSProfile for a level (imports rclpy lazily: the core stays ROS-free)."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    spec = QOS_TABLE[parse_level(level)]
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=spec.depth,
        reliability=(ReliabilityPolicy.BEST_EFFORT if spec.reliability == 'best_effort'
                     else ReliabilityPolicy.RELIABLE),
        durability=(DurabilityPolicy.TRANSIENT_LOCAL if spec.durability == 'transient_local'
                    else DurabilityPolicy.VOLATILE),
    )


def to_zenoh_options(level: QosLevel | str) -> dict:
    """Keyword arguments for `zenoh.Session.declare_publisher` / `put` for a level."""
    import zenoh
    spec = QOS_TABLE[parse_level(level)]
    return {
        'priority': getattr(zenoh.Priority, spec.zenoh_priority),
        'congestion_control': getattr(zenoh.CongestionControl, spec.zenoh_congestion),
        'express': spec.zenoh_express,
    }


def wire_type(level: QosLevel | str) -> str:
    """The ROS type a level's topics carry: Batched travels as EventBatch, the others as Event."""
    return 'EventBatch' if parse_level(level) is QosLevel.BATCHED else 'Event'


def levels_compatible(publisher: QosLevel | str, subscriber: QosLevel | str) -> bool:
    """Would DDS connect a publisher and a subscription at these levels (same type, QoS rules)?"""
    pub, sub = QOS_TABLE[parse_level(publisher)], QOS_TABLE[parse_level(subscriber)]
    if wire_type(publisher) != wire_type(subscriber):
        return False
    if pub.reliability == 'best_effort' and sub.reliability == 'reliable':
        return False
    return not (pub.durability == 'volatile' and sub.durability == 'transient_local')


# -- transport for large payloads (Fast DDS) -----------------------------------------------------
FASTDDS_PROFILE_FILE = 'fastdds.xml'
# Fast DDS 3 (Kilted on) reads the first; Fast DDS 2 (Humble, Jazzy) the second, which Kilted's
# rmw still reads with a deprecation warning: only the one the distribution reads is set.
FASTDDS_PROFILE_VARS = ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE')
FASTDDS_2_DISTROS = ('humble', 'iron', 'jazzy')
# Any of these set means the user chose Fast DDS's transports themselves: Loom leaves them be.
FASTDDS_USER_VARS = FASTDDS_PROFILE_VARS + ('FASTDDS_BUILTIN_TRANSPORTS',)
FASTDDS_RMWS = ('rmw_fastrtps_cpp', 'rmw_fastrtps_dynamic_cpp')
DEFAULT_RMW = 'rmw_fastrtps_cpp'   # Kilted's default when RMW_IMPLEMENTATION is unset


def rmw_of(environ: Mapping[str, str]) -> str:
    """The rmw a process started with `environ` runs (RMW_IMPLEMENTATION, else Kilted's)."""
    return (environ.get('RMW_IMPLEMENTATION') or DEFAULT_RMW).strip()


def fastdds_environment(environ: Mapping[str, str], config_dir: Path | str) -> dict[str, str]:
    """Variables to add to a Loom process's environment so Fast DDS loads Loom's profile
    (config/fastdds.xml: a shared-memory segment that holds camera frames). Empty when the rmw
    is not Fast DDS or the user already set a profile or builtin transports of their own.
    Pure: the caller (bring-up, the launch file, a test) applies it before rclpy starts."""
    if rmw_of(environ) not in FASTDDS_RMWS or any(environ.get(n) for n in FASTDDS_USER_VARS):
        return {}
    fastdds_2 = (environ.get('ROS_DISTRO') or '').strip().lower() in FASTDDS_2_DISTROS
    return {FASTDDS_PROFILE_VARS[1 if fastdds_2 else 0]:
            str(Path(config_dir) / FASTDDS_PROFILE_FILE)}
