"""Load spread over several `loom cloud serve` behind the same keys (issue 14), across real
processes with mutual TLS and the router's access control: two servers share a run of requests,
when one is killed mid-stream every request is still answered within its budget (a killed one
costs one retry; test_cloud_hold's own two-server run of this, on an insecure router, is merged
here: each pair of servers costs 10-20 s of the suite), and a request signed for one server
cannot be replayed to the other."""
import threading
import time
import uuid

from cloud_fixtures import cloud, fleet, net, stop_stats  # noqa: F401  (fixtures)
from harness import WAIT_LIMIT_S
from loom_ros.cloud.client import MAX_INSTANCES, CloudClient
from loom_ros.cloud.protocol import (
    Signer, Verifier, digest, parse_reply, reply_signed_bytes, unpack,
)
from loom_ros.security import keys

BUDGET_MS = 10_000.0


def wait_instances(client: CloudClient, expected: set) -> None:
    """Until the client's signed hello to ALL servers has heard exactly `expected`."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    while set(client.discover(block=True)) != expected:
        assert time.monotonic() < deadline, (client.instances(), client.stats)


def test_two_servers_share_the_load_and_a_killed_one_fails_over(cloud, net, fleet):
    # Secure: the per-instance keys (loom/cloud/<instance>/infer/<task>) must pass the router's
    # access control as the cloud role's loom/cloud/** and the robot's query rights.
    servers = {name: cloud('--instance', name, '--extra-latency-ms', '50')
               for name in ('cloud-a', 'cloud-b')}
    client = CloudClient.from_keys(net.session('robot1'), fleet, 'robot1')
    wait_instances(client, set(servers))

    results = []
    lock = threading.Lock()

    def ask(n: int):
        for _ in range(n):
            result = client.infer('intent', {'text': 'will it rain today'}, BUDGET_MS)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=ask, args=(10,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_LIMIT_S)
    assert len(results) == 40 and all(r.ok and r.attempts == 1 for r in results), \
        [r for r in results if not r.ok or r.attempts != 1]
    shares = {name: sum(r.server == name for r in results) for name in servers}
    assert min(shares.values()) >= 10, shares   # each a quarter at least (round-robin: half)

    # Mid-stream, the next server to answer is SIGKILLed while requests are in flight at it.
    results.clear()
    threads = [threading.Thread(target=ask, args=(10,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + WAIT_LIMIT_S
    while len(results) < 8:
        assert time.monotonic() < deadline, results
        time.sleep(0.01)
    servers['cloud-a'].popen.kill()
    for thread in threads:
        thread.join(WAIT_LIMIT_S)
    assert len(results) == 40
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    assert all(r.latency_ms < BUDGET_MS and r.attempts <= 2 for r in results)
    assert client.stats['instance_dropped'] == 1 and client.instances() == ['cloud-b']
    assert client.stats['retry_no_server'] >= 1   # some were in flight at the killed one
    assert {r.server for r in results[-10:]} == {'cloud-b'}
    # A killed one costs one retry, once: after it, the survivor answers at the first attempt.
    results.clear()
    ask(4)
    assert [(r.server, r.attempts) for r in results] == [('cloud-b', 1)] * 4


def test_instances_are_bounded_checked_and_a_dead_one_stays_dropped(fleet):
    now = [1000.0]
    client = CloudClient.from_keys(None, fleet, 'robot1', clock=lambda: now[0])
    for bad in ('', 'a/b', 'a*', '$x', '@x', 'x' * 65, None, 7, ['a']):
        client._seen(bad, now[0])
    assert client.stats['instance_refused'] == 9 and client.instances() == []
    for i in range(MAX_INSTANCES + 5):
        client._seen(f'cloud-{i}', now[0])
    assert len(client.instances()) == MAX_INSTANCES and client.stats['instance_refused'] == 14
    picks = [client._pick() for _ in range(2 * MAX_INSTANCES)]
    assert all(picks.count(name) == 2 for name in client.instances())   # round-robin
    now[0] += 1
    client._drop('cloud-3')
    client._seen('cloud-3', now[0] - 0.5)   # an answer to a hello sent before it failed
    assert 'cloud-3' not in client.instances()
    now[0] += 1
    client._seen('cloud-3', now[0])         # it answered a later hello: back in turn
    assert 'cloud-3' in client.instances()


def test_a_captured_request_cannot_be_replayed_to_another_server(cloud, net, fleet):
    """The robot signs its first attempt for the one instance it asks: replayed to the other
    server (its own key or the shared key, to ALL) it is refused there, and refused as a replay
    by the server it was meant for; the refusals are signed answers, counted by reason."""
    import zenoh
    servers = {name: cloud('--instance', name) for name in ('cloud-a', 'cloud-b')}
    session = net.session('robot1')
    client = CloudClient.from_keys(session, fleet, 'robot1')
    wait_instances(client, set(servers))
    robot = Signer(keys.load(fleet, 'robot1'))
    captured = robot.request('intent', {'text': 'will it rain today'}, uuid.uuid4().hex,
                             int(time.time() * 1000), aud='cloud-a')
    verifier = Verifier((fleet / 'ca.pem').read_bytes(), ['cloud'])

    def ask(key: str, payload: bytes = captured) -> list[tuple[str, bool, str]]:
        """(server, ok, code) of every authentic answer."""
        out = []
        for reply in session.get(key, payload=payload, target=zenoh.QueryTarget.ALL,
                                 timeout=WAIT_LIMIT_S,
                                 consolidation=zenoh.ConsolidationMode.NONE):
            header, body = unpack((reply.ok or reply.err).payload.to_bytes())
            verifier.verify(header, reply_signed_bytes(header['id'], digest(payload), body))
            data = parse_reply(body)
            out.append((data['server'], reply.ok is not None, data.get('code', '')))
        return out
    assert ask('loom/cloud/cloud-a/infer/intent') == [('cloud-a', True, '')]
    assert ask('loom/cloud/cloud-b/infer/intent') == [('cloud-b', False, 'unauthenticated')]
    assert sorted(ask('loom/cloud/infer/intent')) == [('cloud-a', False, 'unauthenticated'),
                                                      ('cloud-b', False, 'unauthenticated')]
    # A request for any server goes to ALL of them (as the client sends it): each has its id,
    # so a replay to either is refused.
    anyone = robot.request('intent', {'text': 'stop'}, uuid.uuid4().hex, int(time.time() * 1000))
    assert sorted(ask('loom/cloud/infer/intent', anyone)) == [('cloud-a', True, ''),
                                                              ('cloud-b', True, '')]
    for name in servers:
        assert ask(f'loom/cloud/{name}/infer/intent', anyone) == [(name, False, 'unauthenticated')]
    stats = {name: stop_stats(proc) for name, proc in servers.items()}
    assert stats['cloud-a'].get('replay') == 2 and 'wrong_server' not in stats['cloud-a']
    assert stats['cloud-b'].get('wrong_server') == 2 and stats['cloud-b'].get('replay') == 1
