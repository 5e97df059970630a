"""Hostile soak: the whole system (`loom bringup`, both seed flows on simulated sensors) under a
bounded, mixed hostile load from an outsider process on the same DDS domain and Zenoh router,
against the same run without the attack.

Each run has three phases of `--phase` seconds: before, during (the attacker runs) and after.
The attacker sends, round robin at a bounded rate, what the adversarial review of issue 13 found:
forged sequence numbers (1 then 2^64-1) and inconsistent batches, huge event ids (20 kB, 1 MB),
undecodable CDR bytes, forged AgentStatus heartbeats (busy, with the real pid), LocalOnly and
Private speech carrying a canary (one with a forged `loom.upload: embedding`), and Zenoh samples
nested 200,000 deep, oversize or not JSON. Zenoh runs with `--insecure` here, the worst case: with
mutual TLS and the router's access control (the default) an outsider cannot connect at all, so
its samples would never reach the bridge's decoders this soak exists to test. The report:
- events sent per attack kind; rejections per reason (every node's loom/bus/stats, plus the
  bridge's status);
- dead nodes (must be 0): the bring-up process exited, a node stopped publishing its bus stats, or
  an agent not healthy at the end;
- leaks (must be 0): Zenoh samples seen by an outside subscriber that carry a canary;
- lost acknowledged state (must be 0): the counter agent's last heartbeat `handled` against its
  state committed on disk after the run;
- the flows' throughput per phase (emoji updates/s, spoken answers) against the quiet run.

    python bench/soak_hostile.py [--phase 40]   -> bench/results/soak_hostile.md and .json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CANARY = 'canary-7f3a9c'
ROBOT = 'robot1'
U64 = 2**64 - 1


# -- the attacker (a separate process: an outsider with no Loom bus) -----------------------------
def attack(duration: float, zenoh_endpoint: str, victim_pid: int, rate: float) -> dict:
    import rclpy
    import zenoh
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from loom_msgs.msg import AgentStatus, Event as EventMsg, EventBatch, KeyValue
    from loom_ros.bus.event import Event, Privacy
    from loom_ros.bus.qos import to_qos_profile
    rclpy.init()
    node = rclpy.create_node('soak_attacker')
    realtime = to_qos_profile('realtime')
    batched = to_qos_profile('batched')
    imu = node.create_publisher(EventMsg, 'loom/sensor/imu/motion', realtime)
    speech = node.create_publisher(EventBatch, 'loom/mic/primary/speech', batched)
    beats = node.create_publisher(AgentStatus, 'loom/agents/heartbeat',
                                  QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    conf = zenoh.Config()
    conf.insert_json5('mode', '"client"')
    conf.insert_json5('connect/endpoints', json.dumps([zenoh_endpoint]))
    conf.insert_json5('scouting/multicast/enabled', 'false')
    session = zenoh.open(conf)
    fleet_key = f'loom/{ROBOT}/fleet/soak'
    rng = random.Random(13)
    sent: Counter = Counter()
    bus_id = rng.getrandbits(63) | 1

    def msg(event: Event, seq: int):
        m = event.to_msg()
        m.bus_id, m.seq = bus_id, seq
        return m

    def utterance(privacy: Privacy, metadata: dict | None = None) -> Event:
        return Event.with_json('speech.utterance', {
            'text': f'my pin is 4242 {CANARY}', 'phrase': 'what is the weather in london',
            'slots': {}}, source='attacker', privacy=privacy, metadata=metadata or {})

    def batch(events: list, first_seq: int):
        b = EventBatch()
        b.bus_id, b.first_seq = bus_id ^ 0x5A5A, first_seq
        b.events = [e.to_msg() for e in events]
        return b

    kinds = {
        'seq_jump': lambda i: [imu.publish(msg(Event.with_json('imu.motion', {'ax': 0.0}),
                                               1 if i % 2 else U64))],
        'batch_seq_chaos': lambda i: [speech.publish(batch(
            [Event.with_json('speech.partial', {'text': ''})], rng.choice((1, U64 - 1, 2**40))))],
        'huge_id_20k': lambda i: [imu.publish(msg(Event('imu.motion', id='x' * 20_000), i))],
        'huge_id_1m': lambda i: [imu.publish(msg(Event('imu.motion', id='y' * 1_000_000), i))]
        if i % 10 == 0 else [],
        'bad_cdr': lambda i: [speech.publish(bytes(rng.getrandbits(8) for _ in range(64)))],
        'forged_heartbeat': lambda i: [beats.publish(AgentStatus(
            agent_id=rng.choice(('voice', 'face', 'counter')), node='/agent_host_0',
            pid=victim_pid, lifecycle='active', busy_ms=1e9, handled=U64))
            for _ in range(20)],
        'local_only_canary': lambda i: [speech.publish(batch([utterance(Privacy.LOCAL_ONLY)],
                                                             i))],
        'forged_upload_flag': lambda i: [speech.publish(batch([utterance(
            Privacy.PRIVATE, {'loom.upload': 'embedding', 'privacy': 'public'})], i))],
        'zenoh_nested': lambda i: [session.put(fleet_key, b'[' * 200_000)],
        'zenoh_oversize': lambda i: [session.put(fleet_key, b'{"a":"' + b'z' * (8 << 20) + b'"}')]
        if i % 10 == 0 else [],
        'zenoh_garbage': lambda i: [session.put(fleet_key, bytes(rng.getrandbits(8)
                                                                 for _ in range(256)))],
    }
    order = list(kinds)
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < duration:
        kind = order[i % len(order)]
        try:
            sent[kind] += len(kinds[kind](i // len(order) + 2))
        except Exception as exc:  # the attacker itself must not stop: count what it could not send
            sent[f'{kind}:send_error:{type(exc).__name__}'] += 1
        i += 1
        time.sleep(1.0 / rate)
    session.close()
    node.destroy_node()
    rclpy.try_shutdown()
    return dict(sent)


# -- one run of the system (a subprocess of the orchestrator) ------------------------------------
class Observer:
    """Bus stats, agent status and bridge status from every node, plus an outside Zenoh
    subscriber that counts samples carrying the canary."""

    def __init__(self, node, zenoh_endpoint: str):
        import zenoh
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String

        from loom_msgs.msg import AgentStatus, BusStats
        from loom_ros.bus.qos import to_qos_profile
        self.lock = threading.Lock()
        self.bus_stats: dict[str, dict] = {}      # node -> latest rejected counts
        self.stats_seen: dict[str, float] = {}    # node -> last BusStats arrival
        self.agents: dict[str, object] = {}       # agent -> latest manager verdict
        self.beats: dict[str, int] = {}           # agent -> latest handled in its heartbeat
        self.bridge: dict = {}
        self.samples = 0
        self.leaks: Counter = Counter()
        realtime = to_qos_profile('realtime')   # what the bus and the bridge publish stats with
        node.create_subscription(BusStats, 'loom/bus/stats', self._on_stats, realtime)
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        node.create_subscription(AgentStatus, 'loom/agents/status', self._on_status, reliable)
        node.create_subscription(AgentStatus, 'loom/agents/heartbeat', self._on_beat, reliable)
        node.create_subscription(String, 'zenoh_bridge/status', self._on_bridge, realtime)
        conf = zenoh.Config()
        conf.insert_json5('mode', '"client"')
        conf.insert_json5('connect/endpoints', json.dumps([zenoh_endpoint]))
        conf.insert_json5('scouting/multicast/enabled', 'false')
        self.session = zenoh.open(conf)
        self.sub = self.session.declare_subscriber('loom/**', self._on_sample)

    def _on_stats(self, msg) -> None:
        with self.lock:
            self.bus_stats[msg.node] = dict(zip(msg.rejected_reasons, msg.rejected_counts))
            self.stats_seen[msg.node] = time.monotonic()

    def _on_status(self, msg) -> None:
        with self.lock:
            self.agents[msg.agent_id] = (msg.health, msg.restarts, msg.reason)

    def _on_beat(self, msg) -> None:
        with self.lock:   # the forger claims handled = 2^64-1: not an acknowledgement
            if msg.agent_id == 'counter' and msg.handled < U64:
                self.beats['counter'] = max(self.beats.get('counter', 0), int(msg.handled))

    def _on_bridge(self, msg) -> None:
        try:
            data = json.loads(msg.data)
        except ValueError:
            return
        with self.lock:
            self.bridge = data

    def _on_sample(self, sample) -> None:
        data = bytes(sample.payload.to_bytes())
        with self.lock:
            self.samples += 1
            if CANARY.encode() in data:
                self.leaks[str(sample.key_expr)] += 1

    def close(self) -> None:
        self.sub.undeclare()
        self.session.close()


def one_run(hostile: bool, phase: float, rate: float) -> dict:
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    from loom_ros.agents.agent_node import unit_name
    from loom_ros.cli.demo import Watcher, _free_port, _params
    from loom_ros.storage.storage import Storage, StorageConfig
    from loom_ros.config.params import DEFAULTS_FILE, config_dir
    with tempfile.TemporaryDirectory(prefix='loom_soak_') as tmp:
        out = Path(tmp)
        (out / 'logs').mkdir()
        params = _params(str(config_dir() / DEFAULTS_FILE), out)
        port = _free_port()
        endpoint = f'tcp/127.0.0.1:{port}'
        bringup = subprocess.Popen(
            [sys.executable, '-m', 'loom_ros.cli', 'bringup', '--config', str(params),
             '--zenoh-port', str(port), '--log-dir', str(out / 'logs'), '--keys-dir',
             str(out / 'keys'), '--insecure'],
            stdout=subprocess.PIPE, stderr=open(out / 'logs' / 'bringup.err', 'w'), text=True)
        ready = json.loads(bringup.stdout.readline() or '{}')
        if not ready.get('ready'):
            raise RuntimeError('bring-up did not start: '
                               + (out / 'logs' / 'bringup.err').read_text()[-2000:])
        rclpy.init(args=['loom_soak', '--ros-args', '--params-file', str(params)],
                   signal_handler_options=SignalHandlerOptions.NO)
        watcher = Watcher()
        observer = Observer(watcher.node, endpoint)
        phases = {}
        sent: dict = {}
        nodes_before: set = set()
        for name in ('before', 'during', 'after'):
            start = watcher.snapshot()
            t0 = time.monotonic()
            attacker = None
            if name == 'during' and hostile:
                attacker = subprocess.Popen(
                    [sys.executable, __file__, '--attacker', str(phase), endpoint,
                     str(bringup.pid), str(rate)], stdout=subprocess.PIPE, text=True)
            while time.monotonic() - t0 < phase and bringup.poll() is None:
                time.sleep(0.25)
            if attacker is not None:
                line, _ = attacker.communicate(timeout=120)
                sent = json.loads(line.strip().splitlines()[-1]) if line.strip() else {}
            end = watcher.snapshot()
            elapsed = time.monotonic() - t0
            phases[name] = {
                'emoji_per_s': round((end['face']['updates'] - start['face']['updates'])
                                     / elapsed, 2),
                'answers': len(end['voice']['answers']) - len(start['voice']['answers']),
                'transcripts': len(end['voice']['transcripts'])
                - len(start['voice']['transcripts'])}
            with observer.lock:
                if name == 'before':
                    nodes_before = set(observer.stats_seen)
        with observer.lock:
            now = time.monotonic()
            silent = sorted(n for n in nodes_before
                            if now - observer.stats_seen.get(n, 0) > max(5.0, phase / 2))
            rejected: Counter = Counter()
            for counts in observer.bus_stats.values():
                rejected.update(counts)
            agents = dict(observer.agents)
            acked = observer.beats.get('counter', 0)
            bridge = dict(observer.bridge)
            leaks, samples = dict(observer.leaks), observer.samples
        alive = bringup.poll() is None
        observer.close()
        watcher.close()
        rclpy.try_shutdown()
        if alive:
            bringup.send_signal(signal.SIGINT)
        try:
            code = bringup.wait(timeout=60)
        except subprocess.TimeoutExpired:
            bringup.kill()
            code = 'hung on SIGINT'
        # The counter's committed state, from its agent host's unit database under the root.
        with Storage(StorageConfig(str(out), unit=unit_name('/agent_host_0'))) as storage:
            persisted = storage.agent_state.load('counter')[1]
        unhealthy = {a: v for a, v in agents.items() if v[0] != 'ok'}
        if not nodes_before:
            silent.append('(no node published bus stats before the attack)')
        return {'hostile': hostile, 'phases': phases, 'sent': sent,
                'rejected': dict(rejected),
                'bridge': {k: v for k, v in bridge.items() if isinstance(v, (int, float, dict))},
                'dead_nodes': (0 if alive else 1) + len(silent) + len(unhealthy),
                'dead_detail': {'bringup_alive_at_end': alive, 'exit_code': code,
                                'silent_nodes': silent, 'unhealthy_agents': unhealthy},
                'leaks': sum(leaks.values()), 'leak_keys': leaks, 'zenoh_samples': samples,
                'counter_acked': acked, 'counter_persisted': persisted,
                'lost_acknowledged': max(0, acked - persisted)}


def report(quiet: dict, hostile: dict, phase: float, rate: float) -> str:
    def row(run, name):
        p = run['phases'][name]
        return f"{p['emoji_per_s']} emoji/s, {p['answers']} answers, {p['transcripts']} heard"

    def ratio(name):
        q, h = quiet['phases'][name]['emoji_per_s'], hostile['phases'][name]['emoji_per_s']
        return f'{h / q:.2f}' if q else '-'
    machine = (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores; '
               f'{platform.platform()}; Python {platform.python_version()}')
    lines = [
        '# Hostile soak', '',
        f'Machine: {machine}; {time.strftime("%Y-%m-%d")}. Three phases of {phase:.0f} s each; '
        f'the attacker sends one hostile item every {1000 / rate:.0f} ms (round robin over the '
        'kinds below) during the middle phase.', '',
        '| phase | quiet run | hostile run | face flow, hostile / quiet |',
        '| --- | --- | --- | --- |',
        *[f'| {n} | {row(quiet, n)} | {row(hostile, n)} | {ratio(n)} |'
          for n in ('before', 'during', 'after')],
        '', '| check | quiet | hostile | must be |', '| --- | --- | --- | --- |',
        f"| dead nodes | {quiet['dead_nodes']} | {hostile['dead_nodes']} | 0 |",
        f"| leaks of Private/LocalOnly content (canary on Zenoh) | {quiet['leaks']} | "
        f"{hostile['leaks']} | 0 |",
        f"| lost acknowledged state (counter agent) | {quiet['lost_acknowledged']} | "
        f"{hostile['lost_acknowledged']} | 0 |", '',
        '| attack kind | sent |', '| --- | --- |',
        *[f'| {k} | {v} |' for k, v in sorted(hostile['sent'].items())], '',
        '| rejected on the bus, by reason (all nodes) | quiet | hostile |', '| --- | --- | --- |',
        *[f"| {k} | {quiet['rejected'].get(k, 0)} | {v} |"
          for k, v in sorted(hostile['rejected'].items())], '',
        f"Bridge status at the end of the hostile run: `{json.dumps(hostile['bridge'])}`.",
        f"Dead-node detail: quiet `{json.dumps(quiet['dead_detail'])}`, hostile "
        f"`{json.dumps(hostile['dead_detail'])}`.", '']
    return '\n'.join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == '--attacker':
        duration, endpoint, pid, rate = sys.argv[2:6]
        print(json.dumps(attack(float(duration), endpoint, int(pid), float(rate))), flush=True)
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument('--phase', type=float, default=40.0, help='seconds per phase')
    parser.add_argument('--rate', type=float, default=20.0, help='hostile items per second')
    parser.add_argument('--one-run', choices=('quiet', 'hostile'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_run:
        print(json.dumps(one_run(args.one_run == 'hostile', args.phase, args.rate)), flush=True)
        return 0
    env = dict(os.environ, ROS_DOMAIN_ID=os.environ.get('ROS_DOMAIN_ID', '79'),
               ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    runs = {}
    for kind in ('quiet', 'hostile'):
        print(f'== {kind} run: 3 x {args.phase:.0f} s', flush=True)
        done = subprocess.run([sys.executable, __file__, '--one-run', kind, '--phase',
                               str(args.phase), '--rate', str(args.rate)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, text=True, check=True)
        runs[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    md = report(runs['quiet'], runs['hostile'], args.phase, args.rate)
    (REPO / 'bench' / 'results' / 'soak_hostile.json').write_text(json.dumps(runs, indent=2))
    (REPO / 'bench' / 'results' / 'soak_hostile.md').write_text(md)
    print(md)
    h = runs['hostile']
    return 0 if h['dead_nodes'] == 0 and h['leaks'] == 0 and h['lost_acknowledged'] == 0 else 1


if __name__ == '__main__':
    sys.exit(main())
