"""The face flow's shape in plain rclpy, run beside Loom's demo: is the camera-to-emoji tail
Loom's or the machine's? (issue 15: camera-to-emoji P99 under 30 ms while the voice flow runs)

The raw chain has the demo's hops and work, four processes and this one:
  camera   sensor_msgs/Image of the demo's scene (512x512 rgb8, 786 KB) at --rate Hz, stamped
  adapter  takes each Image and publishes it again (Loom's camera adapter makes an event of it)
  face     BlazeFace and the expression model on each frame (the face_expression plugin's classes,
           one thread each), a std_msgs/String result (Loom: the face agent's action)
  ui       a std_msgs/String state per result (Loom: the ui plugin's loom/ui/state)
  here     the latency from the frame's stamp to the state's arrival (Loom: the demo's watcher)
Same Fast DDS profile, malloc settings, executor (EventsExecutor) and QoS rows as Loom's
processes (Realtime for frames and the face result, Batched for the state).

Each round runs, in turn:
  chain  the raw chain alone for --duration s;
  demo   `loom demo --duration` alone: its summary.json's camera-to-emoji samples since ready;
  both   the two at once (the chain on the next ROS domain, at --beside-rate Hz), and the chain's
         samples from the same seconds as the demo's: one machine, the same minutes.
Reports P50/P99/max per run, pooled per kind, and in `both` the demo's P99 over the chain's.

The machine itself is watched too: one ticker process per CPU, pinned, SCHED_FIFO where the
user may (root, CAP_SYS_NICE), wakes every 2 ms and logs each wake-up more than 15 ms late. A
FIFO thread pre-empts every ordinary one, so such a gap means the CPU did not run at all (the
hypervisor took it, or the kernel held it): a slow frame inside one is the machine's, not
Loom's. Each run reports the gaps in its own window (`--no-tickers`: none).

    python bench/face_chain_bench.py                       # 3 rounds of 30 s (about 8 min)
    python bench/face_chain_bench.py --rounds 1 --no-write # a look, nothing written
Writes bench/results/face_chain.md and .json (machine, LOOM_BENCH_NOTE).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

ROLES = ('camera', 'adapter', 'face', 'ui')
TOPICS = {'camera': 'bench/chain/image_raw', 'adapter': 'bench/chain/image',
          'face': 'bench/chain/face', 'ui': 'bench/chain/ui_state'}
WARMUP_S = 3.0          # the chain's first seconds (matching, model warm-up) are not counted
READY_TIMEOUT_S = 60.0
TICK_S = 0.002          # a ticker's sleep
TICK_GAP_MS = 15.0      # a wake-up this late is logged (a CPU that did not run)


def _qos(level: str):
    from loom_ros.bus.qos import to_qos_profile
    return to_qos_profile(level)


def run_role(role: str, rate_hz: float) -> None:
    """One process of the chain, until SIGINT/SIGTERM."""
    import numpy as np
    import rclpy
    from rclpy.experimental import EventsExecutor
    from rclpy.node import Node
    from rclpy.signals import SignalHandlerOptions
    from rclpy.task import Future
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = Node(f'chain_{role}')
    if role == 'camera':
        from loom_ros.plugins.perception.image import image_to_msg
        from loom_ros.sensors.scenes import make_scene
        frame = image_to_msg(make_scene('astronaut'), 'rgb8', 'camera_front_optical')
        pub = node.create_publisher(Image, TOPICS['camera'], _qos('realtime'))

        def tick():
            now = time.time_ns()
            frame.header.stamp.sec, frame.header.stamp.nanosec = divmod(now, 1_000_000_000)
            pub.publish(frame)
        node.create_timer(1.0 / rate_hz, tick)
    elif role == 'adapter':
        pub = node.create_publisher(Image, TOPICS['adapter'], _qos('realtime'))
        node.create_subscription(Image, TOPICS['camera'], pub.publish, _qos('realtime'))
    elif role == 'face':
        from loom_ros.plugins.perception.expression import ExpressionClassifier
        from loom_ros.plugins.perception.face import FaceDetector
        detector, classifier = FaceDetector(threads=1), ExpressionClassifier(threads=1)
        blank = np.zeros((512, 512, 3), dtype=np.uint8)   # warm-up, as the plugin's Init does
        detector.detect(blank)
        classifier.classify_box(blank, (128.0, 128.0, 384.0, 384.0))
        pub = node.create_publisher(String, TOPICS['face'], _qos('realtime'))

        def on_frame(msg):
            rgb = np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.width, 3)
            faces = detector.detect(rgb)
            label = classifier.classify_box(rgb, faces[0].box).label if faces else ''
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            pub.publish(String(data=json.dumps({'label': label, 'stamp_ns': stamp})))
        node.create_subscription(Image, TOPICS['adapter'], on_frame, _qos('realtime'))
    else:
        pub = node.create_publisher(String, TOPICS['ui'], _qos('batched'))

        def on_result(msg):
            result = json.loads(msg.data)
            pub.publish(String(data=json.dumps({'face': result['label'],
                                                'frame_ns': result['stamp_ns']})))
        node.create_subscription(String, TOPICS['face'], on_result, _qos('realtime'))
    # As Loom's processes spin (bus/executor.py): EventsExecutor.spin() fires no timers here,
    # spin_until_future_complete does; a signal completes the future.
    executor = EventsExecutor()
    executor.add_node(node)
    stop = Future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set_result(True))
    print(json.dumps({'ready': role}), flush=True)
    while not stop.done():
        executor.spin_until_future_complete(stop, timeout_sec=0.2)
    os._exit(0)


def run_ticker(cpu: int, out: str) -> None:
    """A wake-up every TICK_S on `cpu`, at SCHED_FIFO when allowed, until SIGTERM; writes
    '# fifo 0|1' then one 'end_ns gap_ms' line per wake-up later than TICK_GAP_MS."""
    import gc
    gc.disable()   # no collection pause of its own in what it measures
    os.sched_setaffinity(0, {cpu})
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
        fifo = True
    except OSError:   # not permitted: an ordinary thread's gaps say less, and the table says so
        fifo = False
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    with open(out, 'w', buffering=1) as f:
        f.write(f'# fifo {int(fifo)}\n')
        last = time.monotonic()
        while True:
            time.sleep(TICK_S)
            now = time.monotonic()
            if (now - last) * 1000.0 > TICK_GAP_MS:
                f.write(f'{time.time_ns()} {(now - last) * 1000.0:.1f}\n')
            last = now


def ticker_window(files, start_ns: int, end_ns: int) -> dict:
    """What the tickers' files say of start_ns..end_ns: whether every one ran at SCHED_FIFO, and
    the gaps over TICK_GAP_MS that overlap the window (a gap ends at its line's time)."""
    fifo, gaps = True, []
    for path in files:
        lines = path.read_text().splitlines() if path.exists() else []
        fifo = fifo and bool(lines) and lines[0] == '# fifo 1'
        for line in lines[1:]:
            end, gap = line.split()
            end, gap = int(end), float(gap)
            if end >= start_ns and end - gap * 1e6 <= end_ns:
                gaps.append(gap)
    return {'fifo': fifo, 'gaps': len(gaps), 'max_gap_ms': max(gaps, default=0.0)}


class Tickers:
    """One run_ticker process per CPU this process may use, for the whole bench."""

    def __init__(self, scratch: Path):
        from loom_ros.bringup.processes import die_with_parent   # a killed bench leaves none
        self.files, self.procs = [], []
        for cpu in sorted(os.sched_getaffinity(0)):
            path = scratch / f'ticker_{cpu}.txt'
            self.files.append(path)
            self.procs.append(subprocess.Popen(
                [sys.executable, __file__, '--role', 'ticker', '--cpu', str(cpu),
                 '--ticker-out', str(path)], cwd=ROOT, preexec_fn=die_with_parent()))

    def window(self, start_ns: int, end_ns: int) -> dict:
        return ticker_window(self.files, start_ns, end_ns)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)


def chain_env(domain: int) -> dict:
    """The environment bring-up gives the node a role stands for (nodes.node_env: Loom's Fast
    DDS profile and malloc settings), on `domain`."""
    from loom_ros.bringup.nodes import by_name, node_env
    return node_env(by_name('camera_adapter'), {**os.environ, 'ROS_DOMAIN_ID': str(domain)})


class Chain:
    """The four role processes and, here, the state subscriber that takes the latencies."""

    def __init__(self, domain: int, rate_hz: float):
        self.domain, self.rate_hz = domain, rate_hz
        self.procs: list[subprocess.Popen] = []
        self.samples: list[tuple[int, float]] = []   # (frame stamp ns, latency ms)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from loom_ros.bringup.processes import die_with_parent   # a killed bench leaves none
        env = chain_env(self.domain)
        for role in reversed(ROLES):   # listeners first
            proc = subprocess.Popen([sys.executable, __file__, '--role', role, '--rate',
                                     str(self.rate_hz)], env=env, stdout=subprocess.PIPE,
                                    text=True, cwd=ROOT, preexec_fn=die_with_parent())
            self.procs.append(proc)
            line = proc.stdout.readline()
            if not line.startswith('{'):
                self.stop()
                raise SystemExit(f'chain role {role} did not start (exit {proc.poll()})')
        ready = threading.Event()
        self._thread = threading.Thread(target=self._listen, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(READY_TIMEOUT_S):
            self.stop()
            raise SystemExit('the chain delivered no state in time')

    def _listen(self, ready: threading.Event) -> None:
        """A subprocess of its own would need a pipe back; a thread with its own rclpy context
        on the chain's domain keeps the demo's domain out of this process's graph."""
        import rclpy
        from rclpy.experimental import EventsExecutor
        from rclpy.task import Future
        from std_msgs.msg import String
        context = rclpy.Context()
        rclpy.init(context=context, domain_id=self.domain)
        node = rclpy.create_node('chain_sink', context=context)

        def on_state(msg):
            now = time.time_ns()
            frame = json.loads(msg.data)['frame_ns']
            with self._lock:
                self.samples.append((frame, (now - frame) / 1e6))
            ready.set()
        node.create_subscription(String, TOPICS['ui'], on_state, _qos('batched'))
        executor = EventsExecutor(context=context)
        executor.add_node(node)
        never = Future()
        while not self._stop.is_set():
            executor.spin_until_future_complete(never, timeout_sec=0.1)
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)

    def between(self, start_ns: int, end_ns: int) -> list[float]:
        with self._lock:
            return [ms for frame, ms in self.samples if start_ns <= frame < end_ns]

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_demo(duration: float, domain: int, out: Path) -> dict:
    """`loom demo` on `domain`; its camera-to-emoji since ready and the window it covers."""
    env = {**os.environ, 'ROS_DOMAIN_ID': str(domain)}
    done = subprocess.run([sys.executable, '-m', 'loom_ros.cli', 'demo', '--duration',
                           str(duration), '--output', str(out)], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=duration + 600)
    if done.returncode != 0:
        raise SystemExit(f'loom demo failed ({done.returncode}):\n{done.stdout[-3000:]}')
    lat = json.loads((out / 'summary.json').read_text())['face']['camera_to_emoji_ms']
    ready_ns = int(lat['ready_ms'] * 1_000_000)
    return {'samples': lat['samples_ms'], 'ready_ns': ready_ns,
            'end_ns': ready_ns + int((max(lat['sample_frames_s'], default=0) + 0.001) * 1e9)}


def stats(samples: list[float]) -> dict:
    from camera_bench import percentile
    return {'n': len(samples), 'p50': round(percentile(samples, 50), 1),
            'p99': round(percentile(samples, 99), 1),
            'max': round(max(samples), 1) if samples else None}


def measure(args) -> list[dict]:
    scratch = Path(tempfile.mkdtemp(prefix='face_chain_'))
    tickers = None
    try:
        tickers = None if args.no_tickers else Tickers(scratch)
        return _rounds(args, scratch, tickers)
    finally:   # each demo leaves its recording and databases: tens of MB a round
        if tickers is not None:
            tickers.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _rounds(args, scratch: Path, tickers) -> list[dict]:
    runs = []
    for r in range(args.rounds):
        for kind in args.kinds.split(','):
            load = round(os.getloadavg()[0], 2)
            if kind == 'chain':   # alone: on the run's own domain
                chain = Chain(args.domain, args.rate)
                chain.start()
                try:
                    time.sleep(WARMUP_S + args.duration)   # the chain runs on its own meanwhile
                finally:
                    chain.stop()
                first = chain.samples[0][0] if chain.samples else 0
                window = (first + int(WARMUP_S * 1e9),
                          first + int((WARMUP_S + args.duration) * 1e9))
                got = chain.between(*window)
                runs.append({'round': r, 'kind': 'chain', 'load': load, 'chain': stats(got),
                             'chain_samples': got, 'window_ns': window})
            elif kind == 'demo':
                demo = run_demo(args.duration, args.domain, scratch / f'demo_{r}')
                runs.append({'round': r, 'kind': 'demo', 'load': load,
                             'demo': stats(demo['samples']), 'demo_samples': demo['samples'],
                             'window_ns': (demo['ready_ns'], demo['end_ns'])})
            else:
                chain = Chain(args.domain + 1, args.beside_rate)
                chain.start()
                try:
                    demo = run_demo(args.duration, args.domain, scratch / f'both_{r}')
                finally:
                    chain.stop()
                got = chain.between(demo['ready_ns'], demo['end_ns'])
                runs.append({'round': r, 'kind': 'both', 'load': load,
                             'demo': stats(demo['samples']), 'chain': stats(got),
                             'demo_samples': demo['samples'], 'chain_samples': got,
                             'window_ns': (demo['ready_ns'], demo['end_ns'])})
            if tickers is not None:
                runs[-1]['machine'] = tickers.window(*runs[-1]['window_ns'])
            print(json.dumps({k: v for k, v in runs[-1].items() if not k.endswith('_samples')}),
                  flush=True)
    return runs


def render(info: dict) -> str:
    lines = ['# Face flow against a raw rclpy chain of the same shape', '',
             f"Machine: {info['machine']}.", '', f"Note: {info['note']}", '',
             f"{info['rounds']} rounds of {info['duration']} s; the chain alone at "
             f"{info['rate']} Hz, beside the demo at {info['beside_rate']} Hz. Camera-to-emoji "
             '(demo: since bring-up was ready) and frame-to-state (chain) in ms.', '',
             '| round | kind | load | demo n | demo P50 / P99 / max | chain n | '
             'chain P50 / P99 / max | demo P99 / chain P99 | CPU gaps > 15 ms (max) |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for run in info['runs']:
        d, c = run.get('demo'), run.get('chain')
        ratio = f"{d['p99'] / c['p99']:.2f}" if d and c and c['p99'] else ''
        lines.append(f"| {run['round']} | {run['kind']} | {run['load']} | "
                     f"{d['n'] if d else ''} | {_three(d)} | {c['n'] if c else ''} | "
                     f"{_three(c)} | {ratio} | {_machine(run.get('machine'))} |")
    lines += ['', 'Pooled (every sample of a kind, all rounds):', '',
              '| kind | who | n | P50 / P99 / max |', '| --- | --- | --- | --- |']
    for key, s in info['pooled'].items():
        kind, who = key.split('/')
        lines.append(f"| {kind} | {who} | {s['n']} | {_three(s)} |")
    return '\n'.join(lines) + '\n'


def _machine(m: dict | None) -> str:
    if m is None:
        return ''
    return f"{m['gaps']} ({m['max_gap_ms']:.0f} ms)" + ('' if m['fifo'] else ', not FIFO')


def _three(s: dict | None) -> str:
    return f"{s['p50']} / {s['p99']} / {s['max']}" if s else ''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--role', choices=ROLES + ('ticker',))
    parser.add_argument('--cpu', type=int, default=0, help='a ticker role: its CPU')
    parser.add_argument('--ticker-out', default='', help='a ticker role: its file')
    parser.add_argument('--no-tickers', action='store_true',
                        help='no per-CPU tickers watching the machine')
    parser.add_argument('--rate', type=float, default=30.0, help='the chain alone, Hz')
    parser.add_argument('--beside-rate', type=float, default=10.0,
                        help='the chain beside the demo, Hz (its inference is load on the demo)')
    parser.add_argument('--duration', type=float, default=30.0)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--kinds', default='chain,demo,both')
    parser.add_argument('--domain', type=int,
                        default=int(os.environ.get('ROS_DOMAIN_ID') or 0) or 61)
    parser.add_argument('--no-write', action='store_true')
    parser.add_argument('--out', default=str(HERE / 'results'))
    args = parser.parse_args()
    if args.role == 'ticker':
        run_ticker(args.cpu, args.ticker_out)
        return
    if args.role:
        run_role(args.role, args.rate)
        return
    from camera_bench import machine
    info = {'machine': machine(), 'note': os.environ.get('LOOM_BENCH_NOTE', ''),
            'rounds': args.rounds, 'duration': args.duration, 'rate': args.rate,
            'beside_rate': args.beside_rate}
    info['runs'] = measure(args)
    # A run's P99 over ~150-900 samples is its second-to-ninth worst: the pooled samples of a
    # kind say more than any one run.
    info['pooled'] = {}
    for kind in args.kinds.split(','):
        for who in ('demo', 'chain'):
            pool = [x for run in info['runs'] if run['kind'] == kind
                    for x in run.get(f'{who}_samples', [])]
            if pool:
                info['pooled'][f'{kind}/{who}'] = stats(pool)
    text = render(info)
    print(text)
    if not args.no_write:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / 'face_chain.json').write_text(json.dumps(info) + '\n')
        (out / 'face_chain.md').write_text(text)


if __name__ == '__main__':
    main()
