"""Benchmark of the cloud tier's round trip against its floor, measured in the same run.

    python bench/cloud_bench.py            # ~1 minute
    python bench/cloud_bench.py --quick    # smaller counts

Processes on loopback: a Zenoh router (loom_ros.bridge.zenoh_router), `loom_cloud` servers, and a
bare queryable that echoes its request. The floor is a raw get to that queryable (same router,
same request bytes) plus the model's own time (the server's intent computation, CloudServer.answer,
called directly in this process). The three are measured interleaved, one of each per round, so
the shared machine's load falls on all of them alike. Where the rest goes: the signing and
checking stages timed alone here, and the server's own report in each reply (queue_ms: the wait
between admission and a worker; server_ms: the model inside the server). Then load spread: two
servers behind the same `cloud` identity, how many of a run of requests each answered.
Everything twice: mutual TLS with the router's access control, and plain TCP (--insecure).
Writes bench/results/cloud.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from bridge_bench import free_port, start  # noqa: E402
from bus_bench import machine, summarize  # noqa: E402

from loom_ros.cloud.client import CloudClient  # noqa: E402
from loom_ros.cloud.protocol import (  # noqa: E402
    Signer, Verifier, digest, parse_reply, reply_signed_bytes, unpack,
)
from loom_ros.cloud.server import build_service, load_config  # noqa: E402
from loom_ros.config.params import config_dir  # noqa: E402
from loom_ros.security import keys  # noqa: E402

TEXT = 'will it rain today'
BUDGET_MS = 5000.0
# A bare queryable in its own process, as the cloud server is: it answers with the request's bytes.
ECHO = '''
import sys, time, zenoh
from loom_ros.bridge.zenoh_link import session_config
from loom_ros.security import keys
endpoint, keys_dir = sys.argv[1:3]
identity = keys.load(keys_dir, 'bench_tool') if endpoint.startswith('tls/') else None
session = zenoh.open(session_config('client', [endpoint], identity=identity))
queryable = session.declare_queryable('loom/raw/echo', lambda q: q.reply(q.key_expr, q.payload))
print('{"ready": true}', flush=True)
while True:
    time.sleep(3600)
'''


def stages(service, identity, n: int) -> dict:
    """Each signing and checking step alone, in this process (P50 of n, microseconds)."""
    signer = Signer(identity)
    verifier = Verifier(identity.ca.read_bytes(), ('cloud',))
    requests = [signer.request('intent', {'text': TEXT}, uuid.uuid4().hex,
                               int(time.time() * 1000)) for _ in range(n)]
    answer = service.server.answer('intent', {'text': TEXT, 'id': 'x'})
    reply = service.signer.reply('x', digest(requests[0]), answer)

    def check():
        header, body = unpack(reply)
        verifier.verify(header, reply_signed_bytes('x', digest(requests[0]), body))
        parse_reply(body)
    steps = {
        'client_sign': lambda i: signer.request('intent', {'text': TEXT}, uuid.uuid4().hex,
                                                int(time.time() * 1000)),
        'server_admit': lambda i: service.gate.admit('intent', requests[i]),
        'server_sign': lambda i: service.signer.reply('x', digest(requests[0]), answer),
        'client_check': lambda i: check(),
    }
    out = {}
    for name, step in steps.items():
        lat = []
        for i in range(n):
            t = time.perf_counter_ns()
            step(i)
            lat.append((time.perf_counter_ns() - t) / 1000.0)
        out[name] = summarize(lat)
    return out


def run(transport: str, fleet: Path, tmp: Path, n_rt: int, n_spread: int) -> dict:
    import zenoh
    from loom_ros.bridge.zenoh_link import session_config
    secure = transport == 'tls'
    flags = ['--keys-dir', str(fleet)] + ([] if secure else ['--insecure'])
    (tmp / 'fleet.yaml').write_text(yaml.safe_dump({'grants': {'bench_tool': {
        'serve': ['loom/raw/**'], 'query': ['loom/raw/**']}}}))
    port = free_port()
    ep = f'{transport}/127.0.0.1:{port}'
    procs = [start(['-m', 'loom_ros.bridge.zenoh_router', '--listen', ep, *flags,
                    '--fleet', str(tmp / 'fleet.yaml')])]
    # The per-client rate limit (config/cloud.yaml) would answer `busy` to a benchmark.
    config = load_config(config_dir() / 'cloud.yaml')
    config.setdefault('limits', {}).update(rate_per_s=1e6, burst=1e6)
    (tmp / 'cloud.yaml').write_text(yaml.safe_dump(config))
    cloud = ['-m', 'loom_ros.cloud.server', '--connect', ep, *flags,
             '--config', str(tmp / 'cloud.yaml')]
    procs.append(start([*cloud, '--instance', 'cloud-a']))
    procs.append(start(['-c', ECHO, ep, str(fleet)]))
    identity = keys.load(fleet, 'bench_tool')
    session = zenoh.open(session_config('client', [ep], identity=identity if secure else None))
    results: dict = {'transport': transport}
    try:
        client = CloudClient.from_keys(session, fleet, 'bench_tool')
        deadline = time.monotonic() + 60
        while not client.infer('intent', {'text': 'warm up'}, BUDGET_MS).ok:
            if time.monotonic() > deadline:
                raise SystemExit('the cloud server never answered')
        # The model, called directly: the same service a loom_cloud builds from this config.
        service = build_service(config, keys.load(fleet, 'cloud'), instance='direct')
        payload = Signer(identity).request('intent', {'text': TEXT}, 'x', int(time.time() * 1000))

        def raw():
            assert len(list(session.get('loom/raw/echo', payload=payload, timeout=5.0))) == 1

        def model():
            service.server.answer('intent', {'text': TEXT, 'id': 'x'})
        cloud_results = []

        def round_trip():
            result = client.infer('intent', {'text': TEXT}, BUDGET_MS)
            assert result.ok, result
            cloud_results.append(result)
        for _ in range(20):   # warm all three
            raw(), model(), round_trip()
        cloud_results.clear()
        lat = {'raw_zenoh_get': [], 'model': [], 'cloud_intent': []}
        for _ in range(n_rt):
            for name, call in (('raw_zenoh_get', raw), ('model', model),
                               ('cloud_intent', round_trip)):
                t = time.perf_counter_ns()
                call()
                lat[name].append((time.perf_counter_ns() - t) / 1000.0)
        for name, values in lat.items():
            results[name] = summarize(values)
        results['server_model'] = summarize([r.server_ms * 1000.0 for r in cloud_results])
        results['server_queue'] = summarize([r.queue_ms * 1000.0 for r in cloud_results])
        results['stages'] = stages(service, identity, n_rt)
        floor = results['raw_zenoh_get']['p50_us'] + results['model']['p50_us']
        results['floor_p50_us'] = round(floor, 1)
        results['ratio_p50'] = round(results['cloud_intent']['p50_us'] / floor, 2)
        results['overhead_p50_us'] = round(results['cloud_intent']['p50_us'] - floor, 1)
        print(f'{transport}: {json.dumps(results)}', file=sys.stderr, flush=True)

        # Load spread: a second server behind the same identity; who answers a run of requests.
        procs.append(start([*cloud, '--instance', 'cloud-b']))
        deadline = time.monotonic() + 60
        while set(client.instances()) != {'cloud-a', 'cloud-b'}:
            if time.monotonic() > deadline:
                raise SystemExit(f'the client never saw both servers: {client.instances()}')
            client.infer('hello', {}, BUDGET_MS)
        shares = Counter()
        spread_lat = []
        for _ in range(n_spread):
            result = client.infer('intent', {'text': TEXT}, BUDGET_MS)
            assert result.ok, result
            shares[result.server] += 1
            spread_lat.append(result.latency_ms * 1000.0)
        results['spread'] = {'requests': n_spread, 'answered_by': dict(sorted(shares.items())),
                             'round_trip': summarize(spread_lat)}
    finally:
        session.close()
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return results


def render(r: dict) -> str:
    lines = ['# Cloud tier round trip against raw Zenoh plus the model', '',
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, "
             f"{r['machine']['date']}. {r['note']}", '',
             '| transport | path | P50 us | P99 us | max us | n |', '| --- | --- | --- | --- | --- | --- |']
    for t in ('tls', 'tcp'):
        for name in ('raw_zenoh_get', 'model', 'cloud_intent', 'server_model', 'server_queue'):
            s = r[t][name]
            lines.append(f"| {t} | {name} | {s['p50_us']} | {s['p99_us']} | {s['max_us']} | {s['n']} |")
    lines += ['', 'Round trip over (raw get + model), P50: ' + ', '.join(
        f"{t.upper()} {r[t]['ratio_p50']} ({r[t]['cloud_intent']['p50_us']} us over a floor of "
        f"{r[t]['floor_p50_us']} us)" for t in ('tls', 'tcp')) + '.', '',
        'Stages alone (P50 us, TLS run): ' + ', '.join(
            f"{k} {v['p50_us']}" for k, v in r['tls']['stages'].items()) + '.', '',
        'Load spread, two servers behind the same identity (answers per server): ' + '; '.join(
            f"{t.upper()} {r[t]['spread']['answered_by']} of {r[t]['spread']['requests']}, "
            f"P50 {r[t]['spread']['round_trip']['p50_us']} us" for t in ('tls', 'tcp')) + '.', '']
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--quick', action='store_true')
    args = parser.parse_args()
    n_rt, n_spread = (100, 40) if args.quick else (400, 200)
    tmp = Path(tempfile.mkdtemp())
    fleet = tmp / 'keys'
    keys.ensure_local(fleet, {'router': 'router', 'cloud': 'cloud', 'bench_tool': 'operator'})
    results = {'machine': machine(), 'note': os.environ.get('LOOM_BENCH_NOTE', 'taken with nothing else running'),
               'counts': {'round_trips': n_rt, 'spread': n_spread}}
    for transport in ('tls', 'tcp'):
        results[transport] = run(transport, fleet, tmp, n_rt, n_spread)
    out = HERE / 'results'
    out.mkdir(exist_ok=True)
    (out / 'cloud.json').write_text(json.dumps(results, indent=2) + '\n')
    (out / 'cloud.md').write_text(render(results))
    print(render(results))


if __name__ == '__main__':
    main()
