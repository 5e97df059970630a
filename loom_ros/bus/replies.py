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

Lifecycle ChangeState has no such request (a transition no state has makes rcl_lifecycle log a
warning), so the lifecycle manager settles an unanswered transition by get_state instead, which
is safe to repeat (bringup/manager_core.py `answered`, lifecycle_manager_node `_settle`).

Limit: a proof holds while the graph shows the same reply writers. A server SIGKILLed and
restarted before its old writer leaves the graph (the DDS lease) and before the new one is in
it looks unchanged, and where the rmw shows no writers (rmw_zenoh) only a timed-out call drops
a proof.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

PROBE_RESEND_S = 0.25   # a probe unanswered this long is sent again (a lost reply, not a slow one)
PROBE_ANSWER = 'empty request: a reply-path probe, answered with nothing done'
PROVEN = object()   # what `prove` returns for a client proven before (no probe sent)

_EMPTY: dict[type, object] = {}   # one default instance per request type, to compare against


def is_probe(request) -> bool:
    """True for a request whose every field has its default (what `ReplyPaths` sends)."""
    kind = type(request)
    empty = _EMPTY.get(kind)
    if empty is None:
        empty = _EMPTY.setdefault(kind, kind())
    return request == empty


def wait_for(future, wake: threading.Event, until: float,
             go_on: Callable[[], bool] = lambda: True) -> bool:
    """Wait until `future` is done (True), the monotonic time `until`, or `go_on()` turns False.
    The future, not the Event, decides: rclpy runs a future's done callbacks as executor tasks,
    so a callback of an earlier future (a probe answered as its wait ended) can set `wake`
    late, while a later request is being waited for."""
    while not future.done():
        wake.clear()
        if future.done() or not go_on():
            break
        left = until - time.monotonic()
        if left <= 0:
            break
        wake.wait(left)
    return future.done()


def reply_writers(graph, client) -> frozenset:
    """The gids of the servers' reply writers for `client`'s service, from `graph` (the node
    that made the client: its namespace and remappings resolve a relative name): rmw_fastrtps
    and rmw_cyclonedds show them as the topic rr/<service>Reply. Empty where the rmw does not
    (then a proof is kept until a call times out)."""
    if graph is None:
        return frozenset()
    try:
        name = graph.resolve_service_name(client.srv_name)   # srv_name is as it was given
        infos = graph.get_publishers_info_by_topic(f'rr{name}Reply', no_mangle=True)
    except Exception:  # noqa: BLE001 - a graph that cannot say: no change seen
        return frozenset()
    return frozenset(bytes(info.endpoint_gid) for info in infos)


class ReplyPaths:
    """Which service clients have had an answer, from which servers, so a one-shot request can
    go out on them. A proof holds while the same servers' reply writers are in the graph: a
    restarted server (a new process, new writers) is a new match, so its first answer is probed
    again. `graph`: the clients' node, for those writers (None: a proof holds until `forget`).

    `prove` blocks the calling thread (a behavior's worker, a CLI), never an executor callback:
    the answer is taken by the executor that spins the client's node."""

    def __init__(self, graph=None, resend_s: float = PROBE_RESEND_S):
        self.graph = graph
        self.resend_s = resend_s
        self._lock = threading.Lock()
        self._proven: dict = {}    # client -> the reply writers when its probe was answered
        self.probes_sent = 0

    def proven(self, client) -> bool:
        with self._lock:
            known = self._proven.get(client)
        if known is None:
            return False
        now = reply_writers(self.graph, client)
        if now and now != known:   # a server came or went: its reply writer is a new match
            self.forget(client)
            return False
        return True

    def forget(self, client) -> None:
        """A call on the client went unanswered, or the client is being destroyed."""
        with self._lock:
            self._proven.pop(client, None)

    def _answered(self, client) -> None:
        writers = reply_writers(self.graph, client)
        with self._lock:
            self._proven[client] = writers

    def _send(self, client):
        future = client.call_async(client.srv_type.Request())
        with self._lock:
            self.probes_sent += 1
        return future

    def prove(self, client, wake: threading.Event, deadline: float,
              go_on: Callable[[], bool] = lambda: True):
        """Send the probe, again every `resend_s`, until one is answered: returns that answer
        (a response; PROVEN when the client was proven already), or None once the `deadline`
        (monotonic) passes or `go_on()` turns False. Every probe sent stays awaited until then:
        a server that takes its requests one at a time, behind slow ones, answers them late but
        answers. `wake` is set by each answer, and may be set by whoever wants the wait to end
        early (then `go_on` says whether it should)."""
        if self.proven(client):
            return PROVEN
        sent = []

        def answer():
            return next((f for f in sent if f.done() and f.exception() is None), None)
        try:
            while go_on():
                future = self._send(client)
                future.add_done_callback(lambda _f: wake.set())
                sent.append(future)
                until = min(deadline, time.monotonic() + self.resend_s)
                while answer() is None:
                    wake.clear()
                    left = until - time.monotonic()
                    if answer() is not None or not go_on() or left <= 0:
                        break
                    wake.wait(left)
                done = answer()
                if done is not None:
                    self._answered(client)
                    return done.result()
                if time.monotonic() >= deadline:
                    return None
            return None
        finally:
            for future in sent:
                if not future.done():
                    client.remove_pending_request(future)

    def ask(self, client, request, wake: threading.Event, timeout_s: float,
            go_on: Callable[[], bool] = lambda: True) -> tuple:
        """A one-shot request: the path proven first (at most `timeout_s`), then `request`
        sent once and its own answer awaited (at most `timeout_s` again). (response, '') or
        (None, why); why is '' when `go_on()` turned False (the caller says why). A request
        that is itself a probe is not sent twice: the probe's answer is its answer. An answer
        that does not come while `go_on()` holds drops the proof (the next call probes)."""
        answer = self.prove(client, wake, time.monotonic() + timeout_s, go_on)
        if answer is None:
            return None, (f'service {client.srv_name} did not answer a reply-path probe in '
                          f'{timeout_s:g} s' if go_on() else '')
        if answer is not PROVEN and is_probe(request):
            return answer, ''
        if not go_on():
            return None, ''
        future = client.call_async(request)
        future.add_done_callback(lambda _f: wake.set())
        wait_for(future, wake, time.monotonic() + timeout_s, go_on)
        if future.done():
            if future.exception() is None:
                return future.result(), ''
            return None, f'service {client.srv_name} failed: {future.exception()!s:.200}'
        client.remove_pending_request(future)
        if not go_on():
            return None, ''
        self.forget(client)
        return None, f'service {client.srv_name} did not answer in {timeout_s:g} s'
