"""Zenoh bridge node: configured Loom topics between this robot's bus and Zenoh keys
`loom/<robot_id>/<topic path>`, with QoS mapped to Zenoh priority, congestion control and express.

Out: events on allowed topics go to Zenoh unless the privacy gate refuses them (Private and
LocalOnly never leave; each refusal is counted and is a `privacy_refused` row of the audit log,
audit_db). Batched and
Background events wait in a bounded outbox while nobody on the Zenoh side can receive them
(router down, no subscriber yet); Realtime events are not queued. Sensitive events that leave are
sealed to the cloud identity's certificate (seal_sensitive), looked at again every
keys.REVOCATION_CHECK_S: once revoked.json names it (or it expires, or the list is unreadable)
Sensitive events stay on the robot (`refused_unsealed`), the change counted
(`cloud_cert_refused`) and audited. In: samples under this robot's own
key reach the bus only as the inbound contract (inbound_file) declares; actuator commands must be
signed by a granted identity and each is audited (audit_db) with its sender. Status (counters,
connection) is published as JSON on `zenoh_bridge/status`. `zenoh_bridge/forget` (loom_msgs/Forget,
called by the storage node's storage/forget) drops a data subject's events still waiting in the
outbox (issue 17).

Composed (`loom bringup --composition`, launch's use_composition): the bridge shares a process with
the nodes that publish, and the bus hands it their events in-process, on the publisher's thread
(no DDS hop, so a burst is not lost before the bridge takes it). The Bridge core is then used
from several threads (publishers', this node's executor for the outbox, inbound and status), so
every use of it holds `_lock`; no other node's code runs while it is held (inbound events are
published after it is released). A Batched or Background put that Zenoh holds back (congestion
control BLOCK, bounded by Zenoh's wait_before_close) then holds back the publishing thread too.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from loom_ros.bridge.core import ROUTE_MEMORY, Bridge, BridgeConfig
from loom_ros.bridge.inbound import ContractError
from loom_ros.bridge.gate import PrivacyGate
from loom_ros.bridge.keys import robot_key_expr
from loom_ros.bridge.zenoh_link import (
    INSECURE_WARNING, MODES, ZenohLink, session_config, transport_check, transport_identity,
)
from loom_ros.bridge.zenoh_router import router_access_control
from loom_ros.bus import topics
from loom_ros.bus.bus import create_bus
from loom_ros.bus.event import EventRejected
from loom_ros.bus.executor import ReleasingLifecycleNode, run_lifecycle_node, timer_callback
from loom_ros.bus.privacy import SubjectError, check_subject
from loom_ros.bus.qos import to_qos_profile
from loom_ros.config.params import (
    ConfigError, ParamSpec, config_dir, declare_parameters, node_defaults, read_yaml,
)
from loom_ros.config.paths import usable_file
from loom_ros.router.policy import PolicyError, load_policy
from loom_ros.security import keys, sealed
from loom_ros.security.audit import AuditError, AuditLog
from loom_ros.storage.consent import ConsentRegistry, consent_path, load_defaults
from loom_ros.storage.layout import derived, node_layout
from loom_ros.telemetry.diagnostics import OK, WARN, CheckResult
from loom_ros.telemetry.logs import mask_node_logger

def sealing_check(mode: str, sealed_to_cloud: bool, refused: str = '') -> CheckResult:
    """/diagnostics: WARN while Sensitive events cannot leave sealed (refused for want of the
    cloud's certificate or because the fleet no longer trusts it, or sent in clear by
    seal_sensitive: off)."""
    if sealed_to_cloud:
        return CheckResult(OK, 'Sensitive payloads are sealed to the cloud', {'sealing': 'on'})
    if mode == 'off':
        return CheckResult(WARN, 'seal_sensitive is off: Sensitive payloads leave in clear',
                           {'sealing': 'off'})
    if refused:
        return CheckResult(WARN, f'cloud certificate refused ({refused[:200]}): Sensitive events '
                           'are refused, not sent (refused_unsealed)', {'sealing': 'refusing'})
    return CheckResult(WARN, 'no cloud certificate: Sensitive events are refused, not sent '
                       '(refused_unsealed)', {'sealing': 'refusing'})


STATUS_TOPIC = 'zenoh_bridge/status'
FORGET_SERVICE = topics.BRIDGE_FORGET
MAX_FORGET_FIELD = 200   # characters of a Forget request's fields looked at (ids are <= 128)
# Zenoh calls back on its own threads and rclpy's EventsExecutor has no guard conditions, so a
# short timer moves inbound samples onto the executor (which owns the bus) and drains the outbox.
SERVICE_PERIOD_S = 0.005
# Bounded work per executor callback, so a SIGINT/SIGTERM is seen within a few ms even after a
# burst: at most this many inbound samples, and this many outbox sends, per service call.
SERVICE_BATCH = 500
# Inbound samples waiting for the executor; past it new samples are dropped and counted.
INBOX_MAX = 10000
INBOX_MAX_BYTES = 64 * 1024 * 1024   # and the bytes they hold: 10,000 samples of 4 MiB are 40 GB
# what one inbound sample may hold beyond its event's payload (a signed envelope: certificate,
# signature, time, nonce; the codec's fields)
SAMPLE_SLACK_BYTES = 64 * 1024
# Batched/Background events per outgoing Zenoh sample (core.Bridge): they leave when a batch is
# full or on the next service call (SERVICE_PERIOD_S), the bus's own batching order of delay.
OUT_BATCH_EVENTS = 100
# DDS history of the bridge's own readers (the level's is 10 for Realtime): a burst published
# faster than the bridge takes it waits in DDS instead of being overwritten. Memory is bounded
# by this times the largest sample on a bridged topic. Past 5,000 it needs config/fastdds.xml's
# reader limit (Fast DDS's default caps every reader at 5,000 samples).
OUT_READER_DEPTH = 10000
SECTION = 'zenoh_bridge'
SEAL_MODES = ('auto', 'on', 'off')

PARAMETERS = [
    ParamSpec('robot_id', "This robot's id: the second segment of every key (loom/<robot_id>/...)",
              read_only=True),
    ParamSpec('mode', 'Zenoh session mode: peer or client', read_only=True),
    ParamSpec('multicast_scouting', 'Find Zenoh peers and routers by multicast (off: only the '
              'connect endpoints)', read_only=True),
    ParamSpec('buffer_max_events', 'Most Batched/Background events kept while they cannot be '
              'delivered; past it the oldest is dropped and counted', read_only=True,
              min_value=1, max_value=10_000_000),
    ParamSpec('buffer_max_bytes', 'Most bytes of those events kept; past it the oldest are '
              'dropped and counted (an event over it alone is not kept)', read_only=True,
              min_value=1, max_value=2**40),
    ParamSpec('policy_file', "Router policy YAML whose sensitive_upload the bridge follows; '' "
              'means the shipped config/policy.yaml', read_only=True),
    ParamSpec('inbound_file', "Inbound contract YAML (rules, grants, actuators); '' means the "
              'shipped config/inbound.yaml', read_only=True),
    ParamSpec('audit_db', 'SQLite audit log of every inbound actuator command and refusal, with '
              "its sender, and of every privacy refusal ('~' expands; '' = <storage.root>/audit.db)",
              read_only=True),
    ParamSpec('keys_dir', 'Fleet credentials (ca.pem, <name>/cert.pem): checks signed commands '
              "and finds the cloud certificate ('' = <storage.root>/keys)", read_only=True),
    ParamSpec('identity', "Identity this bridge shows on Zenoh (mutual TLS; <keys_dir>/<identity>); "
              "'' means robot_id", read_only=True),
    ParamSpec('insecure', 'Plain TCP without TLS, authentication or access control (logged as a '
              'warning and reported on /diagnostics); the only way out of mutual TLS',
              read_only=True),
    ParamSpec('cloud_cert', "Certificate Sensitive payloads are sealed to; '' means "
              '<keys_dir>/cloud/cert.pem', read_only=True),
    ParamSpec('seal_sensitive', 'auto: seal Sensitive payloads to the cloud when its certificate '
              'exists; on: required (configure fails without it); off: never', read_only=True),
    ParamSpec('open_timeout_s', 'Seconds Zenoh gives one link to open (TCP, TLS, handshake) '
              'before the next try; a router that accepts and never answers holds the opening '
              'this long', read_only=True, min_value=0.1, max_value=600.0),
    ParamSpec('status_period_s', 'Seconds between status messages on zenoh_bridge/status',
              read_only=True, min_value=0.01, max_value=3600.0),
    ParamSpec('autostart', 'Configure and activate on start when run standalone', read_only=True),
]
LIST_PARAMETERS = {
    'connect': 'Zenoh endpoints to connect to (a zenohd router in production), e.g. tcp/10.0.0.2:7447',
    'listen': 'Zenoh endpoints to listen on (peer mode)',
    'out_allow': 'Loom topic patterns sent to Zenoh',
    'out_deny': 'Loom topic patterns never sent, even when allowed',
}


class ZenohBridgeNode(ReleasingLifecycleNode, LifecycleNode):

    def __init__(self, **kwargs):
        super().__init__('zenoh_bridge', **kwargs)
        mask_node_logger(self)   # every log line masked from the first (issue 13, fault 10)
        self.params = declare_parameters(self, SECTION, PARAMETERS)
        self.params.update(self._declare_lists())
        layout = self._layout = node_layout(self, SECTION)   # '' paths: under storage.root
        self.params['audit_db'] = derived(self.params['audit_db'], layout.audit)
        self.params['keys_dir'] = derived(self.params['keys_dir'], layout.keys)
        self.bridge: Bridge | None = None
        self.link: ZenohLink | None = None
        self.bus = None
        self._subs = []
        self._first_allow: dict = {}   # topic -> index of its first allow pattern (remembered)
        self._inbox: deque = deque()  # Zenoh's threads append, the executor pops
        self._inbox_dropped = 0
        self._inbox_bytes = 0
        self._inbox_lock = threading.Lock()  # the inbox's counts; never held over Zenoh
        # Every use of self.bridge: composed, bus events arrive on the publishers' threads.
        self._lock = threading.Lock()
        # Bus events are taken only while active (under _lock): composed, a publisher's thread
        # already delivering can call in after the subscriptions closed.
        self._accepting = False
        self._commands: AuditLog | None = None
        self._wake = None
        self._recipient: sealed.Recipient | None = None   # the cloud certificate sealed to
        self._sealing_refused = ''   # why that certificate is refused now ('' while it is not)
        self._configured = False
        self.configure_error = ''   # why the last configure failed (loom bringup prints it)

    def _declare_lists(self) -> dict:
        """String-array parameters; declared with dynamic typing since an empty default list
        would otherwise be typed as a byte array and refuse string overrides."""
        from rcl_interfaces.msg import ParameterDescriptor
        defaults = node_defaults(SECTION)
        values = {}
        for name, description in LIST_PARAMETERS.items():
            if name not in defaults:
                raise ConfigError(f'loom.yaml: no default for parameter {name!r} of {SECTION}')
            value = self.declare_parameter(name, list(defaults[name]), ParameterDescriptor(
                description=description, read_only=True, dynamic_typing=True)).value
            if value is None:   # rcl gives None for an empty list in a params file
                value = []
            elif isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f'{SECTION}.{name}: expected a list of strings, got {value!r}')
            values[name] = list(value)
        return values

    # -- lifecycle ------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        from std_msgs.msg import String
        p = self.params
        try:
            inbound_file = p['inbound_file'] or config_dir() / 'inbound.yaml'
            try:
                config = BridgeConfig.from_params(p, read_yaml(inbound_file, ContractError))
            except ContractError as exc:
                raise ValueError(f'{SECTION}.inbound_file {inbound_file}: {exc}') from None
            ca_pem, recipient = self._credentials(p)
            if p['mode'] not in MODES:
                raise ValueError(f"{SECTION}.mode must be peer or client, got {p['mode']!r}")
            identity = transport_identity(p['insecure'], p['keys_dir'],
                                          p['identity'] or config.robot_id)
            make_config = self._session_config_maker(p, identity)
            make_config()   # a bad endpoint or fleet is refused here, with its reason
            policy = load_policy(p['policy_file'] or config_dir() / 'policy.yaml')
            commands = AuditLog(usable_file(p['audit_db'], f'{SECTION}.audit_db'))
            # Read-only: a subject's events leave only with its fleet consent, as it is now.
            self._consent = ConsentRegistry(consent_path(self._layout.root),
                                            load_defaults(config_dir() / 'consent.yaml'),
                                            read_only=True)
        except (ValueError, PolicyError, AuditError, keys.CredentialsError) as exc:
            # ConfigError is a ValueError
            self.configure_error = str(exc)   # loom bringup prints it
            self.get_logger().error(f'cannot configure: {exc}')
            return TransitionCallbackReturn.FAILURE
        self._commands = commands
        self._recipient = recipient
        seal_to = recipient.public_key if recipient is not None else None
        self.bus = create_bus(self, SECTION)
        self._wake = self.create_timer(SERVICE_PERIOD_S, timer_callback(self._service))
        self.link = ZenohLink(make_config, logger=self.get_logger(),
                              max_sample_bytes=config.max_payload_bytes + SAMPLE_SLACK_BYTES)
        if identity is None:
            self.get_logger().warning(INSECURE_WARNING)
        self.bus.telemetry.add_check('transport security', lambda: transport_check(identity))
        self.bus.telemetry.add_check('sensitive sealing', lambda: sealing_check(
            p['seal_sensitive'], self.bridge is not None and self.bridge.seal_to is not None,
            self._sealing_refused))
        self._first_allow.clear()   # remembered per configuration
        self.bridge = Bridge(config, self.link, self.bus.topic_qos.level_for,
                             PrivacyGate(policy, self._consent.lookup), self._record_refusal,
                             command_audit=self._record_command, ca_pem=ca_pem,
                             keys_dir=str(keys.keys_path(p['keys_dir'])), seal_to=seal_to,
                             seal_required=p['seal_sensitive'] != 'off',
                             batch_max_events=OUT_BATCH_EVENTS)
        self._sealing_refused = ''
        if recipient is not None and recipient.refusal:   # revoked already (auto)
            self._sealing_changed(recipient.refusal)
        self.status_pub = self.create_lifecycle_publisher(String, STATUS_TOPIC,
                                                          to_qos_profile('realtime'))
        self._timer = self.create_timer(p['status_period_s'], self._tick)
        from loom_msgs.srv import Forget
        self._forget_srv = self.create_service(Forget, FORGET_SERVICE, self._on_forget)
        self._configured = True
        self.get_logger().info(
            f"configured: robot {config.robot_id}, {p['mode']} to {p['connect'] or 'scouting'}, "
            f"out {p['out_allow']} minus {p['out_deny']}, in by {len(config.inbound.rules)} rules "
            f"of {inbound_file}, Sensitive payloads "
            f"{'sealed' if seal_to else 'refused' if p['seal_sensitive'] != 'off' else 'NOT sealed'}")
        return TransitionCallbackReturn.SUCCESS

    def _credentials(self, p: dict):
        """(CA PEM or None, the cloud's certificate as a sealed.Recipient or None) as keys_dir,
        cloud_cert and seal_sensitive say; ValueError when `on` cannot be honoured, a cert is not
        the fleet's, or the keys folder's revocation list is unreadable (every certificate check
        would refuse, signed commands' senders included: said here, not found later). With
        `auto` and no cloud certificate, or a revoked one, Sensitive events are refused (fail
        closed): only `off` sends them in clear."""
        if p['seal_sensitive'] not in SEAL_MODES:
            raise ValueError(f"{SECTION}.seal_sensitive must be one of {', '.join(SEAL_MODES)}, "
                             f"got {p['seal_sensitive']!r}")
        root = keys.keys_path(p['keys_dir'])
        ca = root / 'ca.pem'
        ca_pem = ca.read_bytes()[:keys.MAX_CERT_BYTES + 1] if ca.is_file() else None
        if ca_pem is not None:
            try:
                keys.read_revocations(root)
            except keys.CredentialsError as exc:
                raise ValueError(f'{SECTION}.keys_dir {root}: revocation list unreadable, no '
                                 f'certificate would be accepted: {exc}') from None
        cert = Path(os.path.expanduser(p['cloud_cert'])) if p['cloud_cert'] \
            else root / 'cloud' / 'cert.pem'
        if p['seal_sensitive'] == 'off' or (p['seal_sensitive'] == 'auto' and not cert.is_file()):
            if p['seal_sensitive'] == 'auto':
                self.get_logger().warning(
                    f'no cloud certificate at {cert}: Sensitive events stay on the robot '
                    '(refused_unsealed) until it is there; seal_sensitive: off sends them in '
                    'clear')
            else:
                self.get_logger().warning('seal_sensitive is off: Sensitive events that the '
                                          'privacy policy lets out leave in clear')
            return ca_pem, None
        if ca_pem is None:
            raise ValueError(f'{SECTION}.seal_sensitive: no fleet authority at {ca} to check '
                             f'the cloud certificate {cert}')
        recipient = sealed.Recipient(cert, ca_pem, root, role='cloud')
        try:
            recipient.check()
        except sealed.RecipientRevoked as exc:
            if p['seal_sensitive'] == 'on':
                raise ValueError(f'{SECTION}.cloud_cert {cert}: {exc}') from None
            # auto: the bridge runs; Sensitive events wait for a certificate the fleet trusts
        except keys.CredentialsError as exc:
            raise ValueError(f'{SECTION}.cloud_cert {cert}: {exc}') from None
        return ca_pem, recipient

    def _check_sealing(self, force: bool = False) -> None:
        """Seal only to a cloud certificate the fleet trusts now: its file and revoked.json are
        looked at again every keys.REVOCATION_CHECK_S (at once with `force`); a revoked,
        expired or replaced-by-a-stranger's one keeps Sensitive events on the robot
        (refused_unsealed), and a trusted one copied in is sealed to. On the executor."""
        recipient = self._recipient
        if recipient is None:
            return
        try:
            key = recipient.check() if force else recipient.key()
        except keys.CredentialsError:
            key = None
        if key is self.bridge.seal_to:   # unchanged (only this thread changes it)
            return
        with self._lock:
            self.bridge.seal_to = key
        self._sealing_changed(recipient.refusal)

    def _sealing_changed(self, refusal: str) -> None:
        """Count, audit and log a change of the cloud certificate's standing."""
        self._sealing_refused = refusal
        record = {'kind': 'cloud_cert_refused' if refusal else 'cloud_cert_accepted',
                  'ts_ms': time.time_ns() // 1_000_000, 'cert': str(self._recipient.cert_path),
                  'sha256': self._recipient.fingerprint, 'reason': refusal}
        if refusal:
            with self._lock:
                self.bridge.stats['cloud_cert_refused'] += 1
            self.get_logger().error(f'cloud certificate refused: {refusal}: Sensitive events stay '
                                    'on the robot (refused_unsealed) until a certificate the '
                                    f'fleet trusts is at {self._recipient.cert_path}')
        else:
            self.get_logger().info(f'Sensitive payloads sealed to the cloud certificate at '
                                   f'{self._recipient.cert_path} again')
        try:
            self._commands({'plugin': SECTION, 'robot_id': self.bridge.config.robot_id,
                            **record})
        except AuditError as exc:
            with self._lock:
                self.bridge.stats['audit_failed'] += 1
            self.get_logger().error(f'cloud certificate change not audited: {exc}',
                                    throttle_duration_sec=5.0)

    @staticmethod
    def _session_config_maker(p: dict, identity):
        """The session config, re-made on every (re)open. A secure peer enforces the fleet's
        access rules on its own links, as the router does (Zenoh applies access_control on any
        node's unicast links), read from the keys folder each time so new robots count."""
        def make():
            rules = None
            if p['mode'] == 'peer' and identity is not None:
                rules, _ = router_access_control(p['keys_dir'])
            return session_config(p['mode'], p['connect'], p['listen'],
                                  p['multicast_scouting'], identity=identity,
                                  access_control=rules, open_timeout_s=p['open_timeout_s'])
        return make

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        allow = [r.text for r in self.bridge.config.rules.out.allow]
        for index, pattern in enumerate(allow):
            self._subs.append(self.bus.subscribe(
                pattern, lambda event, topic, i=index: self._on_bus_event(event, topic, i),
                depth=OUT_READER_DEPTH))
        # each sample once, through the first rule that matches it (rule_for's choice too)
        self.link.subscribe_each_once(
            [robot_key_expr(self.bridge.config.robot_id, rule.key)
             for rule in self.bridge.config.inbound.rules], self._on_zenoh_sample)
        self.link.start()
        with self._lock:
            self._accepting = True
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        for sub in self._subs:
            sub.close()
        self._subs.clear()
        with self._lock:
            self._accepting = False
            self.bridge.flush_batches()
        self.link.close()
        return super().on_deactivate(state)

    def destroy_node(self) -> None:
        """A last guard for hosts that destroy the node without its shutdown transition
        (run_node now runs it; `loom bringup` hosting nodes in-process may not): close the Zenoh
        session, or Zenoh's callback threads keep the interpreter from exiting. Idempotent."""
        try:
            self._release()
        finally:
            super().destroy_node()

    def exit_hazards(self) -> list[str]:
        """Threads still in Zenoh's native code after the shutdown: the process must end with
        os._exit, since one coming back during the interpreter's exit aborts it (end_process)."""
        return self.link.native_threads() if self.link is not None else []

    def _release(self) -> None:
        if not self._configured:
            return
        self._configured = False
        for sub in self._subs:
            sub.close()
        self._subs.clear()
        with self._lock:
            self._accepting = False
            self.bridge.flush_batches()   # what was taken from the bus leaves (or is counted)
        self.link.close()
        with self._lock:
            self._count_dropped_samples()
            snapshot = self.bridge.snapshot()
        self.get_logger().info(f'stopped: {json.dumps(snapshot)}')
        self.destroy_timer(self._timer)
        self.destroy_timer(self._wake)
        self.destroy_service(self._forget_srv)
        self.destroy_lifecycle_publisher(self.status_pub)
        self.bus.destroy()
        self._commands.close()
        self._consent.close()

    # -- data paths -----------------------------------------------------------------------
    def _on_bus_event(self, event, topic: str, index: int) -> None:
        """The bridge's executor (over DDS) or, composed, any publisher's thread."""
        with self._lock:
            if not self._accepting:   # after deactivate/shutdown: counted, never left behind
                self.bridge.stats['refused_inactive'] += 1
                return
            # Overlapping allow patterns attach a topic more than once: the first match sends.
            first = self._first_allow.get(topic)
            if first is None:
                if len(self._first_allow) >= ROUTE_MEMORY:
                    self._first_allow.clear()
                first = self._first_allow[topic] = self.bridge.config.rules.out.first_allow(topic)
            if first == index:
                self.bridge.send(event, topic)

    def _on_zenoh_sample(self, key: str, data: bytes) -> None:
        """Zenoh's thread: hand over to the executor, which owns the bus (bounded in samples
        and bytes, counted)."""
        with self._inbox_lock:
            if len(self._inbox) >= INBOX_MAX or \
                    self._inbox_bytes + len(data) > INBOX_MAX_BYTES:
                self._inbox_dropped += 1
                return
            self._inbox_bytes += len(data)
            self._inbox.append((key, data))

    def _count_dropped_samples(self) -> None:
        """Samples dropped on Zenoh's threads, before the bridge saw them, into its stats: over
        the inbox's bounds (`dropped_inbox_full`) and over the largest event (the link's
        `dropped_oversize`)."""
        if self._inbox_dropped:
            with self._inbox_lock:
                dropped, self._inbox_dropped = self._inbox_dropped, 0
            self.bridge.stats['dropped_inbox_full'] += dropped
        oversize = self.link.take_oversize_dropped() if self.link is not None else 0
        if oversize:
            self.bridge.stats['dropped_oversize'] += oversize

    def _service(self) -> None:
        """On the executor: publish what came in, then send what waits and can go; at most
        SERVICE_BATCH of each per call (the rest waits for the next call, 5 ms later). Inbound
        events are published without the lock: in-process subscribers (composed) run then, and
        one that publishes an outbound event takes it."""
        # Each lock is taken only when there is work for it: composed, the publishers' threads
        # hold it for every event they send, and a timer that takes it every 5 ms for nothing
        # makes them wait for this thread's turn of the GIL. The looks are unlocked hints (a
        # deque's or dict's length); what one misses is seen at the next call.
        self._check_sealing()   # a clock read unless keys.REVOCATION_CHECK_S passed
        inbound = []
        if self._inbox:
            self._take_inbound(inbound)
        rejected = self._publish_inbound(inbound) if inbound else 0
        bridge = self.bridge
        link = self.link
        if rejected or self._inbox_dropped or (link is not None and link.oversize_dropped) or \
                bridge.outbox.items or bridge.has_batches():
            with self._lock:
                if rejected:
                    bridge.stats['rejected_inbound_bus'] += rejected
                self._count_dropped_samples()
                if bridge.outbox.items:
                    self.link.refresh()
                    bridge.flush(SERVICE_BATCH)
                bridge.flush_batches()

    def _take_inbound(self, inbound: list) -> None:
        with self._lock:
            for _ in range(SERVICE_BATCH):
                with self._inbox_lock:
                    if not self._inbox:
                        break
                    key, data = self._inbox.popleft()
                    self._inbox_bytes -= len(data)
                got = self.bridge.receive(key, data)
                if got is not None:
                    inbound.append((key, got))

    def _publish_inbound(self, inbound: list) -> int:
        """Publish what came in, without the lock; returns how many the bus refused."""
        rejected = 0
        for key, got in inbound:
            try:
                self.bus.publish(*got)
            except EventRejected as exc:
                rejected += 1
                self.get_logger().warning(f'inbound {key}: {exc}', throttle_duration_sec=1.0)
        return rejected

    def _on_forget(self, request, response):
        """Drop the subject's waiting events (on the executor, which owns the bridge); the
        count goes back in `receipt` ({"counts": {"bridge_outbox": n}}). The storage node
        audits the erasure as a whole."""
        response.ok, response.fleet_status = False, 'skipped'
        try:
            if len(request.subject) > MAX_FORGET_FIELD:
                raise SubjectError(f'a data subject has at most {MAX_FORGET_FIELD} characters')
            subject = check_subject(request.subject)
        except SubjectError as exc:
            with self._lock:
                self.bridge.stats['forget_rejected'] += 1
            response.error = str(exc)[:1000]
            return response
        with self._lock:
            gone = self.bridge.forget(subject)
        response.ok = True
        response.receipt = json.dumps({'counts': {'bridge_outbox': gone}})
        return response

    def _record_refusal(self, record: dict) -> None:
        record = {'ts_ms': time.time_ns() // 1_000_000, 'robot_id': self.bridge.config.robot_id,
                  **record}
        try:   # the event stays on the robot whether or not its refusal could be stored
            self._commands({'plugin': SECTION, **record})
        except AuditError as exc:
            self.bridge.stats['audit_failed'] += 1
            self.get_logger().error(f'privacy refusal not audited: {exc}',
                                    throttle_duration_sec=5.0)
        self.get_logger().warning(
            f"privacy: {record['reason']} event {record['event_id']} on {record['topic']} "
            'kept on the robot', throttle_duration_sec=5.0)

    def _record_command(self, record: dict) -> None:
        """An inbound actuator command or refusal into the audit log (raises AuditError: the
        command is then refused)."""
        self._commands({'plugin': SECTION, 'robot_id': self.bridge.config.robot_id, **record})
        if record['kind'] == 'inbound_refused':
            self.get_logger().warning(
                f"inbound {record['reason']} on {record['topic']} from "
                f"{record.get('sender', 'an unauthenticated sender')}", throttle_duration_sec=5.0)

    def _tick(self) -> None:
        from std_msgs.msg import String
        self.link.refresh()
        self._service()
        with self._lock:
            status = self.bridge.snapshot()
        status['open_error'] = self.link.open_error
        self.status_pub.publish(String(data=json.dumps(status)))


def main(args=None) -> int:
    return run_lifecycle_node(ZenohBridgeNode, args)


if __name__ == '__main__':
    sys.exit(main())
