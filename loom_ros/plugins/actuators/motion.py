"""Motion safety for robot control, in plain Python: velocity clamps, an acceleration ramp, a
watchdog that stops the robot when commands stop arriving, and a latching e-stop.

The ROS shell (robot_control.py) only publishes what this decides, so every rule here is tested
with an injected clock and no rclpy. Stops (e-stop, watchdog) are immediate zeros, not ramps:
the acceleration limit is for comfort and hardware, a stop is for safety.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

Vector3 = tuple[float, float, float]
ZERO: Vector3 = (0.0, 0.0, 0.0)
AXES = ('x', 'y', 'z')


class MotionError(ValueError):
    """A move command that cannot be used (wrong shape, non-numeric or non-finite values)."""


@dataclass(frozen=True)
class Velocity:
    """A twist: linear (m/s) and angular (rad/s) velocity, x/y/z each."""

    linear: Vector3 = ZERO
    angular: Vector3 = ZERO

    def is_zero(self) -> bool:
        return self.linear == ZERO and self.angular == ZERO

    def as_dict(self) -> dict:
        return {'linear': dict(zip(AXES, self.linear)), 'angular': dict(zip(AXES, self.angular))}


STOP = Velocity()


def _vector(name: str, value: object) -> Vector3:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f'{name} must be three numbers [x, y, z], got {value!r}')
    out = []
    for axis, v in zip(AXES, value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f'{name}.{axis} must be a finite number >= 0, got {v!r}')
        out.append(float(v))
    return tuple(out)


@dataclass(frozen=True)
class MotionLimits:
    """Per-axis speed limits (0 disables an axis: a diff-drive base has only linear.x and
    angular.z) and per-axis acceleration limits, linear and angular."""

    max_linear: Vector3 = (0.5, 0.0, 0.0)      # m/s
    max_angular: Vector3 = (0.0, 0.0, 1.0)     # rad/s
    max_linear_accel: float = 1.0              # m/s^2, each axis
    max_angular_accel: float = 2.0             # rad/s^2, each axis

    def __post_init__(self):
        object.__setattr__(self, 'max_linear', _vector('max_linear', self.max_linear))
        object.__setattr__(self, 'max_angular', _vector('max_angular', self.max_angular))
        for name in ('max_linear_accel', 'max_angular_accel'):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v <= 0:
                raise ValueError(f'{name} must be a finite number > 0, got {v!r}')
            object.__setattr__(self, name, float(v))

    def clamp(self, velocity: Velocity) -> Velocity:
        return Velocity(_clamp3(velocity.linear, self.max_linear),
                        _clamp3(velocity.angular, self.max_angular))


def _clamp3(v: Vector3, limit: Vector3) -> Vector3:
    return tuple(max(-m, min(m, x)) + 0.0 for x, m in zip(v, limit))  # + 0.0: no -0.0


def _ramp3(current: Vector3, target: Vector3, bound: float) -> Vector3:
    """Move each axis toward its target by at most `bound`; land exactly on it when close."""
    out = []
    for c, t in zip(current, target):
        delta = t - c
        out.append((t if abs(delta) <= bound else c + math.copysign(bound, delta)) + 0.0)
    return tuple(out)


# -- parsing robot.move payloads --------------------------------------------------------------
_FLAT = {f'{part}_{axis}' for part in ('linear', 'angular') for axis in AXES}


def _number(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MotionError(f'{where} must be a number, got {value!r}')
    if not math.isfinite(value):
        raise MotionError(f'{where} must be finite, got {value!r}')
    return float(value)


def parse_move(data: object) -> tuple[Velocity, float | None]:
    """A robot.move payload -> (requested velocity, duration_s or None).

    Two forms, not mixed: nested `{linear: {x, y, z}, angular: {x, y, z}}` (geometry_msgs/Twist
    as JSON; missing axes are 0) or flat `{linear_x, linear_y, linear_z, angular_x, angular_y,
    angular_z}` (missing keys are 0). Optional `duration_s` (> 0): how long the command holds
    before the robot stops; without it the watchdog timeout applies. Unknown keys are refused so
    a typo never turns into "stand still" (or worse) silently.
    """
    if not isinstance(data, dict):
        raise MotionError(f'robot.move payload must be a JSON object, got {type(data).__name__}')
    keys = set(data) - {'duration_s'}
    duration = None
    if 'duration_s' in data and data['duration_s'] is not None:
        duration = _number('duration_s', data['duration_s'])
        if duration <= 0:
            raise MotionError(f'duration_s must be > 0, got {duration!r}')
    nested, flat = keys & {'linear', 'angular'}, keys & _FLAT
    unknown = keys - {'linear', 'angular'} - _FLAT
    if unknown:
        raise MotionError(f'robot.move: unknown keys {sorted(unknown)}; expected linear/angular '
                          f'objects or {sorted(_FLAT)}, and duration_s')
    if nested and flat:
        raise MotionError('robot.move: use either linear/angular objects or linear_x-style keys, '
                          'not both')
    if not nested and not flat:
        raise MotionError('robot.move: no velocity given (linear/angular or linear_x-style keys)')
    parts = {}
    for part in ('linear', 'angular'):
        if nested:
            sub = data.get(part, {})
            if not isinstance(sub, dict):
                raise MotionError(f'{part} must be an object {{x, y, z}}, got {sub!r}')
            extra = set(sub) - set(AXES)
            if extra:
                raise MotionError(f'{part}: unknown keys {sorted(extra)}; expected x, y, z')
            parts[part] = tuple(_number(f'{part}.{a}', sub.get(a, 0.0)) for a in AXES)
        else:
            parts[part] = tuple(_number(f'{part}_{a}', data.get(f'{part}_{a}', 0.0)) for a in AXES)
    return Velocity(parts['linear'], parts['angular']), duration


# -- the limiter ------------------------------------------------------------------------------
class Reason(str, Enum):
    """Why a step has the output it has."""

    COMMAND = 'command'     # tracking a live command (ramping toward it or holding it)
    DONE = 'done'           # the command's duration_s ran out: zero
    WATCHDOG = 'watchdog'   # no command for timeout_s: zero
    ESTOP = 'estop'         # e-stop engaged: zero
    IDLE = 'idle'           # nothing live, zero already sent: nothing to publish


@dataclass(frozen=True)
class Step:
    velocity: Velocity
    reason: Reason
    publish: bool          # send it (False while idle: a stopped robot gets one zero, not a stream)


@dataclass(frozen=True)
class Accepted:
    """What command() did with a request: the clamped target, or a refusal with its reason."""

    accepted: bool
    requested: Velocity
    target: Velocity
    clamped: bool
    refusal: str = ''


class MotionLimiter:
    """Turns sporadic move commands into a bounded velocity stream.

    command() sets a target (clamped to the limits) that stays live for `duration_s` or, without
    one, for `timeout_s` (the watchdog). step() is called by the shell at its control rate (and
    right after each command) and returns the next output: the previous output moved toward the
    target by at most accel * dt per axis, dt capped at `max_step_s` so a late tick never becomes
    a jump. When the command expires or the e-stop engages the output is zero at once and
    published once. The e-stop latches: commands are refused until clear_estop(), and clearing it
    never resumes an old command.
    """

    def __init__(self, limits: MotionLimits, timeout_s: float = 0.5, max_step_s: float = 0.1,
                 max_duration_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        for name, v in (('timeout_s', timeout_s), ('max_step_s', max_step_s),
                        ('max_duration_s', max_duration_s)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v <= 0:
                raise ValueError(f'{name} must be a finite number > 0, got {v!r}')
        self.limits = limits
        self.timeout_s = float(timeout_s)
        self.max_step_s = float(max_step_s)
        self.max_duration_s = float(max_duration_s)
        self.clock = clock
        self.output = STOP
        self._target: Velocity | None = None
        self._deadline = 0.0
        self._timed = False              # the live command has its own duration_s
        self._estop = False
        self._zero_pending = False       # a zero must go out at the next step
        self._last_step = clock()

    @property
    def estopped(self) -> bool:
        return self._estop

    @property
    def live(self) -> bool:
        """A command is being followed (the robot is or may be moving)."""
        return self._target is not None

    def command(self, requested: Velocity, duration_s: float | None = None) -> Accepted:
        target = self.limits.clamp(requested)
        clamped = target != requested
        if self._estop:
            self._zero_pending = True
            return Accepted(False, requested, STOP, clamped, 'e-stop engaged')
        now = self.clock()
        hold = self.timeout_s if duration_s is None else min(duration_s, self.max_duration_s)
        self._target, self._deadline, self._timed = target, now + hold, duration_s is not None
        return Accepted(True, requested, target, clamped)

    def set_estop(self) -> bool:
        """Engage and latch; True when this call engaged it (it was clear before)."""
        was = self._estop
        self._estop, self._target, self._zero_pending = True, None, True
        return not was

    def clear_estop(self) -> bool:
        """Release the latch; the robot stays still until a new command. True when it was set."""
        was = self._estop
        self._estop = False
        return was

    def step(self) -> Step:
        now = self.clock()
        dt = min(max(now - self._last_step, 0.0), self.max_step_s)
        self._last_step = now
        if self._estop:
            return self._stop(Reason.ESTOP)
        if self._target is not None and now > self._deadline:
            return self._stop(Reason.DONE if self._timed else Reason.WATCHDOG)
        if self._target is None:
            if self._zero_pending or not self.output.is_zero():
                return self._stop(Reason.IDLE, publish=True)
            return Step(STOP, Reason.IDLE, False)
        lim = self.limits
        out = Velocity(_ramp3(self.output.linear, self._target.linear, lim.max_linear_accel * dt),
                       _ramp3(self.output.angular, self._target.angular,
                              lim.max_angular_accel * dt))
        self.output = out
        self._zero_pending = False
        if out.is_zero() and self._target.is_zero():
            self._target = None  # a stop command has landed; this zero is its last message
        return Step(out, Reason.COMMAND, True)

    def _stop(self, reason: Reason, publish: bool | None = None) -> Step:
        send = publish if publish is not None else (
            self._zero_pending or self._target is not None or not self.output.is_zero())
        self._target, self.output, self._zero_pending = None, STOP, False
        return Step(STOP, reason, send)
