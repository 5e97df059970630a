"""Plugin `robot_control`: `robot.move` actions -> geometry_msgs/Twist on cmd_vel, inside the
configured velocity and acceleration limits, stopped by a watchdog when commands stop and by a
latching e-stop topic (std_msgs/Bool).

The rules live in motion.py (plain Python); this class only checks the capability, audits, and
publishes on the host's node (PluginContext.ros_node). Without a node (unit tests, sandboxes) it
decides and audits the same way and publishes nothing.

robot.move payloads (JSON): `{"linear": {"x": 0.2}, "angular": {"z": 0.5}}` (Twist as JSON,
missing axes 0) or `{"linear_x": 0.2, "angular_z": 0.5}`; optional `"duration_s": 2.0` holds the
command that long, else it holds `watchdog_timeout_s` and the sender repeats it (teleop style).
"""
from __future__ import annotations

import threading

from loom_ros.bus.event import Event
from loom_ros.bus.qos import to_qos_profile
from loom_ros.plugins.actuators.config import RobotControlConfig, load_section
from loom_ros.plugins.actuators.motion import (
    STOP, MotionError, MotionLimiter, MotionLimits, Reason, Step, Velocity, parse_move,
)
from loom_ros.plugins.contract import (
    Capability, HealthState, HealthStatus, Plugin, PluginContext, PluginError, PluginMetadata,
    PluginResponse, PluginType,
)

MOVE = 'robot.move'
RESULT = 'robot.move.result'


class RobotControlPlugin(Plugin):
    metadata = PluginMetadata(
        name='robot_control', type=PluginType.ACTUATOR,
        capabilities=(Capability.ACTUATOR_MOTION,),
        reads=(MOVE,), writes=(RESULT, 'ros:cmd_vel'),
        description='robot.move -> geometry_msgs/Twist on cmd_vel with speed and acceleration '
                    'limits, a watchdog and a latching e-stop')

    def __init__(self) -> None:
        super().__init__()
        self.config: RobotControlConfig | None = None
        self.limiter: MotionLimiter | None = None
        self.stats = {'commands': 0, 'clamped': 0, 'refused_estop': 0, 'bad_input': 0,
                      'ignored': 0, 'published': 0, 'stops': 0, 'ticks': 0}
        self.last_sent: Velocity | None = None
        self._lock = threading.Lock()
        self._pub = self._estop_sub = self._timer = None

    # -- Init / Shutdown ------------------------------------------------------------------
    def init(self, ctx: PluginContext) -> None:
        super().init(ctx)
        cfg = self.config = load_section('robot_control', RobotControlConfig, ctx.config)
        try:
            limits = MotionLimits(cfg.max_linear, cfg.max_angular, cfg.max_linear_accel,
                                  cfg.max_angular_accel)
        except ValueError as exc:
            raise PluginError(f'robot_control config: {exc}') from None
        self.limiter = MotionLimiter(limits, timeout_s=cfg.watchdog_timeout_s,
                                     max_step_s=1.0 / cfg.control_rate_hz,
                                     max_duration_s=cfg.max_duration_s)
        node = ctx.ros_node
        if node is None:
            return
        from geometry_msgs.msg import Twist, TwistStamped
        from std_msgs.msg import Bool
        self._msg_type = TwistStamped if cfg.stamped else Twist
        self._pub = node.create_publisher(self._msg_type, cfg.cmd_vel_topic,
                                          to_qos_profile(cfg.cmd_vel_qos))
        self._estop_sub = node.create_subscription(Bool, cfg.estop_topic, self._on_estop,
                                                   to_qos_profile(cfg.estop_qos))
        self._timer = node.create_timer(1.0 / cfg.control_rate_hz, self._on_tick)

    def shutdown(self) -> None:
        """Leave the robot still: a moving robot gets a last zero before the publisher goes."""
        with self._lock:
            lim, self.limiter = self.limiter, None   # refuse anything that still arrives
            if lim is not None and (lim.live or not lim.output.is_zero()):
                lim.set_estop()
                step = lim.step()
                self._send(step, audit=False)
                self.ctx.audit('motion_stop', reason='shutdown', applied=step.velocity.as_dict())
        node = self.ctx.ros_node if self.ctx is not None else None
        if node is not None:
            for entity, destroy in ((self._timer, node.destroy_timer),
                                    (self._estop_sub, node.destroy_subscription),
                                    (self._pub, node.destroy_publisher)):
                if entity is not None:
                    destroy(entity)
        self._pub = self._estop_sub = self._timer = None

    # -- HandleEvent / Health -------------------------------------------------------------
    def handle_event(self, event: Event) -> PluginResponse:
        """One robot.move. CapabilityDenied propagates (the host counts it as a refusal); bad
        payloads and e-stop refusals come back as failures, audited and counted. Other event
        types (actions for other actuators on a shared topic) are ignored and counted."""
        if self.limiter is None:
            return PluginResponse.failure('robot_control is not running (not initialised or '
                                          'shut down)')
        if event.type != MOVE:  # e.g. a ui_update on the same agent.*.action topic
            self.stats['ignored'] += 1
            return PluginResponse()
        self.ctx.require(Capability.ACTUATOR_MOTION, detail=f'{MOVE} {event.id} from '
                         f'{event.source or "?"}')
        try:
            requested, duration = parse_move(event.json())
        except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
            self.stats['bad_input'] += 1
            reason = str(exc) if isinstance(exc, MotionError) else f'payload is not JSON: {exc}'
            self.ctx.audit('motion_rejected', event_id=event.id, source=event.source,
                           error=reason)
            return PluginResponse.failure(reason)
        with self._lock:
            self.stats['commands'] += 1
            accepted = self.limiter.command(requested, duration)
            step = self.limiter.step()
            self._send(step, audit=False)
        common = dict(event_id=event.id, source=event.source, requested=requested.as_dict(),
                      duration_s=duration)
        if not accepted.accepted:
            self.stats['refused_estop'] += 1
            self.ctx.audit('motion_refused', **common, reason=accepted.refusal,
                           applied=STOP.as_dict())
            return PluginResponse.failure(f'robot.move refused: {accepted.refusal}')
        self.stats['clamped'] += accepted.clamped
        applied = step.velocity.as_dict()
        self.ctx.audit('motion_command', **common, target=accepted.target.as_dict(),
                       applied=applied, clamped=accepted.clamped)
        result = Event.with_json(RESULT, {'event_id': event.id, 'target': accepted.target.as_dict(),
                                          'applied': applied, 'clamped': accepted.clamped},
                                 source='plugin/robot_control')
        return PluginResponse(events=[result])

    def health(self) -> HealthStatus:
        details = {k: str(v) for k, v in self.stats.items()}
        if self.limiter is None:
            return HealthStatus(HealthState.FAILED, 'not running (not initialised or shut down)',
                                details)
        details['estop'] = str(self.limiter.estopped).lower()
        if self.limiter.estopped:
            return HealthStatus(HealthState.DEGRADED, 'e-stop engaged: commands are refused '
                                f'until {self.config.estop_topic} gets false', details)
        if self.ctx.ros_node is None:
            return HealthStatus(HealthState.DEGRADED, 'no ROS node: commands are checked and '
                                'audited but not published', details)
        return HealthStatus(HealthState.OK, '', details)

    # -- ROS callbacks --------------------------------------------------------------------
    def _on_tick(self) -> None:
        with self._lock:
            if self.limiter is None:
                return
            self.stats['ticks'] += 1
            self._send(self.limiter.step(), audit=True)

    def _on_estop(self, msg) -> None:
        with self._lock:
            if self.limiter is None:
                return
            changed = self.limiter.set_estop() if msg.data else self.limiter.clear_estop()
            if msg.data:
                self._send(self.limiter.step(), audit=False)
        if changed:
            self.ctx.audit('estop', engaged=bool(msg.data), topic=self.config.estop_topic)

    # -- output ---------------------------------------------------------------------------
    def _send(self, step: Step, audit: bool) -> None:
        """Publish a step the limiter wants sent; stops from the timer are audited as such."""
        if not step.publish:
            return
        if step.reason is not Reason.COMMAND:
            self.stats['stops'] += 1
            if audit:
                self.ctx.audit('motion_stop', reason=step.reason.value,
                               applied=step.velocity.as_dict())
        self.last_sent = step.velocity
        self.stats['published'] += 1
        if self._pub is None:
            return
        msg = self._msg_type()
        twist = msg.twist if self.config.stamped else msg
        if self.config.stamped:
            msg.header.frame_id = self.config.frame_id
            msg.header.stamp = self.ctx.ros_node.get_clock().now().to_msg()
        v = step.velocity
        twist.linear.x, twist.linear.y, twist.linear.z = v.linear
        twist.angular.x, twist.angular.y, twist.angular.z = v.angular
        self._pub.publish(msg)
