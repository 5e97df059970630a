"""The cloud tier's admission core without Zenoh: token buckets on an injected clock, the fair
queue's round-robin and bounds, and the gate's order of checks (issue 14)."""
import time

import pytest

from cloud_fixtures import fleet, stranger  # noqa: F401  (fixtures)
from loom_ros.cloud.protocol import Signer, Verifier, encode
from loom_ros.cloud.server import FairQueue, Gate, Limits, Rejected, TokenBucket
from loom_ros.security import keys


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_with_the_injected_clock():
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=3.0, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5   # one token back
    assert [bucket.take(), bucket.take()] == [True, False]
    clock.now += 100.0  # never more than the burst
    assert sum(bucket.take() for _ in range(10)) == 3


def test_fair_queue_serves_clients_in_turn_within_its_bounds():
    queue = FairQueue(per_client=3, total=5, total_bytes=1000)
    assert [queue.put('flood', f'f{i}', 10) for i in range(4)] == ['', '', '', 'client_queue_full']
    assert queue.put('robot1', 'r0', 10) == '' and queue.put('robot2', 'x', 10) == ''
    assert queue.put('robot3', 'y', 10) == 'queue_full'          # 5 entries in all
    assert queue.get(0) == 'f0' and queue.get(0) == 'r0' and queue.get(0) == 'x'
    assert queue.get(0) == 'f1'
    assert queue.put('big', 'b', 2000) == 'queue_full'           # over the bytes bound
    assert sorted(queue.close()) == ['f2'] and queue.get(0) is None


def test_fair_queue_shares_by_bytes_so_batches_cannot_starve_one_line_requests():
    """Turns counted in requests let one robot's three batches of 256 texts (about 11 s of
    model time each) go before another robot's intent: 12 s late. Shares are in bytes now."""
    queue = FairQueue(per_client=8, total=64, total_bytes=32 << 20, quantum=64 * 1024)
    for i in range(3):
        assert queue.put('robot2', f'batch{i}', 1 << 20) == ''
    assert queue.put('robot1', 'intent', 600) == ''
    assert queue.put('robot3', 'embed', 3000) == ''
    assert queue.get(0) == 'intent' and queue.get(0) == 'embed'
    assert [queue.get(0) for _ in range(3)] == ['batch0', 'batch1', 'batch2']
    assert queue.size == queue.bytes == 0 and queue.get(0) is None
    # an idle client banks nothing: its next big request waits its turns again
    assert queue.put('robot2', 'late', 1 << 20) == '' and queue.put('robot1', 'i2', 600) == ''
    assert queue.get(0) == 'i2' and queue.get(0) == 'late'


def test_gate_refuses_in_order_and_counts_by_reason(fleet, stranger):
    clock = Clock(time.time())
    robot = Signer(keys.load(fleet, 'robot1'))
    limits = Limits(max_request_bytes=4096, rate_per_s=1.0, burst=2.0, max_clock_skew_s=60.0)
    gate = Gate(Verifier((fleet / 'ca.pem').read_bytes(), ['robot'], clock=clock), limits, clock)

    def signed(ident, body=None, signer=robot, ts=None):
        return signer.request('intent', body or {'text': 'hi'}, ident,
                              int((clock.now if ts is None else ts) * 1000))

    def reason(data):
        with pytest.raises(Rejected) as caught:
            gate.admit('intent', data)
        return caught.value.reason
    assert reason(b'x' * 5000) == 'too_large'
    assert reason(encode({'id': 'a', 'text': 'hi'})) == 'unauthenticated'
    assert reason(signed('b', signer=Signer(stranger))) == 'unauthenticated'
    assert reason(signed('c', ts=clock.now - 3600)) == 'stale'
    assert gate.admit('intent', signed('d')).client == 'robot1'
    assert reason(signed('d')) == 'replay'
    assert gate.admit('intent', signed('e')).ident == 'e'
    assert reason(signed('f')) == 'rate_limited'                 # burst of 2 spent
    clock.now += 1.0
    assert gate.admit('intent', signed('g')).ident == 'g'        # one token a second
    with pytest.raises(ValueError):
        Limits.from_config({'rate_per_s': -1})


def test_chat_waits_in_a_lane_of_its_own(fleet):
    """Chat queues apart from the models, each lane with its own workers and bounds: a full
    chat lane still lets a model request in, and the other way round."""
    from loom_ros.cloud.server import CloudService
    limits = Limits.from_config({'workers': 2, 'chat_workers': 3})
    assert (limits.workers, limits.chat_workers) == (2, 3)
    for bad in (0, -1, 1.5, True, 'four', 65):
        with pytest.raises(ValueError, match='chat_workers'):
            Limits.from_config({'chat_workers': bad})
    with pytest.raises(ValueError, match='at most 64'):
        Limits.from_config({'workers': 1000})
    assert Limits.from_config({'workers': 64, 'chat_workers': 64}).chat_workers == 64
    models, chats = FairQueue(1, 1, 1 << 20), FairQueue(1, 1, 1 << 20)
    service = CloudService(None, Gate(None, limits), None, models, 'cloud-a', upstream=chats)
    assert service.lane('chat') is chats
    assert all(service.lane(task) is models for task in ('embed', 'intent', 'hello', 'erase'))
    assert [(count, name) for _, count, name in service.lanes()] == [(2, 'serve'), (3, 'chat')]
    assert chats.put('robot1', 'chat-1') == '' and chats.put('robot2', 'chat-2') == 'queue_full'
    assert models.put('robot2', 'intent-1') == ''          # the full chat lane takes no room here
    assert sorted(service.close()) == ['chat-1', 'intent-1']
    one = CloudService(None, Gate(None, limits), None, models, 'cloud-a')   # no upstream lane
    assert one.lane('chat') is models and len(one.lanes()) == 1


def test_a_request_signed_for_one_server_is_refused_by_another(fleet):
    """Cross-server replay: the audience is signed, so a captured request addressed to cloud-a
    is refused by cloud-b (and by cloud-a the second time); a request to the shared key (`*`)
    is answered at most once by each server."""
    clock = Clock(time.time())
    limits = Limits(max_clock_skew_s=300.0)
    verifier = Verifier((fleet / 'ca.pem').read_bytes(), ['robot'], clock=clock)
    gates = {name: Gate(verifier, limits, clock, name) for name in ('cloud-a', 'cloud-b')}
    robot = Signer(keys.load(fleet, 'robot1'))
    to_a = robot.request('intent', {'text': 'hi'}, 'r1', int(clock.now * 1000), aud='cloud-a')

    def reason(gate, data):
        with pytest.raises(Rejected) as caught:
            gate.admit('intent', data)
        return caught.value.reason
    assert reason(gates['cloud-b'], to_a) == 'wrong_server'
    assert gates['cloud-a'].admit('intent', to_a).client == 'robot1'
    assert reason(gates['cloud-a'], to_a) == 'replay'
    # The audience cannot be rewritten: the signature covers it.
    assert reason(gates['cloud-b'], to_a.replace(b'"aud":"cloud-a"', b'"aud":"cloud-b"')) \
        == 'unauthenticated'
    assert reason(gates['cloud-b'], to_a.replace(b'"aud":"cloud-a"', b'"aud":"*"')) \
        == 'unauthenticated'
    # What is left: a request for any server (the shared key, failover) is once per server.
    anyone = robot.request('intent', {'text': 'hi'}, 'r2', int(clock.now * 1000))
    assert [gate.admit('intent', anyone).ident for gate in gates.values()] == ['r2', 'r2']
    assert {reason(gate, anyone) for gate in gates.values()} == {'replay'}
    bad_aud = robot.request('intent', {'text': 'hi'}, 'r3', int(clock.now * 1000), aud='a/b')
    assert reason(gates['cloud-a'], bad_aud) == 'unauthenticated'   # framing refuses it


class _Query:
    """What zenoh.Query gives the service (key, payload, reply_err): the refusals it answered."""

    class _Payload(bytes):
        def to_bytes(self):
            return bytes(self)

    def __init__(self, data: bytes):
        self.key_expr, self.payload, self.errors = 'loom/cloud/intent', self._Payload(data), []

    def reply_err(self, data):
        self.errors.append(data)


def test_a_flood_of_forged_requests_costs_no_ca_check_and_few_signatures(fleet, stranger):
    """Review finding: every forged request cost a CA check of its certificate and a signed
    refusal. A certificate that failed is remembered; refusals are answered (signed) at most
    signed_refusals_per_s, the rest counted, and answering resumes with the clock."""
    from loom_ros.cloud.server import CloudService
    clock = Clock(time.time())
    verifier = Verifier((fleet / 'ca.pem').read_bytes(), ['robot'], clock=clock)
    limits = Limits(unauthenticated_refusals_per_s=5.0)
    service = CloudService(None, Gate(verifier, limits, clock), Signer(keys.load(fleet, 'cloud')),
                           FairQueue(8, 64, 1 << 20), "cloud-a")
    forger = Signer(stranger)
    queries = [_Query(forger.request('intent', {'text': 'hi'}, f'f{i}', int(clock.now * 1000)))
               for i in range(100)]
    for query in queries:
        service.on_query(query)
    assert service.stats['unauthenticated'] == 100
    assert verifier.certs.checked == 1                       # remembered after the first
    assert sum(len(q.errors) for q in queries) == 10         # the burst: twice the rate
    assert service.stats['refusal_unanswered'] == 90
    clock.now += 1.0
    late = _Query(forger.request('intent', {'text': 'hi'}, 'late', int(clock.now * 1000)))
    service.on_query(late)
    assert len(late.errors) == 1 and b'unauthenticated' in late.errors[0]


def test_a_client_at_its_in_flight_bound_waits_while_others_are_served():
    """Chat's lane: one client's items handed out and not yet done() are bounded, so its slow
    chats cannot hold every worker; the others' are served meanwhile, and its next one once
    one of its own is done."""
    from loom_ros.cloud.server import chat_in_flight
    assert [chat_in_flight(Limits(chat_workers=n)) for n in (1, 2, 3, 4, 64)] == \
        [1, 1, 2, 2, 32]
    # set: what it says, up to every chat worker (a one-robot fleet may want them all)
    assert chat_in_flight(Limits.from_config({'chat_workers': 8, 'chat_per_client': 6})) == 6
    assert chat_in_flight(Limits.from_config({'chat_workers': 8, 'chat_per_client': 8})) == 8
    with pytest.raises(ValueError, match='chat_per_client: at most chat_workers'):
        Limits.from_config({'chat_workers': 4, 'chat_per_client': 5})
    with pytest.raises(ValueError, match='chat_per_client: at most chat_workers'):
        Limits.from_config({'chat_per_client': 5})   # against the default 4 workers
    for bad in (0, -1, 1.5, True, 'two'):
        with pytest.raises(ValueError, match='chat_per_client'):
            Limits.from_config({'chat_per_client': bad})
    queue = FairQueue(per_client=8, total=64, total_bytes=1 << 20, max_in_flight=2)
    for i in range(4):
        assert queue.put('robot1', f'r1-{i}', 10) == ''
    assert queue.put('robot2', 'r2-0', 10) == ''
    got = [queue.get(timeout=0), queue.get(timeout=0), queue.get(timeout=0)]
    assert sorted(got) == ['r1-0', 'r1-1', 'r2-0']
    assert queue.get(timeout=0) is None and queue.size == 2   # robot1 at its bound
    queue.done('robot2')            # another client's answer frees nothing of robot1's
    assert queue.get(timeout=0) is None
    queue.done('robot1')
    assert queue.get(timeout=0) == 'r1-2'
    queue.done('robot1')
    queue.done('robot1')
    assert queue.get(timeout=0) == 'r1-3' and queue.get(timeout=0) is None
    unbounded = FairQueue(per_client=8, total=64, total_bytes=1 << 20)
    for i in range(3):
        unbounded.put('robot1', i, 10)
    assert [unbounded.get(timeout=0) for _ in range(3)] == [0, 1, 2]
    unbounded.done('robot1')   # a no-op without a bound
