"""The motion rules without ROS: clamps, the acceleration ramp, the watchdog, the e-stop latch,
robot.move parsing, and properties that hold whatever the command sequence."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from loom_ros.bus.event import Event
from loom_ros.plugins.actuators.motion import (
    STOP, MotionError, MotionLimiter, MotionLimits, Reason, Velocity, parse_move,
)
from loom_ros.plugins.actuators.robot_control import RobotControlPlugin
from loom_ros.plugins.contract import CapabilityDenied, HealthState, PluginContext, PluginError

LIMITS = MotionLimits(max_linear=(0.5, 0.2, 0.0), max_angular=(0.0, 0.0, 1.0),
                      max_linear_accel=1.0, max_angular_accel=2.0)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t

    def advance(self, dt):
        self.t += dt


def limiter(timeout_s=0.5, max_step_s=0.05, limits=LIMITS):
    clock = Clock()
    return MotionLimiter(limits, timeout_s=timeout_s, max_step_s=max_step_s, clock=clock), clock


def v(lx=0.0, ly=0.0, lz=0.0, ax=0.0, ay=0.0, az=0.0):
    return Velocity((lx, ly, lz), (ax, ay, az))


# -- clamps --------------------------------------------------------------------------------
def test_commands_are_clamped_per_axis_and_disabled_axes_stay_zero():
    lim, _ = limiter()
    accepted = lim.command(v(lx=3.0, ly=-1.0, lz=7.0, ax=1.0, az=-9.0))
    assert accepted.accepted and accepted.clamped
    assert accepted.target == v(lx=0.5, ly=-0.2, lz=0.0, ax=0.0, az=-1.0)
    within = lim.command(v(lx=0.3, az=0.5))
    assert within.target == v(lx=0.3, az=0.5) and not within.clamped


def test_limits_refuse_negative_or_non_finite_values():
    for bad in (dict(max_linear=(0.5, -1.0, 0.0)), dict(max_angular=(0, 0, math.inf)),
                dict(max_linear_accel=0.0), dict(max_angular_accel=math.nan),
                dict(max_linear=(1.0, 2.0))):
        with pytest.raises(ValueError):
            MotionLimits(**bad)


# -- the ramp ------------------------------------------------------------------------------
def test_acceleration_ramps_up_by_accel_times_dt_and_lands_on_the_target():
    lim, clock = limiter()
    lim.command(v(lx=0.5, az=1.0), duration_s=5.0)
    outputs = []
    for _ in range(12):
        clock.advance(0.05)
        step = lim.step()
        assert step.publish and step.reason is Reason.COMMAND
        outputs.append(step.velocity)
    # 1 m/s^2 and 2 rad/s^2 at 50 ms: +0.05 m/s and +0.1 rad/s per step
    assert outputs[0].linear[0] == pytest.approx(0.05)
    assert outputs[0].angular[2] == pytest.approx(0.1)
    assert outputs[4].linear[0] == pytest.approx(0.25)
    assert outputs[-1] == v(lx=0.5, az=1.0)           # exactly on target, not overshooting
    assert outputs[5].angular[2] == pytest.approx(0.6)    # twice the linear rate


def test_a_late_tick_is_capped_at_max_step_s_so_it_never_becomes_a_jump():
    lim, clock = limiter(max_step_s=0.05)
    lim.command(v(lx=0.5), duration_s=5.0)
    clock.advance(3.0)                                # the control loop stalled for 3 s
    assert lim.step().velocity.linear[0] == pytest.approx(0.05)


def test_slowing_down_ramps_and_a_zero_command_ends_with_one_zero():
    lim, clock = limiter()
    lim.command(v(lx=0.5), duration_s=5.0)
    for _ in range(20):
        clock.advance(0.05)
        lim.step()
    lim.command(v(), duration_s=5.0)
    clock.advance(0.05)
    assert lim.step().velocity.linear[0] == pytest.approx(0.45)
    steps = []
    for _ in range(12):
        clock.advance(0.05)
        steps.append(lim.step())
    published = [s for s in steps if s.publish]
    assert published[-1].velocity == STOP and not lim.live
    assert [s.velocity for s in published].count(STOP) == 1   # one zero, then silence
    assert all(s.reason is Reason.IDLE for s in steps if not s.publish)


# -- the watchdog --------------------------------------------------------------------------
def test_watchdog_zeroes_once_when_commands_stop():
    lim, clock = limiter(timeout_s=0.5)
    lim.command(v(lx=0.5))
    clock.advance(0.05)
    assert lim.step().velocity.linear[0] > 0
    clock.advance(0.5)                                # 0.55 s after the command
    stop = lim.step()
    assert (stop.velocity, stop.reason, stop.publish) == (STOP, Reason.WATCHDOG, True)
    clock.advance(0.05)
    assert (lim.step().reason, lim.step().publish) == (Reason.IDLE, False)


def test_repeated_commands_keep_the_watchdog_fed():
    lim, clock = limiter(timeout_s=0.5)
    for _ in range(40):                               # 2 s of teleop at 20 Hz
        lim.command(v(lx=0.3))
        clock.advance(0.05)
        assert lim.step().reason is Reason.COMMAND
    assert lim.output.linear[0] == pytest.approx(0.3)


def test_duration_holds_a_command_past_the_watchdog_up_to_max_duration():
    clock = Clock()
    lim = MotionLimiter(LIMITS, timeout_s=0.5, max_step_s=0.05, max_duration_s=2.0, clock=clock)
    lim.command(v(lx=0.2), duration_s=1.5)
    clock.advance(1.4)
    assert lim.step().reason is Reason.COMMAND
    clock.advance(0.2)
    assert lim.step().reason is Reason.DONE
    lim.command(v(lx=0.2), duration_s=60.0)           # asks for a minute, gets max_duration_s
    clock.advance(2.01)
    assert lim.step().reason is Reason.DONE


# -- the e-stop latch ----------------------------------------------------------------------
def test_estop_zeroes_at_once_latches_and_refuses_until_cleared():
    lim, clock = limiter()
    lim.command(v(lx=0.5), duration_s=5.0)
    for _ in range(10):
        clock.advance(0.05)
        lim.step()
    assert lim.set_estop() and not lim.set_estop()     # second call: already engaged
    stop = lim.step()
    assert (stop.velocity, stop.reason, stop.publish) == (STOP, Reason.ESTOP, True)
    clock.advance(0.05)
    assert not lim.step().publish                      # one zero, then silence
    refused = lim.command(v(lx=0.5))
    assert not refused.accepted and refused.refusal == 'e-stop engaged'
    assert refused.target == STOP
    again = lim.step()
    assert again.publish and again.velocity == STOP    # a refused command is answered by a zero
    assert lim.clear_estop() and not lim.estopped
    clock.advance(0.05)
    assert not lim.step().publish                      # clearing never resumes the old command
    assert lim.command(v(lx=0.5)).accepted


# -- parsing -------------------------------------------------------------------------------
def test_both_payload_forms_parse():
    assert parse_move({'linear': {'x': 0.2}, 'angular': {'z': -0.5}}) == (v(lx=0.2, az=-0.5), None)
    assert parse_move({'linear_x': 0.2, 'angular_z': 0.5, 'duration_s': 2}) == \
        (v(lx=0.2, az=0.5), 2.0)


@pytest.mark.parametrize('payload, says', [
    ([0.2, 0.5], 'JSON object'),
    ({}, 'no velocity'),
    ({'linar_x': 1.0}, 'unknown keys'),
    ({'linear': {'x': 1}, 'angular_z': 1}, 'not both'),
    ({'linear': [1, 2, 3]}, 'must be an object'),
    ({'linear': {'x': 1, 'w': 2}}, 'unknown keys'),
    ({'linear_x': 'fast'}, 'must be a number'),
    ({'linear_x': True}, 'must be a number'),
    ({'linear_x': math.inf}, 'finite'),
    ({'linear_x': 0.1, 'duration_s': 0}, 'duration_s must be > 0'),
])
def test_bad_payloads_say_why(payload, says):
    with pytest.raises(MotionError, match=says):
        parse_move(payload)


# -- properties ----------------------------------------------------------------------------
speeds = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e9, max_value=1e9)
ops = st.one_of(
    st.tuples(st.just('cmd'), st.tuples(*[speeds] * 6),
              st.one_of(st.none(), st.floats(min_value=0.01, max_value=30.0))),
    st.tuples(st.just('wait'), st.floats(min_value=0.0, max_value=2.0)),
    st.tuples(st.just('estop'), st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=60))
def test_output_never_exceeds_the_limits_nor_the_ramp_whatever_the_sequence(sequence):
    lim, clock = limiter(timeout_s=0.5, max_step_s=0.05)
    previous = STOP
    estopped = False
    for op in sequence:
        if op[0] == 'cmd':
            lim.command(Velocity(op[1][:3], op[1][3:]), op[2])
        elif op[0] == 'wait':
            clock.advance(op[1])
        else:
            estopped = op[1]
            lim.set_estop() if op[1] else lim.clear_estop()
        step = lim.step()
        out = step.velocity
        for value, bound in zip(out.linear + out.angular, LIMITS.max_linear + LIMITS.max_angular):
            assert abs(value) <= bound
        if estopped:
            assert out == STOP
        if step.reason is Reason.COMMAND:   # ramping: bounded change per axis per step
            for now, before, accel in zip(out.linear + out.angular,
                                          previous.linear + previous.angular,
                                          (LIMITS.max_linear_accel,) * 3
                                          + (LIMITS.max_angular_accel,) * 3):
                assert abs(now - before) <= accel * 0.05 + 1e-12
        else:                               # every non-command step is a stop
            assert out == STOP
        previous = out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.tuples(*[speeds] * 6), st.floats(min_value=0.0, max_value=0.49)),
                max_size=20),
       st.floats(min_value=0.51, max_value=100.0))
def test_silence_longer_than_the_timeout_always_ends_in_zero(commands, silence):
    lim, clock = limiter(timeout_s=0.5)
    for values, gap in commands:
        lim.command(Velocity(values[:3], values[3:]))
        clock.advance(gap)
        lim.step()
    clock.advance(silence)
    assert lim.step().velocity == STOP and not lim.live


# -- the plugin without ROS ----------------------------------------------------------------
def plugin(granted=('actuator.motion',), **config):
    audit = []
    p = RobotControlPlugin()
    p.init(PluginContext('robot_control', config=config, granted=frozenset(granted),
                         audit_sink=audit.append))
    return p, audit


def test_plugin_audits_requested_target_and_applied_values():
    p, audit = plugin(max_linear_accel=1000.0)
    response = p.handle_event(Event.with_json('robot.move', {'linear_x': 2.0}, source='agent/x'))
    assert response.ok, response.error
    record = audit[-1]
    assert record['kind'] == 'motion_command' and record['source'] == 'agent/x'
    assert record['requested']['linear']['x'] == 2.0
    assert record['target']['linear']['x'] == 0.5 and record['clamped'] is True
    assert 0.0 < record['applied']['linear']['x'] <= 0.5
    assert response.events[0].json()['target']['linear']['x'] == 0.5
    assert p.health().state is HealthState.DEGRADED   # no ROS node: nothing is published


def test_plugin_without_the_grant_is_refused_and_the_refusal_audited():
    p, audit = plugin(granted=())
    with pytest.raises(CapabilityDenied, match='actuator.motion'):
        p.handle_event(Event.with_json('robot.move', {'linear_x': 0.1}))
    assert audit == [dict(audit[0], kind='capability_denied', capability='actuator.motion')]
    assert p.last_sent is None


def test_plugin_counts_and_audits_bad_input_without_raising():
    p, audit = plugin()
    for event in (Event(type='robot.move', payload=b'{not json'),
                  Event(type='robot.move', payload=b'\xff\xfe'),
                  Event.with_json('robot.move', {'linear_x': 'fast'})):
        response = p.handle_event(event)
        assert not response.ok and response.error
    assert p.stats['bad_input'] == 3
    other = p.handle_event(Event.with_json('ui_update', {'emoji': ':)'}))  # shared action topic
    assert other.ok and not other.events and p.stats['ignored'] == 1
    assert [r['kind'] for r in audit] == ['motion_rejected'] * 3


def test_bad_config_is_a_plugin_error_naming_the_key():
    with pytest.raises(PluginError, match='max_linear_accel'):
        plugin(max_linear_accel=-1)
    with pytest.raises(PluginError, match='cmd_vel_qos'):
        plugin(cmd_vel_qos='fastest')
    with pytest.raises(PluginError, match='max_speed'):
        plugin(max_speed=3)


def test_shutdown_leaves_a_moving_robot_stopped_and_refuses_later_commands():
    p, audit = plugin(max_linear_accel=1000.0)
    assert p.handle_event(Event.with_json('robot.move', {'linear_x': 0.3})).ok
    assert p.last_sent.linear[0] > 0.0
    p.shutdown()
    assert p.last_sent == STOP
    assert audit[-1]['kind'] == 'motion_stop' and audit[-1]['reason'] == 'shutdown'
    late = p.handle_event(Event.with_json('robot.move', {'linear_x': 0.3}))
    assert not late.ok and 'shut down' in late.error
    assert p.health().state is HealthState.FAILED
