"""Plugin host node `plugin_host`: several plugins in one process and one executor (the Python
equivalent of a component container), or one per process; the same plugin runs either way.

configure   Init of every configured plugin; one failing refuses configure with its reason
            (a missing or corrupt model, a bad config), unless its entry says `required: false`:
            then it is marked failed and the others start;
            the running ones become callable in-process (loom_ros.plugins.registry)
activate    services `~/<plugin>/handle_event` (loom_msgs/HandleEvent) and `~/<plugin>/health`
            (loom_msgs/Health), and each plugin's input Loom topics on the bus: every event in
            goes through HandleEvent, the events out are published on the plugin's output topic
            (or the input event's `reply_to` metadata topic)
deactivate  services and subscriptions go; plugins stay initialised
cleanup / shutdown   Shutdown of every plugin, audit log closed
Refusals and actuator commands go to the audit log (audit_db), see loom_ros/security.
"""
from __future__ import annotations

import sys
from collections import Counter

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from loom_ros.bus.bus import create_bus
from loom_ros.bus.event import Event, EventRejected
from loom_ros.bus.executor import run_lifecycle_node
from loom_ros.bus.names import TopicNameError, validate_topic
from loom_ros.bus.replies import PROBE_ANSWER, is_probe
from loom_ros.config.params import ConfigError, ParamSpec, config_dir, declare_parameters
from loom_ros.storage.layout import derived, node_layout
from loom_ros.config.paths import usable_dir, usable_file
from loom_ros.plugins import registry
from loom_ros.plugins.contract import PluginError, PluginResponse
from loom_ros.plugins.embedded import pick_specs
from loom_ros.plugins.host import PluginHost, PluginSpec, PluginsFileError, load_plugins_file
from loom_ros.security.audit import AuditError, AuditLog
from loom_ros.security.capabilities import CapabilityConfigError
from loom_ros.telemetry.logs import mask_node_logger

PARAMETERS = [
    ParamSpec('plugins_file', "Plugins YAML; '' means the shipped config/plugins.yaml",
              read_only=True),
    ParamSpec('plugins', "Which entries of the plugins file to run, comma-separated; '*' runs "
              'every enabled entry (a named entry runs even if disabled)', read_only=True),
    ParamSpec('audit_db', "SQLite audit log of refusals and actuator commands; '~' expands; "
              "'' = <storage.root>/audit.db",
              read_only=True),
    ParamSpec('data_dir', "Folder where plugins granted storage.write keep files (one subfolder "
              "per plugin); '~' expands; '' = <storage.root>/plugins", read_only=True),
    ParamSpec('allowed_capabilities', 'The most this host grants any plugin; a plugins-file '
              'grant outside it is a config error', read_only=True),
    ParamSpec('guard', 'Check what in-process plugins do at run time (network, file writes, '
              'processes) against their grants', read_only=True),
    ParamSpec('autostart', 'Configure and activate on start when run standalone', read_only=True),
]


def select_specs(specs: list[PluginSpec], selection: str, where: str) -> list[PluginSpec]:
    """The entries named in `selection` ('*': every enabled one); unknown names are an error."""
    selection = selection.strip()
    if selection in ('', '*'):
        return [s for s in specs if s.enabled]
    return pick_specs(specs, [n.strip() for n in selection.split(',') if n.strip()], where)


class PluginHostNode(LifecycleNode):

    def __init__(self, **kwargs):
        super().__init__('plugin_host', **kwargs)
        mask_node_logger(self)   # every log line masked from the first (issue 13, fault 10)
        self.params = declare_parameters(self, 'plugin_host', PARAMETERS)
        layout = node_layout(self, 'plugin_host')   # '' paths: under storage.root
        self.params['audit_db'] = derived(self.params['audit_db'], layout.audit)
        self.params['data_dir'] = derived(self.params['data_dir'], layout.root / 'plugins')
        self.bus = create_bus(self, 'plugin_host')
        self.host: PluginHost | None = None
        self.audit: AuditLog | None = None
        self.stats = Counter()
        self._plugin_services: list = []
        self._plugin_subs: list = []
        self.configure_error = ''   # why the last configure failed (loom bringup prints it)
        if self.bus.telemetry is not None:   # plugin health on /diagnostics
            self.bus.telemetry.add_check('plugins', self._plugins_check)

    def _plugins_check(self):
        """The worst plugin's Health (DEGRADED: WARN, FAILED: ERROR), with every plugin listed."""
        from loom_ros.telemetry.diagnostics import ERROR, OK, WARN, CheckResult
        if self.host is None:
            return CheckResult(OK, 'no plugins configured yet')
        levels = {'ok': OK, 'degraded': WARN, 'failed': ERROR}
        worst, values = CheckResult(OK, f'{len(self.host.slots)} plugins healthy'), {}
        for name in list(self.host.slots):
            status = self.host.health(name)
            values[name] = f'{status.state.value}: {status.message}'.rstrip(': ')
            level = levels.get(status.state.value, ERROR)
            if level > worst.level:
                worst = CheckResult(level, f'plugin {name} {status.state.value}: '
                                    f'{status.message or "see its health service"}')
        return CheckResult(worst.level, worst.message, values)

    # -- lifecycle ------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        path = self.params['plugins_file'] or str(config_dir() / 'plugins.yaml')
        self.configure_error = ''
        try:
            specs = select_specs(load_plugins_file(path), self.params['plugins'], path)
            usable_dir(self.params['data_dir'], 'plugin_host.data_dir')
            self.audit = AuditLog(usable_file(self.params['audit_db'], 'plugin_host.audit_db'))
            self.host = PluginHost(
                specs, audit_sink=self.audit, data_dir=self.params['data_dir'],
                allowed_capabilities=list(self.params['allowed_capabilities']), ros_node=self,
                guard=bool(self.params['guard']), logger=self.get_logger())
        except (PluginsFileError, AuditError, CapabilityConfigError, ConfigError) as exc:
            return self._refuse(str(exc))
        failed = self.host.start()
        required = [n for n in failed if self.host.slots[n].spec.required]
        if required:   # a missing or corrupt model, a bad config: not a silently degraded host
            return self._refuse('; '.join(f'{path}: plugin {n}: {failed[n]}' for n in required))
        try:
            registry.register(self.host)
        except PluginError as exc:
            return self._refuse(str(exc))
        self.get_logger().info(
            f'plugins running: {", ".join(self.host.running()) or "none"}'
            + (f'; failed: {", ".join(failed)}' if failed else ''))
        return TransitionCallbackReturn.SUCCESS

    def _refuse(self, reason: str) -> TransitionCallbackReturn:
        """Fail configure with `reason` (logged, kept for `loom bringup`), releasing what it took."""
        self.configure_error = reason
        self.get_logger().error(f'cannot configure: {reason}')
        self._stop_plugins()
        return TransitionCallbackReturn.FAILURE

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        from loom_msgs.srv import HandleEvent, Health
        for name, slot in self.host.slots.items():
            # Failed plugins get services too: their answers say why they are not running.
            self._plugin_services.append(self.create_service(
                HandleEvent, f'~/{name}/handle_event',
                lambda req, resp, n=name: self._on_handle_event(n, req, resp)))
            self._plugin_services.append(self.create_service(
                Health, f'~/{name}/health', lambda req, resp, n=name: self._on_health(n, resp)))
            if name not in self.host.handles:
                continue
            for pattern in slot.spec.inputs:
                self._plugin_subs.append(self.bus.subscribe(
                    pattern, lambda event, topic, n=name: self._on_bus_event(n, event)))
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_serving()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_serving()
        self._stop_plugins()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self.on_cleanup(state)

    def destroy_node(self) -> None:
        """Ctrl-C / SIGTERM end the process without a lifecycle transition: shut plugins down
        here so they release what they hold."""
        self._stop_serving()
        self._stop_plugins()
        super().destroy_node()

    def _stop_serving(self) -> None:
        for sub in self._plugin_subs:
            sub.close()
        for service in self._plugin_services:
            self.destroy_service(service)
        self._plugin_subs, self._plugin_services = [], []

    def _stop_plugins(self) -> None:
        if self.host is not None:
            registry.unregister(self.host)
            self.host.stop()
            self.host = None
        self._close_audit()

    def _close_audit(self) -> None:
        if self.audit is not None:
            self.audit.close()
            self.audit = None

    # -- services -------------------------------------------------------------------------------
    def _on_handle_event(self, name: str, req, resp):
        if is_probe(req):   # a client's first exchange (bus/replies.py): the plugin never sees it
            resp.response = registry.response_to_msg(PluginResponse.failure(PROBE_ANSWER))
            self.stats['probes'] += 1
            return resp
        event = Event.from_msg(req.event)
        response = self.host.handle(name, event)  # validates the event; failures are answers
        resp.response = registry.response_to_msg(response)
        self.stats['service_calls'] += 1
        return resp

    def _on_health(self, name: str, resp):
        resp.status = registry.health_to_msg(name, self.host.health(name))
        return resp

    # -- bus ------------------------------------------------------------------------------------
    def _on_bus_event(self, name: str, event: Event) -> None:
        if event.source == name:
            return  # the plugin's own output coming back: never feed a plugin to itself
        response = self.host.handle(name, event)
        if not response.ok:
            self.stats['bus_failures'] += 1
            self.get_logger().warning(f'plugin {name} failed on {event.type} {event.id}: '
                                      f'{response.error}', throttle_duration_sec=1.0)
            return
        topic = self.host.slots[name].spec.output
        reply_to = event.metadata.get('reply_to', '')
        if reply_to:
            try:
                topic = validate_topic(reply_to)
            except TopicNameError as exc:
                self.stats['bad_reply_to'] += 1
                self.get_logger().warning(f'event {event.id}: reply_to ignored: {exc}',
                                          throttle_duration_sec=1.0)
        for out in response.events:
            try:
                self.bus.publish(topic, out)
                self.stats['published'] += 1
            except EventRejected as exc:
                self.stats['publish_refused'] += 1
                self.get_logger().warning(f'plugin {name}: output not published on {topic}: '
                                          f'{exc}', throttle_duration_sec=1.0)


def main(args=None) -> int:
    return run_lifecycle_node(PluginHostNode, args)


if __name__ == '__main__':
    sys.exit(main())
