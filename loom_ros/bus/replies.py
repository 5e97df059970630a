"""A service client's first exchange: a probe that proves the reply path before a request that
must not be sent twice.

Why: `service_is_ready()` says only that the client's request writer matched the server. With
rmw_fastrtps a server that takes a request from a client whose reply reader it has not matched
yet waits up to 100 ms, then sends the reply into nothing (ros2/rmw_fastrtps#390, #467). So on a
loaded robot, right after discovery, a client's first answer can be lost and the caller waits
out its whole timeout. Sending again is safe for a query, not for a Route (a second decision)
or a tts call (spoken twice).

The contract: a service's empty request (every field its default) is a probe. Loom's servers
answer it at once with a refusal (`PROBE_ANSWER`) and do nothing else (`is_probe`). A probe is
safe to send again until one answer comes, and that answer proves the reply path for every
request after it (a matched reader stays matched). `ReplyPaths` keeps which clients are proven.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

PROBE_RESEND_S = 0.25   # a probe unanswered this long is sent again (a lost reply, not a slow one)
PROBE_ANSWER = 'empty request: a reply-path probe, answered with nothing done'

_EMPTY: dict[type, object] = {}   # one default instance per request type, to compare against


def is_probe(request) -> bool:
    """True for a request whose every field has its default (what `ReplyPaths` sends)."""
    kind = type(request)
    empty = _EMPTY.get(kind)
    if empty is None:
        empty = _EMPTY.setdefault(kind, kind())
    return request == empty


class ReplyPaths:
    """Which service clients have had an answer, so a one-shot request can go out on them.

    `prove` blocks the calling thread (a behavior's worker, a CLI), never an executor callback:
    the answer is taken by the executor that spins the client's node."""

    def __init__(self, resend_s: float = PROBE_RESEND_S):
        self.resend_s = resend_s
        self._lock = threading.Lock()
        self._proven: set = set()
        self.probes_sent = 0

    def proven(self, client) -> bool:
        with self._lock:
            return client in self._proven

    def forget(self, client) -> None:
        """The client is being destroyed."""
        with self._lock:
            self._proven.discard(client)

    def prove(self, client, wake: threading.Event, deadline: float,
              go_on: Callable[[], bool] = lambda: True) -> bool:
        """Send the empty request until one is answered (True), the `deadline` (monotonic)
        passes or `go_on()` turns False (False). `wake` is set by each answer, and may be set
        by whoever wants the wait to end early (then `go_on` says whether it should)."""
        if self.proven(client):
            return True
        while go_on():
            wake.clear()
            future = client.call_async(client.srv_type.Request())
            with self._lock:
                self.probes_sent += 1
            future.add_done_callback(lambda _f: wake.set())
            wake.wait(max(0.0, min(self.resend_s, deadline - time.monotonic())))
            if future.done() and future.exception() is None:
                with self._lock:
                    self._proven.add(client)
                return True
            client.remove_pending_request(future)
            if time.monotonic() >= deadline:
                return False
        return False
