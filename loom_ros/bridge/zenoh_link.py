"""The bridge's Zenoh side: a session (peer or client) opened in the background until it succeeds,
one publisher per key with the QoS level's priority, congestion control and express, and whether
anyone listens to each key (Zenoh matching status), so Batched samples wait instead of vanishing.

A client session needs its router at open, so opening is retried; once open, Zenoh itself
reconnects after the router restarts, and the publishers and subscribers come back with it.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable

from loom_ros.bus.qos import QosLevel, to_zenoh_options
from loom_ros.security import keys
from loom_ros.telemetry.diagnostics import OK, WARN, CheckResult

MODES = ('peer', 'client')
CLOSE_TIMEOUT_S = 5.0  # the most close() waits for Zenoh to close the session
INSECURE_WARNING = ('INSECURE: Zenoh over plain TCP (insecure: true / --insecure): no encryption, '
                    'no authentication, no access control; anyone who reaches the router can read '
                    'and drive this robot')


def transport_identity(insecure: bool, keys_dir: str, name: str):
    """The keys.Identity a session shows (secure by default), or None when `insecure` was
    asked for explicitly. Missing credentials raise keys.CredentialsError naming the fix."""
    if insecure:
        return None
    return keys.load(keys_dir or keys.DEFAULT_KEYS_DIR, name)


def transport_check(identity) -> CheckResult:
    """/diagnostics: WARN while the link is insecure, so a dashboard shows it, not only a log."""
    if identity is None:
        return CheckResult(WARN, INSECURE_WARNING, {'tls': 'false', 'insecure': 'true'})
    return CheckResult(OK, f'mutual TLS as {identity.name} ({identity.role})',
                       {'tls': 'true', 'identity': identity.name, 'role': identity.role})


def secure_endpoint(endpoint: str) -> str:
    """`tcp/host:port` as `tls/host:port` (config files may keep naming tcp); others unchanged."""
    return 'tls/' + endpoint[4:] if endpoint.startswith('tcp/') else endpoint


# The largest Zenoh message a Loom session takes in: twice the largest Loom sends (a 4 MiB event
# payload or cloud request, with its envelope, certificate and signature).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def session_config(mode: str, connect=(), listen=(), multicast_scouting: bool = False, *,
                   identity=None, access_control: dict | None = None,
                   open_timeout_s: float | None = None):
    """A zenoh.Config: `mode`, explicit endpoints, multicast scouting off unless asked for.

    With `identity` (loom_ros.security.keys.Identity) the session speaks only TLS with mutual
    authentication: tcp endpoints become tls, every other protocol is refused, the peer's
    certificate must come from the fleet's authority and name the host connected to, and this
    session shows its own certificate (whose common name the router's access control matches).
    Without it the session is plain TCP: the caller must have been told `insecure` and say so.
    `access_control` (loom_ros.security.acl) is the router's rules. `open_timeout_s` bounds
    each link's opening (TCP, TLS and Zenoh's handshake; Zenoh's default is 10 s): a router that
    accepts the connection and never answers holds zenoh.open that long, per endpoint."""
    import zenoh
    if mode not in MODES + ('router',):
        raise ValueError(f"zenoh mode must be one of peer, client, router; got {mode!r}")
    if mode == 'client' and not connect:
        raise ValueError('zenoh client mode needs at least one connect endpoint')
    connect, listen = list(connect), list(listen)
    config = zenoh.Config()
    config.insert_json5('mode', json.dumps(mode))
    if identity is not None:
        connect = [secure_endpoint(e) for e in connect]
        listen = [secure_endpoint(e) for e in listen]
        for endpoint in connect + listen:
            if not endpoint.startswith('tls/'):
                raise ValueError(f'secure zenoh sessions use tls endpoints, not {endpoint!r}')
        if listen and not keys.can_serve(identity):
            folder = identity.cert.parent.parent
            how = (f'a router needs an identity of the router role (`loom keys issue NAME '
                   f'--role router --host ADDRESS --keys-dir {folder}`)' if mode == 'router' else
                   f'reissue it to serve (`loom keys issue {identity.name} --role {identity.role}'
                   f' --serve --host ADDRESS --force --keys-dir {folder}`: a new key, which '
                   'whoever holds its certificate must get again), or connect to a router '
                   'instead')
            raise ValueError(f'identity {identity.name!r} may not serve TLS, so it cannot listen '
                             f'on {listen}: {how}')
        tls = {'root_ca_certificate': str(identity.ca), 'enable_mtls': True,
               'verify_name_on_connect': True, 'close_link_on_expiration': True,
               'connect_certificate': str(identity.cert),
               'connect_private_key': str(identity.key),
               'listen_certificate': str(identity.cert), 'listen_private_key': str(identity.key)}
        config.insert_json5('transport/link/tls', json.dumps(tls))
        config.insert_json5('transport/link/protocols', json.dumps(['tls']))
    config.insert_json5('connect/endpoints', json.dumps(connect))
    if listen or mode != 'client':
        config.insert_json5('listen/endpoints', json.dumps(listen))
    config.insert_json5('scouting/multicast/enabled', json.dumps(bool(multicast_scouting)))
    # What a peer may make this session reassemble, before any Loom check sees a byte: Zenoh's
    # default is 1 GiB, so a 150 MiB request sat whole in the router's and the cloud's memory
    # before the cloud's 1 MiB check refused it. Measured with eclipse-zenoh 1.10.2: the bound
    # holds for the first oversized message of a link, not after the link carried another
    # fragmented message; so it is defense in depth, and Loom bounds what it takes itself
    # (ZenohLink's max_sample_bytes, the cloud's request limit) before copying or parsing.
    config.insert_json5('transport/link/rx/max_message_size', json.dumps(MAX_MESSAGE_BYTES))
    if open_timeout_s is not None:
        config.insert_json5('transport/unicast/open_timeout',
                            json.dumps(max(1, round(open_timeout_s * 1000))))
    if access_control is not None:
        config.insert_json5('access_control', json.dumps(access_control))
    return config


class ZenohLink:
    """Transport for loom_ros.bridge.core.Bridge over one zenoh.Session."""

    def __init__(self, make_config: Callable[[], object], on_change: Callable[[], None] = lambda: None,
                 retry_s: float = 0.5, logger=None, max_sample_bytes: int = MAX_MESSAGE_BYTES):
        self._make_config = make_config
        # A sample longer than this is dropped and counted on Zenoh's thread, before its bytes
        # are copied out of Zenoh's buffer (what a subscriber's callback is handed otherwise).
        self.max_sample_bytes = int(max_sample_bytes)
        self.oversize_dropped = 0
        self._count_lock = threading.Lock()   # the counter's alone: _lock is held over Zenoh
        self._on_change = on_change
        self._retry_s = retry_s
        self._logger = logger
        self.session = None
        self.connected = False
        self.open_error = ''
        self._publishers: dict[str, object] = {}
        self._listeners: list = []
        self._matched: dict[str, bool] = {}
        self._subscriptions: list[tuple[str, Callable, tuple[str, ...]]] = []
        self._subscribers: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._opener: threading.Thread | None = None
        self._closer: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        # A fresh stop event per start: an opener from before a close() (still inside
        # zenoh.open) keeps its own, set, event, and closes whatever it opens.
        self._stop = stop = threading.Event()
        self._opener = threading.Thread(target=self._open_loop, args=(stop,), daemon=True,
                                        name='zenoh-open')
        self._opener.start()

    def _open_loop(self, stop: threading.Event) -> None:
        import zenoh
        while not stop.is_set():
            try:
                session = zenoh.open(self._make_config())
            except zenoh.ZError as exc:
                if self.open_error != str(exc) and self._logger is not None:
                    self._logger.warning(f'zenoh: cannot open the session yet ({exc}); retrying '
                                         f'every {self._retry_s:g} s')
                self.open_error = str(exc)
                stop.wait(self._retry_s)
                continue
            with self._lock:
                stopped = stop.is_set()
                if not stopped:
                    self.session = session
                    for key_expr, callback, shadowed_by in self._subscriptions:
                        self._declare_subscriber(key_expr, callback, shadowed_by)
            if stopped:  # closed while opening (outside the lock: close may wait on callbacks)
                session.close()
                return
            self.open_error = ''
            self.refresh()
            self._on_change()
            return

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Close the session; never blocks for long. Returns False when Zenoh did not finish
        closing within `timeout_s` (the close goes on in a daemon thread, and is logged).

        Closing matters for exit, not only for tidiness: Zenoh runs each Python callback on a
        Python thread of its own that ends only when its subscriber or listener is undeclared,
        and those threads are not daemons when declared from the main thread, so a process
        that never closes its session hangs in interpreter shutdown."""
        self._stop.set()  # the opener, if still opening, closes what it gets (checked under the lock)
        # Let an opener inside zenoh.open finish (bounded): a daemon thread still in Zenoh's
        # native code when the interpreter exits aborts the process ("exception not rethrown").
        opener = self._opener
        if opener is not None and opener is not threading.current_thread():
            opener.join(timeout_s)
        with self._lock:
            session, self.session = self.session, None
            self._publishers.clear()
            self._listeners.clear()
            self._subscribers.clear()
            self._matched.clear()
            self.connected = False
        if session is None:
            return True
        # No lock is held here: a Zenoh callback still running may take it while close waits.
        self._closer = closer = threading.Thread(target=session.close, daemon=True,
                                                 name='zenoh-close')
        closer.start()
        closer.join(timeout_s)
        if closer.is_alive():
            if self._logger is not None:
                self._logger.error(f'zenoh: the session did not close within {timeout_s:g} s')
            return False
        return True

    def native_threads(self) -> list[str]:
        """This link's threads still inside Zenoh's native code after close(): an opener in
        zenoh.open (a router that accepted and never answered holds it up to the open timeout),
        a session close past its bound. When one comes back into Python while the interpreter
        exits, the process aborts ("FATAL: exception not rethrown"), so a process that sees any
        ends with os._exit instead (bus.executor.end_process asks through exit_hazards())."""
        return [thread.name for thread in (self._opener, self._closer)
                if thread is not None and thread is not threading.current_thread()
                and thread.is_alive()]

    # -- state ----------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Re-read whether the session reaches a router or peer; returns True when it changed."""
        session = self.session
        now = False
        if session is not None:
            try:
                info = session.info
                now = bool(info.routers_zid()) or bool(info.peers_zid())
            except Exception:
                now = False
        changed = now != self.connected
        self.connected = now
        return changed

    def ready(self, key: str, level: QosLevel) -> bool:
        """Someone on the Zenoh side listens to `key` now (which implies a live connection)."""
        if key not in self._publishers and self._publisher(key, level) is None:
            return False
        return self._matched.get(key, False)

    # -- data -----------------------------------------------------------------------------
    def _publisher(self, key: str, level: QosLevel):
        # Zenoh is called without the lock held: a matching callback may fire during the declare
        # (on Zenoh's threads), and anything it calls must be free to take the lock.
        with self._lock:
            session = self.session
            pub = self._publishers.get(key)
        if pub is not None or session is None:
            return pub
        pub = session.declare_publisher(key, **to_zenoh_options(level))

        def on_matching(status, key=key):
            was = self._matched.get(key, False)
            self._matched[key] = bool(status.matching)
            if status.matching and not was:
                self._on_change()
        listener = pub.declare_matching_listener(on_matching)
        matching = bool(pub.matching_status.matching)
        with self._lock:
            if self.session is not session:  # closed meanwhile: what we declared goes with it
                return None
            known = self._publishers.get(key)
            if known is not None:
                return known
            self._publishers[key] = pub
            self._listeners.append(listener)
            self._matched[key] = self._matched.get(key, False) or matching
        return pub

    def put(self, key: str, data: bytes, level: QosLevel) -> None:
        """Put one sample. Batched and Background keys use congestion control BLOCK, which Zenoh
        bounds (transport/link/tx/queue/congestion_control/block/wait_before_close, 5 s)."""
        if self._stop.is_set():
            raise ConnectionError('zenoh session is closing')
        pub = self._publishers.get(key) or self._publisher(key, level)
        if pub is None:
            raise ConnectionError('zenoh session is not open')
        pub.put(data)

    def take_oversize_dropped(self) -> int:
        """Samples dropped for their size since the last call."""
        with self._count_lock:
            dropped, self.oversize_dropped = self.oversize_dropped, 0
        return dropped

    def subscribe(self, key_expr: str, callback: Callable[[str, bytes], None],
                  shadowed_by: tuple[str, ...] = ()) -> None:
        """Call `callback(key, payload)` for samples from other sessions on `key_expr`, except
        those whose key one of `shadowed_by` matches (another subscription takes them)."""
        with self._lock:
            self._subscriptions.append((key_expr, callback, tuple(shadowed_by)))
            if self.session is not None:
                self._declare_subscriber(key_expr, callback, tuple(shadowed_by))

    def subscribe_each_once(self, key_exprs, callback: Callable[[str, bytes], None]) -> None:
        """One subscription per expression, but each sample reaches `callback` once: through
        the first expression that matches its key. Zenoh hands a sample to every matching
        subscriber of a session, and overlapping expressions (`fleet/robot/move` and
        `fleet/**`) would deliver it twice: a command then also counted as its own replay."""
        earlier: list[str] = []
        for key_expr in key_exprs:
            self.subscribe(key_expr, callback, shadowed_by=tuple(earlier))
            earlier.append(key_expr)

    def _declare_subscriber(self, key_expr: str, callback, shadowed_by: tuple[str, ...] = ()) \
            -> None:
        import zenoh
        shadows = [zenoh.KeyExpr(k) for k in shadowed_by]

        def on_sample(sample):
            key = sample.key_expr
            if shadows and any(k.includes(key) for k in shadows):
                return   # an earlier subscription of the same set has it
            payload = sample.payload
            if len(payload) > self.max_sample_bytes:
                with self._count_lock:
                    self.oversize_dropped += 1
                return
            callback(str(key), payload.to_bytes())
        self._subscribers.append(self.session.declare_subscriber(
            key_expr, on_sample, allowed_origin=zenoh.Locality.REMOTE))
