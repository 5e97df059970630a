"""Load spread over several `loom cloud serve` behind the same keys (issue 14), across real
processes with mutual TLS and the router's access control: two servers share a run of requests,
and when one is killed mid-stream every request is still answered within its budget."""
import threading
import time

from cloud_fixtures import cloud, fleet, net  # noqa: F401  (fixtures)
from harness import WAIT_LIMIT_S
from loom_ros.cloud.client import MAX_INSTANCES, CloudClient

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
    assert {r.server for r in results[-10:]} == {'cloud-b'}


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
