"""The agent host's one link to the cloud tier: a Zenoh session and a CloudClient on it, shared
by the agents whose settings name the same cloud (a CloudPort for each of them).

An agent's settings say which cloud: `zenoh_connect` (endpoints of the Zenoh router the cloud
tier answers on; empty or absent: no cloud), `keys_dir` and `identity` (who the robot is on
Zenoh, mutual TLS, and to the cloud, signed requests), `zenoh_insecure` (plain TCP; logged as a
warning), `zenoh_open_timeout_s` (how long one link may take to open; Zenoh's 10 s). The host
opens the session when it configures, in the background so an unreachable network never holds
configure; a failed open is retried when asked for, at most every `retry_s`; cleanup closes it.
No rclpy.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from loom_ros.agents.config import AgentConfigError

MAX_ENDPOINTS = 16
MAX_SETTING_CHARS = 1024
WARN_EVERY_S = 60.0   # the same failure to open is warned about at most this often
RETRY_S = 5.0
MIN_OPEN_TIMEOUT_S, MAX_OPEN_TIMEOUT_S = 0.1, 600.0
CLOSE_WAIT_S = 5.0   # close() waits this long for an open in progress


@dataclass(frozen=True)
class CloudSettings:
    """Which cloud an agent uses; agents with equal settings share one link."""

    connect: tuple[str, ...]
    keys_dir: str = '~/.loom/keys'
    identity: str = 'robot1'
    insecure: bool = False
    open_timeout_s: float = 10.0

    @classmethod
    def of(cls, agent_id: str, settings: dict) -> 'CloudSettings | None':
        """None when the agent names no cloud; AgentConfigError naming the bad setting."""
        connect = settings.get('zenoh_connect', [])
        if isinstance(connect, str):
            connect = [connect]
        if not isinstance(connect, (list, tuple)) or len(connect) > MAX_ENDPOINTS or any(
                not isinstance(e, str) or not 0 < len(e) <= MAX_SETTING_CHARS for e in connect):
            raise AgentConfigError(f'agent {agent_id}: settings.zenoh_connect must be a list of '
                                   f'at most {MAX_ENDPOINTS} endpoint strings')
        if not connect:
            return None
        texts = {}
        for key, default in (('keys_dir', cls.keys_dir), ('identity', cls.identity)):
            value = settings.get(key, default)
            if not isinstance(value, str) or not 0 < len(value) <= MAX_SETTING_CHARS:
                raise AgentConfigError(f'agent {agent_id}: settings.{key} must be a non-empty '
                                       'string')
            texts[key] = value
        timeout = settings.get('zenoh_open_timeout_s', cls.open_timeout_s)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
                not MIN_OPEN_TIMEOUT_S <= timeout <= MAX_OPEN_TIMEOUT_S:
            raise AgentConfigError(f'agent {agent_id}: settings.zenoh_open_timeout_s must be a '
                                   f'number of seconds from {MIN_OPEN_TIMEOUT_S:g} to '
                                   f'{MAX_OPEN_TIMEOUT_S:g}')
        return cls(tuple(connect), texts['keys_dir'], texts['identity'],
                   settings.get('zenoh_insecure', False) is True, float(timeout))


def open_cloud_client(settings: CloudSettings):
    """(session, CloudClient) signing as `identity`, with the local embedder so Sensitive text
    goes up only as a vector; raises with the reason when either cannot be made."""
    import zenoh

    from loom_ros.agents.embedding import MiniLMEmbedder
    from loom_ros.bridge.zenoh_link import secure_endpoint, session_config, transport_identity
    from loom_ros.cloud.client import CloudClient
    from loom_ros.security.keys import CredentialsError
    try:
        identity = transport_identity(settings.insecure, settings.keys_dir, settings.identity)
        session = zenoh.open(session_config('client', list(settings.connect), identity=identity,
                                            open_timeout_s=settings.open_timeout_s))
    except (zenoh.ZError, CredentialsError, ValueError) as exc:
        used = list(settings.connect) if settings.insecure else \
            [secure_endpoint(e) for e in settings.connect]   # what the session dialled
        raise CloudUnavailable(f'cannot open a Zenoh session to {used}: {exc}') from None
    try:
        client = CloudClient.from_keys(session, settings.keys_dir, settings.identity,
                                       embedder=MiniLMEmbedder())
    except Exception as exc:   # credentials, the embedding model: the session must not leak
        session.close()
        raise CloudUnavailable(f'cannot make the cloud client: {exc}') from None
    return session, client


class CloudUnavailable(RuntimeError):
    """The cloud link cannot be opened; says why."""


class CloudLink:
    """One session and client for one CloudSettings; the CloudPort of every agent using it."""

    def __init__(self, settings: CloudSettings,
                 opener: Callable[[CloudSettings], tuple] = open_cloud_client, *,
                 retry_s: float = RETRY_S, clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str, str], None] | None = None):
        self.settings = settings
        self._opener = opener
        self.retry_s = retry_s
        self._clock = clock
        self._log = log or (lambda level, msg: None)
        self._lock = threading.Lock()
        self._session = self._client = None
        self._error = 'the cloud link is opening'
        self._tried_at = -float('inf')
        self._thread: threading.Thread | None = None
        self._closed = False
        self.opens = 0     # sessions opened (a retry after a failure counts again)
        self.failures = 0
        self._warned_at, self._warned_error, self._unsaid = -float('inf'), '', 0

    def start(self) -> None:
        """Open in the background (a slow connect does not hold the caller)."""
        with self._lock:
            if self._closed or self._client is not None or (
                    self._thread is not None and self._thread.is_alive()):
                return
            self._tried_at = self._clock()
            self._thread = threading.Thread(target=self._open, daemon=True, name='cloud-link')
            self._thread.start()

    def _open(self) -> None:
        try:
            session, client = self._opener(self.settings)
        except Exception as exc:   # any reason the link cannot be made: kept, said, retried
            with self._lock:
                self.failures += 1
                self._error = error = (str(exc) or type(exc).__name__)[:1000]
                now = self._clock()
                # Said the first time, when the reason changes, and then at most every
                # WARN_EVERY_S with how many failed since: a robot without its fleet router
                # would otherwise log the same line every retry.
                say = error != self._warned_error or now - self._warned_at >= WARN_EVERY_S
                unsaid, self._unsaid = self._unsaid, 0 if say else self._unsaid + 1
                if say:
                    self._warned_at, self._warned_error = now, error
            if say:
                self._log('warn', f'cloud link: {error} (retried when asked, at most every '
                          f'{self.retry_s:g} s' + (f'; {unsaid} more failures since the last '
                                                   'warning)' if unsaid else ')'))
            return
        with self._lock:
            if self._closed:   # closed while opening: nobody will close it later
                session.close()
                return
            self._session, self._client, self._error = session, client, ''
            self.opens += 1
        self._log('info', f'cloud link open to {list(self.settings.connect)} as '
                  f'{self.settings.identity}')

    def client(self, wait_s: float = 0.0):
        """(CloudClient, '') when open, else (None, why). A failed open is retried when due; an
        open in progress is waited for up to `wait_s` (a caller's latency budget)."""
        with self._lock:
            client, closed = self._client, self._closed
            due = self._clock() - self._tried_at >= self.retry_s
        if client is None and not closed:
            if due:
                self.start()
            if wait_s > 0:
                self.wait_open(wait_s)
        with self._lock:
            return self._client, self._error if self._client is None else ''

    def wait_open(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for an open in progress; whether the link is open."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        return self._client is not None

    def native_threads(self) -> list[str]:
        """Its opener thread, when still alive (inside zenoh.open: a router that accepted and
        never answered holds it up to Zenoh's open timeout, past close()'s 5 s). One that comes
        back into Python while the interpreter exits aborts the process, so the host's process
        then ends with os._exit (AgentNode.exit_hazards, bus.executor.end_process)."""
        thread = self._thread
        return [thread.name] if thread is not None and thread.is_alive() and \
            thread is not threading.current_thread() else []

    def close(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        with self._lock:
            self._closed = True
            session, self._session, self._client = self._session, None, None
            self._error = 'the cloud link is closed'
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)   # an open in progress ends (and closes what it made) first
        if session is not None:
            session.close()
