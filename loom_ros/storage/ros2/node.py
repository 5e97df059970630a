"""Storage node: runs the data lifecycle of every unit database under `storage.root` on a timer
(in a worker thread, one small move at a time, so the service stays responsive), publishes
StorageStats on storage/stats, budget checks on /diagnostics (WARN 80 %, ERROR 95 %, with the
numbers; ERROR with the numbers when what the budget may not delete alone exceeds the total),
the lifecycle's clock ('storage clock': WARN while a unit's clock is not believable and the
rounds age nothing, once per episode; lifecycle.py), and answers loom_msgs/StorageQuery on
storage/query (episodes by time, memories by meaning). It also serves the consent registry
(loom_msgs/Consent on storage/consent, every change audited) and publishes the audit log's chain
head on audit/head (transient local), so another machine can note it and
`loom audit verify --head` catches a cut or rewritten log. A lifecycle node: configure opens the
databases and the embedder, activate starts the moves, deactivate pauses them, cleanup closes
everything.

storage/forget (loom_msgs/Forget, issue 17) erases a data subject everywhere this robot reaches
(storage/fleet_erasure.py): it pauses the moves and lets go of its own unit databases (the
erasure takes their locks), erases under the root, asks the bridge to drop the subject's waiting
events (zenoh_bridge/forget) and, with a fleet link (storage.forget.*), every cloud server,
bounded by a timeout; then it opens its databases again. Agent hosts writing the root must be
stopped first (the erasure refuses, naming the unit, and changes nothing there). A fleet erasure
without every signed receipt stays pending (storage/pending_erasures.py, under the root, also
filled by `loom forget`); a timer on storage/forget's own executor asks the fleet again for at
most forget.retry_per_period due entries every forget.retry_period_s, with back-off, until a
receipt verifies (then done and audited). /diagnostics ('fleet erasures') WARNs while any is
pending, and storage/stats carries a `fleet_erasures_pending` tier (rows: how many, oldest_ms).

An erasure can take minutes (it rewrites every database), and the lifecycle manager counts a node
dead when get_state goes unanswered for heartbeat_timeout_s. So storage/forget is served by a
node of its own (`storage_forget`) spun by its own executor on its own thread: one erasure at a
time (that executor runs one callback at a time), while this node's executor keeps answering
get_state, queries and stats. How an erasure is kept apart from the rest:
- the moves: the erasure stops the moves' worker and waits for it to end (a move is one
  transaction under `_lock`) before it closes the databases, and starts it again after, only
  if the node is still active; nothing else starts the worker while an erasure runs;
- everything else (queries, consent, stats, the budget check): `_lock` is held only while the
  erasure swaps the databases out and back in, never while it erases; meanwhile `service` and
  `consent` are None and requests are answered "busy: an erasure is running";
- cleanup and shutdown wait for a running erasure to end before they close what it uses."""
from __future__ import annotations

import json
import os
import threading

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from loom_ros.agents.embedding import ModelError
from loom_ros.bridge.zenoh_link import INSECURE_WARNING
from loom_ros.bus import topics
from loom_ros.bus.executor import ReleasingLifecycleNode, run_lifecycle_node
from loom_ros.bus.qos import to_qos_profile
from loom_ros.bus.privacy import MAX_SUBJECT_CHARS, SubjectError, check_subject
from loom_ros.config.params import ConfigError, ParamSpec, config_dir, declare_parameters
from loom_ros.security.audit import AuditError, AuditLog, read_head
from loom_ros.storage.consent import (
    PURPOSES, ConsentError, ConsentRegistry, SubjectRefs, consent_path, load_defaults,
)
from loom_ros.security.keyring import Keyring, KeyringError
from loom_ros.storage.errors import StorageError
from loom_ros.storage.lifecycle import clock_check, floor_check
from loom_ros.telemetry.diagnostics import OK, CheckResult
from loom_ros.storage.fleet_erasure import (
    FleetConfigError, FleetLink, ask_fleet, check_timeout, forget_everywhere, retry_pending,
)
from loom_ros.storage.pending_erasures import Backoff, PendingErasures
from loom_ros.storage.service import (StorageService, default_params, object_backend,
                                      settings_from_params)
from loom_ros.telemetry.node_telemetry import attach_telemetry
from loom_ros.telemetry.logs import mask_node_logger

STATS_TOPIC = topics.STORAGE_STATS
QUERY_SERVICE = topics.STORAGE_QUERY
CONSENT_SERVICE = topics.STORAGE_CONSENT
AUDIT_HEAD_TOPIC = topics.AUDIT_HEAD
FORGET_SERVICE = topics.STORAGE_FORGET
BRIDGE_FORGET_SERVICE = topics.BRIDGE_FORGET
BRIDGE_ATTEMPT_S = 2.0   # one try at the bridge's service (a first reply can be lost to DDS)
FORGET_PARAMETERS = [
    ParamSpec('forget.keys_dir', "Fleet credentials for fleet erasure ('' = <storage.root>/keys)",
              read_only=True),
    ParamSpec('forget.identity', 'Identity that signs fleet erasure requests (and shows on '
              'Zenoh with mutual TLS): this robot', read_only=True),
    ParamSpec('forget.insecure', 'Plain TCP to the fleet router (no TLS); logged', read_only=True),
    ParamSpec('forget.fleet_timeout_s', 'Seconds storage/forget waits for the cloud servers\' '
              'signed receipts', read_only=True, min_value=0.1, max_value=600.0),
    ParamSpec('forget.bridge_timeout_s', 'Seconds storage/forget waits for the bridge to drop '
              'the subject\'s waiting events', read_only=True, min_value=0.1, max_value=600.0),
    ParamSpec('forget.retry_period_s', 'Seconds between looks at the pending fleet erasures',
              read_only=True, min_value=0.05, max_value=86400.0),
    ParamSpec('forget.retry_per_period', 'Pending fleet erasures asked again per look at most',
              read_only=True, min_value=1, max_value=100),
    ParamSpec('forget.retry_backoff_s', 'Seconds before the first retry of a pending fleet '
              'erasure (doubled per failed attempt)', read_only=True, min_value=0.05,
              max_value=86400.0),
    ParamSpec('forget.retry_max_backoff_s', 'Longest wait between two retries of a pending fleet '
              'erasure', read_only=True, min_value=0.05, max_value=604800.0),
]
PENDING_TIER = 'fleet_erasures_pending'   # on storage/stats: rows = pending, oldest_ms
MOVES_STOP_S = 300.0   # longest wait for a move in flight before an erasure (S3 calls are bounded)
BUSY = 'busy: an erasure is running (storage/forget); ask again when it is done'
MAX_RESULTS = 1000
MAX_QUERY_CHARS = 2000
MAX_CONSENT_FIELD = 200   # characters of any Consent request field looked at (ids are <= 128)


class StorageNode(ReleasingLifecycleNode, LifecycleNode):

    def __init__(self, **kwargs):
        super().__init__('storage', **kwargs)
        mask_node_logger(self)
        from rcl_interfaces.msg import ParameterDescriptor
        self.params = {name: self.declare_parameter(
            name, value, ParameterDescriptor(description='see config/loom.yaml /**/storage and docs/storage.md',
                                             read_only=True)).value
            for name, value in default_params().items()}
        self.params.update(declare_parameters(self, 'storage', [ParamSpec(
            'autostart', 'Configure and activate on start when run standalone', read_only=True)]
            + FORGET_PARAMETERS))
        self.params['forget.fleet_connect'] = self._declare_list(
            'forget.fleet_connect', 'Zenoh endpoints of the fleet router the cloud tier answers '
            'on, for fleet erasure ([]: no fleet link)')
        self.params['forget.fleet_servers'] = self._declare_list(
            'forget.fleet_servers', 'Cloud server instances that must each send a signed '
            'receipt before a fleet erasure is done ([]: every server that got the request)')
        self.service: StorageService | None = None
        self.configure_error = ''
        self._lock = threading.Lock()       # service and consent: held per move, query, swap
        self._stop = threading.Event()
        self._worker = None
        self._moves_lock = threading.Lock()  # _active, _erasing and starting/stopping _worker
        self._active = False
        self._erasing = False               # an erasure runs: the moves' worker stays stopped
        self._erasure_lock = threading.Lock()   # held for a whole erasure
        self._rejected_lock = threading.Lock()
        self._srv = None
        self._layout = None
        self.consent: ConsentRegistry | None = None
        self._audit: AuditLog | None = None
        self.rejected = 0
        self._fleet: FleetLink | None = None
        self._helper = self._helper_exec = self._bridge_client = None
        self._forget_node = self._forget_exec = self._forget_thread = None
        self._forget_stop = threading.Event()
        self._pending: PendingErasures | None = None
        self._retry_timer = None
        self.retried = {}   # retries by outcome (done, timeout, ...): on /diagnostics
        self.telemetry = attach_telemetry(self, 'storage')
        self._clock_episodes: dict[str, int] = {}   # unit -> clock episodes already reported
        self.telemetry.add_check('storage budget', self._budget_check)
        self.telemetry.add_check('storage clock', self._clock_check)
        self.telemetry.add_check('fleet erasures', self._pending_check)

    def _declare_list(self, name: str, description: str) -> list:
        """A string array parameter (dynamic typing: an empty default would otherwise be typed
        a byte array and refuse string overrides)."""
        from rcl_interfaces.msg import ParameterDescriptor
        from loom_ros.config.params import node_defaults
        default = node_defaults('storage').get(name)
        if default is None:
            raise ConfigError(f"loom.yaml: no default for parameter '{name}' of storage")
        value = self.declare_parameter(name, list(default), ParameterDescriptor(
            description=description, read_only=True, dynamic_typing=True)).value
        if value is None:
            return []
        return [value] if isinstance(value, str) else list(value)

    # -- lifecycle ------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        from loom_msgs.msg import StorageStats
        from loom_msgs.srv import StorageQuery
        self.configure_error = ''
        from loom_msgs.srv import Consent
        from std_msgs.msg import String
        try:
            settings = settings_from_params(self.params, os.environ)
            self.service = StorageService(settings)
            layout = self._layout = settings.layout
            # One defaults file for every reader (router, bridge, CLI): <config dir>/consent.yaml.
            defaults = load_defaults(config_dir() / 'consent.yaml')
            self._audit = AuditLog(layout.audit)   # consent changes are audited first
            self.consent = ConsentRegistry(consent_path(layout.root), defaults, audit=self._audit,
                                           refs=SubjectRefs.at(layout.keys))
            self._fleet = FleetLink.from_params(self.params, layout.keys, prefix='forget.')
            if self._fleet is not None and self._fleet.insecure:
                self.get_logger().warning(f'fleet erasure link: {INSECURE_WARNING}')
            self._pending = PendingErasures(layout.root, backoff=Backoff(
                float(self.params['forget.retry_backoff_s']),
                max(float(self.params['forget.retry_backoff_s']),
                    float(self.params['forget.retry_max_backoff_s']))))
            self._defaults = defaults
        except (StorageError, ConfigError, ConsentError, AuditError, ModelError, OSError,
                FleetConfigError) as exc:
            self.configure_error = str(exc)
            self.get_logger().error(f'cannot configure: {exc}')
            self._release()
            return TransitionCallbackReturn.FAILURE
        self.stats_pub = self.create_lifecycle_publisher(StorageStats, STATS_TOPIC,
                                                         to_qos_profile('batched'))
        # Latched (transient local, depth 1): a late subscriber gets the newest head at once.
        self.head_pub = self.create_lifecycle_publisher(String, AUDIT_HEAD_TOPIC,
                                                        to_qos_profile('background'))
        self._last_head = None
        self._srv = self.create_service(StorageQuery, QUERY_SERVICE, self._on_query)
        self._consent_srv = self.create_service(Consent, CONSENT_SERVICE, self._on_consent)
        self._make_helper()
        self._stats_timer = self.create_timer(float(self.params['storage.stats_period_s']),
                                              self._publish_stats)
        self.get_logger().info(f'configured: root {settings.layout.root}, '
                               f'{len(self.service.units())} databases')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._moves_lock:
            self._active = True
        self._start_moves()
        self._start_forget()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._halt()
        return super().on_deactivate(state)

    def _halt(self) -> None:
        with self._moves_lock:
            self._active = False
        self._stop_moves()

    def _start_moves(self) -> None:
        """Start the moves' worker: only while active, not during an erasure, and never a second
        one."""
        with self._moves_lock:
            if not self._active or self._erasing or self._worker is not None or \
                    self.service is None:
                return
            self._stop.clear()
            self._worker = threading.Thread(target=self._run_moves, name='storage-moves',
                                            daemon=True)
            self._worker.start()

    def _stop_moves(self, limit_s: float | None = MOVES_STOP_S) -> bool:
        """Stop the moves' worker and wait until it ended (it stops between two moves); False
        when a move in flight outlasted `limit_s` (the worker then ends after that move)."""
        with self._moves_lock:
            self._stop.set()
            worker = self._worker
        if worker is None:
            return True
        worker.join(limit_s)
        with self._moves_lock:
            if worker.is_alive():
                return False
            if self._worker is worker:
                self._worker = None
        return True

    def _count_rejected(self) -> None:
        with self._rejected_lock:
            self.rejected += 1

    def _release(self) -> None:
        with self._moves_lock:
            self._active = False     # a forget that starts from now on is refused
        self._stop_forget()          # waits for an erasure in progress: it uses what goes below
        self._stop_moves(None)
        if self._srv is not None:
            self.destroy_service(self._srv)
            self.destroy_service(self._consent_srv)
            self._destroy_helper()
            self.destroy_timer(self._stats_timer)
            self.destroy_lifecycle_publisher(self.stats_pub)
            self.destroy_lifecycle_publisher(self.head_pub)
            self._srv = None
        with self._lock:
            for name in ('service', 'consent', '_audit', '_pending'):
                held = getattr(self, name)
                if held is not None:
                    held.close()
                    setattr(self, name, None)

    # -- moves ----------------------------------------------------------------------------------
    def _run_moves(self) -> None:
        period = float(self.params['storage.move_period_s'])
        while True:
            service = self.service
            if self._stop.wait(period if service is None or service.rounds else 0.0):
                return
            service = self.service
            if service is None:   # an erasure could not open the databases again
                continue
            try:
                service.run_round(self._lock, self._stop)
            except Exception as exc:   # noqa: BLE001 - one bad round never stops the node
                self.get_logger().error(f'lifecycle round failed: {exc}')

    # -- stats ----------------------------------------------------------------------------------
    def _publish_stats(self) -> None:
        from loom_msgs.msg import StorageStats, StorageTier
        with self._lock:
            if self.service is None:   # not configured, or an erasure holds the databases
                return
            stats = self.service.stats()
        msg = StorageStats()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.root = str(self._layout.root)
        for name, tier in stats['tiers'].items():
            msg.tiers.append(StorageTier(name=name, rows=int(tier['rows']), bytes=int(tier['bytes']),
                                         budget_bytes=int(tier.get('budget_bytes', 0)),
                                         oldest_ms=int(tier['oldest_ms'])))
        msg.total_bytes, msg.total_budget_bytes = int(stats['total_bytes']), int(
            stats['total_budget_bytes'])
        for key in ('condensed', 'memories', 'archived', 'deleted', 'archive_deleted',
                    'budget_deleted', 'clock_untrusted', 'budget_unreachable', 'rounds'):
            setattr(msg, key, int(stats[key]))
        msg.error = stats['error'][:1000]
        summary = self._pending_summary()
        if summary is not None:
            msg.tiers.append(StorageTier(name=PENDING_TIER, rows=int(summary['pending']),
                                         oldest_ms=int(summary['oldest_ms'])))
        self.stats_pub.publish(msg)
        self._publish_head()

    def _publish_head(self) -> None:
        """The audit chain's head as `ID:HASH` (what `loom audit verify --head` takes), when it
        moved; a log that cannot be read says so on the topic rather than going quiet."""
        from std_msgs.msg import String
        try:
            head, _ = read_head(self._layout.audit)
            text = f'{head.id}:{head.hash}' if head is not None else ''
        except AuditError as exc:
            text = f'error: {str(exc)[:500]}'
        if text and text != self._last_head:
            self._last_head = text
            self.head_pub.publish(String(data=text))

    def _pending_summary(self) -> dict | None:
        """The fleet erasure queue's summary; None when there is none or it cannot be read
        (the 'fleet erasures' check says why)."""
        with self._lock:
            if self._pending is None:
                return None
            try:
                return self._pending.summary()
            except StorageError:
                return None

    def _pending_check(self):
        """WARN while fleet erasures are owed a receipt: how many, the oldest's age, the last
        error; ERROR when the queue cannot be read."""
        from loom_ros.telemetry.diagnostics import ERROR, OK, WARN, CheckResult
        with self._lock:
            pending = self._pending
            if pending is None:
                return CheckResult(OK, 'storage not configured')
            try:
                summary, now_ms = pending.summary(), int(pending.clock())
            except StorageError as exc:
                return CheckResult(ERROR, f'fleet erasure queue: {str(exc)[:300]}')
        values = {k: str(v)[:300] for k, v in summary.items()}
        values.update({f'retried_{k}': str(v) for k, v in sorted(self.retried.items())})
        if not summary['pending']:
            return CheckResult(OK, f"no fleet erasure pending ({summary['done']} done after "
                               'a retry or at once)', values)
        age_s = max(0, now_ms - summary['oldest_ms']) / 1000
        text = f"{summary['pending']} fleet erasures pending (oldest {age_s:.0f} s)"
        if self._fleet is None:
            text += '; no fleet link (storage.forget.fleet_connect): nothing retries them'
        elif summary['last_error']:
            text += f": last try: {summary['last_error'][:200]}"
        return CheckResult(WARN, text, values)

    def _budget_check(self):
        from loom_ros.telemetry.diagnostics import WARN, CheckResult
        with self._lock:
            if self.service is None:
                return CheckResult(WARN, 'an erasure is running' if self._erasing
                                   else 'storage not configured')
            # the total out of reach of what the budget may delete: that ERROR, with its numbers
            return floor_check(self.service.lifecycles.values()) or self.service.worst_check()

    def _clock_check(self):
        """lifecycle.clock_check over the units: WARN while a unit's clock is not believable
        and once per episode, each episode logged once."""
        with self._lock:
            service = self.service
            if service is None:
                return CheckResult(OK, 'storage not configured')
            check, lines = clock_check(service.lifecycles, self._clock_episodes,
                                       service.totals.clock_untrusted)
        for line in lines:
            self.get_logger().warning(line)
        return check

    # -- query ----------------------------------------------------------------------------------
    def _unavailable(self) -> str:
        """Why a request cannot be served now ('' when it can); call with _lock held."""
        if not self._active:
            return 'storage node is not active'
        if self.service is None or self.consent is None:
            return BUSY if self._erasing else f'storage node is not usable: {self.configure_error}'
        return ''

    def _on_query(self, request, response):
        if len(request.query) > MAX_QUERY_CHARS:
            self._count_rejected()
            response.ok, response.error = False, f'query longer than {MAX_QUERY_CHARS} characters'
            return response
        try:
            with self._lock:
                why = self._unavailable()
                if why:
                    response.ok, response.error = False, why
                    return response
                found = self.service.query(
                    request.kind, unit=request.unit, agent_id=request.agent_id, type=request.type,
                    source=request.source, text=request.query, start_ms=request.start_ms,
                    end_ms=request.end_ms or 2**63 - 1,
                    limit=min(max(1, request.limit or 100), MAX_RESULTS))
        except (StorageError, ValueError) as exc:
            self._count_rejected()
            response.ok, response.error = False, str(exc)[:1000]
            return response
        response.ok = True
        response.results = [json.dumps(item, separators=(',', ':'))[:65536] for item in found]
        return response


    # -- consent --------------------------------------------------------------------------------
    def _on_consent(self, request, response):
        """grant / withdraw / show, as `loom consent` does; each change audited before it holds."""
        response.ok = False
        fields = (request.action, request.subject, request.purpose, request.source)
        if any(len(f) > MAX_CONSENT_FIELD for f in fields):
            self._count_rejected()
            response.error = f'a field longer than {MAX_CONSENT_FIELD} characters'
            return response
        action = request.action
        if action not in ('grant', 'withdraw', 'show') or (action == 'grant' and
                                                            not request.purpose):
            self._count_rejected()
            response.error = 'action: grant SUBJECT PURPOSE, withdraw SUBJECT [PURPOSE] or show'
            return response
        purposes = [request.purpose] if request.purpose else list(PURPOSES)
        try:
            with self._lock:
                why = self._unavailable()
                if why:
                    response.error = why
                    return response
                if action == 'show':
                    states = [self.consent.lookup(request.subject, p) for p in purposes]
                else:
                    states = [self.consent.set(request.subject, p, action == 'grant',
                                               request.source or 'ros:storage/consent')
                              for p in purposes]
        except (ConsentError, SubjectError, AuditError, StorageError) as exc:
            self._count_rejected()
            response.error = str(exc)[:1000]
            return response
        response.ok = True
        response.states = [json.dumps({'purpose': st.purpose, 'granted': st.granted,
                                       'asked': st.asked, 'source': st.source,
                                       'changed_ms': st.changed_ms}) for st in states]
        if action != 'show':
            self._publish_head()
        return response


    # -- forget -----------------------------------------------------------------------------------
    def _make_helper(self) -> None:
        """storage/forget on a node of its own, spun on its own thread (see the module's
        docstring), and the bridge's forget client on another, spun inside storage/forget's
        callback. Neither takes the process's global arguments: a `-r __node:=storage` remap
        (loom bringup, the lifecycle manager) would give them this node's name."""
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from loom_msgs.srv import Forget
        ns = self.get_namespace()
        self._forget_node = rclpy.create_node(
            'storage_forget', namespace=ns, context=self.context, use_global_arguments=False,
            start_parameter_services=False)
        self._forget_srv = self._forget_node.create_service(Forget, FORGET_SERVICE,
                                                            self._on_forget)
        self._helper = rclpy.create_node(
            'storage_forget_bridge', namespace=ns, context=self.context,
            use_global_arguments=False, start_parameter_services=False)
        self._bridge_client = self._helper.create_client(Forget, BRIDGE_FORGET_SERVICE)
        self._helper_exec = SingleThreadedExecutor(context=self.context)
        self._helper_exec.add_node(self._helper)
        self._forget_exec = SingleThreadedExecutor(context=self.context)
        self._forget_exec.add_node(self._forget_node)
        # Retries run where erasures run: one at a time with them, never on this node's thread.
        self._retry_timer = self._forget_node.create_timer(
            float(self.params['forget.retry_period_s']), self._retry_fleet)

    def _start_forget(self) -> None:
        """Serve storage/forget from the first activation on (a request that came earlier
        waits for it, as one to this node's own services waits for autostart)."""
        if self._forget_thread is None and self._forget_exec is not None:
            self._forget_stop.clear()
            self._forget_thread = threading.Thread(
                target=self._spin_forget, name='storage-forget', args=(self._forget_exec,),
                daemon=True)
            self._forget_thread.start()

    def _spin_forget(self, executor) -> None:
        """storage/forget's thread: one request at a time until _stop_forget."""
        from rclpy.executors import ExternalShutdownException, ShutdownException
        while not self._forget_stop.is_set():
            try:
                executor.spin_once(timeout_sec=0.5)
            except (ShutdownException, ExternalShutdownException):
                return
            except Exception as exc:   # noqa: BLE001 - one bad request never stops the service
                if not self.context.ok():
                    return
                self.get_logger().error(f'storage/forget raised {type(exc).__name__}: '
                                        f'{str(exc)[:300]}')

    def _stop_forget(self) -> None:
        """Wait for an erasure in progress to end, then stop storage/forget's thread."""
        if self._forget_thread is None:
            return
        self._forget_stop.set()    # a retry round stops before its next entry
        with self._erasure_lock:   # an erasure holds it throughout; a later one sees inactive
            pass
        self._forget_exec.shutdown()
        self._forget_thread.join()
        self._forget_thread = None

    def _destroy_helper(self) -> None:
        if self._forget_node is not None:
            self._forget_exec.shutdown()   # again after _stop_forget: harmless
            self._forget_node.destroy_timer(self._retry_timer)
            self._retry_timer = None
            self._forget_node.destroy_service(self._forget_srv)
            self._forget_node.destroy_node()
            self._forget_node = self._forget_exec = None
        if self._helper is not None:
            self._helper_exec.shutdown()
            self._helper.destroy_node()
            self._helper = self._helper_exec = self._bridge_client = None

    def _purge_bridge(self, subject: str) -> int:
        """The bridge drops the subject's waiting events; how many. Raises when no bridge
        answers within forget.bridge_timeout_s (none running: said in the receipt's notes)."""
        import time

        from loom_msgs.srv import Forget
        client = self._bridge_client
        limit = float(self.params['forget.bridge_timeout_s'])
        deadline = time.monotonic() + limit
        # The whole bound for discovery too: a bridge whose service this process had not yet
        # discovered within 1 s (a loaded robot) kept the subject's waiting events.
        if not client.wait_for_service(timeout_sec=limit):
            raise RuntimeError(f'{BRIDGE_FORGET_SERVICE}: no bridge answers within {limit:g} s '
                               '(not running?)')
        while time.monotonic() < deadline:
            future = client.call_async(Forget.Request(subject=subject))
            self._helper_exec.spin_until_future_complete(
                future, timeout_sec=min(BRIDGE_ATTEMPT_S, max(0.01, deadline - time.monotonic())))
            if future.done():
                answer = future.result()
                if not answer.ok:
                    raise RuntimeError(f'{BRIDGE_FORGET_SERVICE}: {answer.error}')
                return int(json.loads(answer.receipt)['counts']['bridge_outbox'])
            client.remove_pending_request(future)   # asked again: a repeat is harmless
        raise RuntimeError(f'{BRIDGE_FORGET_SERVICE}: no answer within {limit:g} s')

    def _retry_fleet(self) -> None:
        """The retry timer (storage/forget's thread): ask the fleet again for the due pending
        erasures (fleet_erasure.retry_pending), while active and with a fleet link."""
        link = self._fleet
        with self._erasure_lock:   # cleanup and shutdown wait for a retry as for an erasure
            with self._moves_lock:
                active = self._active
            if not active or link is None or self._pending is None:
                return
            try:
                results = retry_pending(
                    self._pending, lambda ref, wait: ask_fleet(link, ref, wait),
                    timeout_s=link.timeout_s, limit=int(self.params['forget.retry_per_period']),
                    audit=self._audit, servers=link.servers,
                    stop=lambda: self._forget_stop.is_set() or not self._active)
            except (StorageError, AuditError) as exc:
                self.get_logger().error(f'fleet erasure retry failed: {str(exc)[:500]}')
                return
            for result in results:
                self.retried[result.status] = self.retried.get(result.status, 0) + 1
                if result.status == 'done':
                    self.get_logger().info(f'pending fleet erasure of {result.subject_ref} '
                                           f'done: {len(result.receipts)} signed receipts')
                else:
                    self.get_logger().warning(
                        f'pending fleet erasure of {result.subject_ref}: {result.status} '
                        f'({result.error[:200]}); next try in '
                        f'{max(0, result.next_ms - int(self._pending.clock())) / 1000:.0f} s')
            if any(r.status == 'done' for r in results):
                self._publish_head()

    def _on_forget(self, request, response):
        """Erase one subject everywhere (see the module's docstring), on storage/forget's own
        thread; the moves pause and this node's databases close meanwhile, then open again."""
        response.ok, response.fleet_status = False, 'not_configured'
        try:
            if len(request.subject) > MAX_CONSENT_FIELD:   # bounded before it is looked at
                raise SubjectError(f'a data subject has 1-{MAX_SUBJECT_CHARS} characters, got '
                                   f'{len(request.subject)}')
            if len(request.requested_by) > MAX_CONSENT_FIELD:
                raise SubjectError(f'requested_by longer than {MAX_CONSENT_FIELD} characters')
            subject = check_subject(request.subject)
            who = request.requested_by or 'ros:storage/forget'
            timeout = check_timeout(request.fleet_timeout_s or (
                self._fleet.timeout_s if self._fleet else 10.0), 'fleet_timeout_s')
        except (SubjectError, FleetConfigError) as exc:
            self._count_rejected()
            response.error = str(exc)[:1000]
            return response
        fleet = None
        if not request.fleet:
            response.fleet_status = 'skipped'
        elif self._fleet is not None:
            link = self._fleet
            fleet = lambda ref, wait: ask_fleet(link, ref, wait)   # noqa: E731
        with self._erasure_lock:   # one erasure at a time; cleanup and shutdown wait for it
            with self._lock:
                why = '' if self._active else 'storage node is not active'
                why = why or ('' if self.service is not None else
                              f'storage node is not usable: {self.configure_error}')
            if why:
                response.error = why
                return response
            if not self._pause_moves():
                self._count_rejected()
                response.error = (f'a lifecycle move did not end within {MOVES_STOP_S:g} s; '
                                  'nothing erased, ask again')
                return response
            try:
                outcome, error = self._forget_detached(subject, who, fleet, timeout,
                                                       response.fleet_status)
            finally:
                self._resume_moves()
            self._publish_head()   # before a cleanup waiting on the lock destroys its publisher
        if outcome is None:
            self._count_rejected()
            response.error = error[:1000]
            return response
        response.ok = True
        response.receipt = json.dumps({**outcome.receipt.as_dict(), 'notes': outcome.notes,
                                       'fleet_pending': outcome.fleet_pending})
        response.fleet_status = outcome.fleet_status
        if outcome.fleet is not None:
            response.fleet_error = (f'pending, will retry: {outcome.fleet_error}'
                                    if outcome.fleet_pending else outcome.fleet_error)[:1000]
            response.fleet_receipts = [json.dumps(r) for r in outcome.fleet.receipts]
        return response

    def _pause_moves(self) -> bool:
        """No move runs, and none starts, until _resume_moves: the erasure rewrites the files the
        moves write. False (and the moves go on) when a move in flight did not end in time."""
        with self._moves_lock:
            self._erasing = True
        if self._stop_moves():
            return True
        with self._moves_lock:
            self._erasing = False
            self._stop.clear()   # the worker still running goes on with its rounds
        return False

    def _resume_moves(self) -> None:
        with self._moves_lock:
            self._erasing = False
        self._start_moves()   # only while still active (a deactivate meanwhile keeps them off)

    def _forget_detached(self, subject: str, who: str, fleet, timeout: float, no_fleet: str):
        """(Outcome, '') or (None, why). This node's databases and consent registry are taken out
        under _lock (a query meanwhile is answered BUSY), closed, erased without any lock held,
        then opened again and put back (a failure to reopen is logged and leaves them out)."""
        with self._lock:
            old, consent = self.service, self.consent
            self.service = self.consent = None
        settings = old.settings
        old.close()
        consent.close()
        keyring = None
        outcome, error = None, ''
        service = registry = None
        try:
            if settings.encryption.enabled:
                keyring = Keyring.open(settings.layout.root, settings.encryption, os.environ)
            outcome = forget_everywhere(
                settings.layout, subject, requested_by=who, audit=self._audit,
                refs=SubjectRefs.at(settings.layout.keys), keyring=keyring,
                purge_bridge=self._purge_bridge, fleet=fleet, fleet_timeout_s=timeout,
                no_fleet_status=no_fleet, objects=object_backend(settings),
                pending=self._pending, fleet_servers=self._fleet.servers if self._fleet else ())
        except (StorageError, SubjectError, ConsentError, AuditError, KeyringError,
                OSError) as exc:
            error = str(exc)
        except Exception as exc:   # noqa: BLE001 - the caller still gets an answer saying why
            error = f'the erasure failed: {type(exc).__name__}: {exc}'
            self.get_logger().error(error[:1000])
        finally:
            if keyring is not None:
                keyring.close()
            try:
                service = StorageService(settings, embedder=old.embedder)
                registry = ConsentRegistry(consent_path(settings.layout.root),
                                           self._defaults, audit=self._audit,
                                           refs=SubjectRefs.at(settings.layout.keys))
            except (StorageError, ConsentError, OSError) as exc:
                if service is not None:
                    service.close()
                    service = None
                self.configure_error = f'cannot reopen after an erasure: {exc}'
                self.get_logger().error(self.configure_error)
            with self._lock:
                self.service, self.consent = service, registry
        return outcome, error



def main(args=None) -> int:
    return run_lifecycle_node(StorageNode, args)


if __name__ == '__main__':
    import sys
    sys.exit(main())
