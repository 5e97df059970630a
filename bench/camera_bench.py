"""Camera-frame benchmark: 640x480 rgb8 frames from one process to another, raw rclpy
sensor_msgs/Image against Loom's bus (a `camera.front` event, Realtime QoS from config/loom.yaml),
measured in the same run, under each Fast DDS transport option tried.

    python bench/camera_bench.py               # every option, 3 rounds of 300 frames (long)
    python bench/camera_bench.py --quick       # 90 frames per case, builtin vs loom, 1 round
    python bench/camera_bench.py --options builtin,loom --modes 30hz --kinds raw,loom,service \
        --frames 150 --rounds 1 --ranges SUBNET --append    # what bench/results/camera.md ran

Transport options (each sets the environment of both processes, as bring-up would):
- builtin:     Fast DDS's builtin transports (UDPv4 + shared memory with a 512 KB segment),
               what every Loom process used before config/fastdds.xml;
- loom:        config/fastdds.xml, the profile Loom ships (shared memory, 16 MB segment, + UDPv4);
- shm:<bytes>: the same profile with another segment size (e.g. shm:2097152);
- udp:         UDPv4 only (what a frame meets crossing hosts, here on loopback);
- large_data:  FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA (shared memory + TCP, UDP for discovery);
- loom_malloc: `loom` plus glibc malloc thresholds (MALLOC_ENV) that keep freed frame-sized
               buffers in the process: by default glibc maps every buffer over 128 KB afresh
               and returns it on free, so each copy of a 786 KB frame (rclpy message, bytes,
               serialization) pays page faults and zeroing, which a loaded machine turns into
               milliseconds (the face flow's tail, issue 15).
Kinds: `raw` (rclpy Image), `loom` (a camera.front event on Loom's bus), `service` (the face flow's
plugin call across processes: a HandleEvent request carrying the frame event, a small answer).
Modes: `30hz` (a camera) and `max` (back to back: how fast the path drains).
QoS: `realtime` is Loom's Realtime row (best effort, keep last 10) for both raw and Loom;
`reliable` (raw only) is the same with RELIABLE, for comparison.

Delivery is counted per frame number; latency runs from the publisher's CLOCK_MONOTONIC stamp
(taken before the Event or Image is handed over) to the subscriber's callback, one clock on one
host. Writes bench/results/camera.json and camera.md (with the machine and LOOM_BENCH_NOTE).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROFILE = ROOT / 'config' / 'fastdds.xml'
WIDTH, HEIGHT = 640, 480
LOOM_TOPIC = 'camera.front'
RAW_TOPIC = 'bench/camera/image_raw'
STAMP_KEY = 'bench.t_ns'
INDEX_KEY = 'bench.i'
SERVICE = 'bench/face_expression/handle_event'
DDS_ENV = ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE',
           'FASTDDS_BUILTIN_TRANSPORTS', 'RMW_FASTRTPS_USE_QOS_FROM_XML')
MATCH_TIMEOUT_S = 30.0
# Buffers up to 4 MB (the bus's max_payload_bytes) come from the heap and up to 16 MB of free
# heap stays mapped: a frame's buffers are reused instead of mapped, faulted in and unmapped.
MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': '4194304', 'MALLOC_TRIM_THRESHOLD_': '16777216'}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float('nan')
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100.0 * (len(ordered) - 1))))]


def summarize_ms(latencies_ns: list[int]) -> dict:
    ms = [v / 1e6 for v in latencies_ns]
    return {'p50_ms': round(percentile(ms, 50), 2), 'p99_ms': round(percentile(ms, 99), 2),
            'max_ms': round(max(ms), 2) if ms else float('nan')}


def make_frame() -> bytes:
    """One deterministic 640x480 rgb8 frame (a gradient; the content does not matter to DDS)."""
    import numpy as np
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([(x * 255 // WIDTH), (y * 255 // HEIGHT), ((x + y) % 256)], axis=2)
    return rgb.astype(np.uint8).tobytes()


# -- transport options ------------------------------------------------------------------------
def shm_profile(segment_bytes: int, directory: str) -> str:
    """config/fastdds.xml with another shared-memory segment size, written into `directory`."""
    text = PROFILE.read_text()
    start = text.index('<segment_size>') + len('<segment_size>')
    end = text.index('</segment_size>')
    path = os.path.join(directory, f'fastdds_shm_{segment_bytes}.xml')
    Path(path).write_text(text[:start] + str(int(segment_bytes)) + text[end:])
    return path


UDP_ONLY = """<?xml version="1.0" encoding="UTF-8" ?>
<dds xmlns="http://www.eprosima.com"><profiles>
  <transport_descriptors><transport_descriptor>
    <transport_id>udp</transport_id><type>UDPv4</type>
  </transport_descriptor></transport_descriptors>
  <participant profile_name="udp_only" is_default_profile="true"><rtps>
    <useBuiltinTransports>false</useBuiltinTransports>
    <userTransports><transport_id>udp</transport_id></userTransports>
  </rtps></participant>
</profiles></dds>
"""


def option_env(option: str, scratch: str) -> dict:
    """The environment variables a transport option sets (every other DDS variable is cleared)."""
    if option == 'builtin':
        return {}
    if option in ('loom', 'loom_malloc'):   # the way bring-up sets it
        from loom_ros.bus.qos import fastdds_environment
        env = fastdds_environment({'RMW_IMPLEMENTATION': 'rmw_fastrtps_cpp'}, PROFILE.parent)
        return {**env, **MALLOC_ENV} if option == 'loom_malloc' else env
    if option.startswith('shm:'):
        return {'FASTDDS_DEFAULT_PROFILES_FILE': shm_profile(int(option[4:]), scratch)}
    if option == 'udp':
        path = os.path.join(scratch, 'fastdds_udp.xml')
        Path(path).write_text(UDP_ONLY)
        return {'FASTDDS_DEFAULT_PROFILES_FILE': path}
    if option == 'large_data':
        return {'FASTDDS_BUILTIN_TRANSPORTS': 'LARGE_DATA'}
    raise SystemExit(f'unknown transport option {option!r}')


# -- the two processes ------------------------------------------------------------------------
def _qos(name: str):
    from rclpy.qos import ReliabilityPolicy

    from loom_ros.bus.qos import QosLevel, to_qos_profile
    profile = to_qos_profile(QosLevel.REALTIME)
    if name == 'reliable':
        profile.reliability = ReliabilityPolicy.RELIABLE
    return profile


def _loom_bus(node):
    """A bus with the product's per-topic QoS table (camera.** is Realtime in config/loom.yaml)."""
    from loom_ros.bus.bus import EventBus
    from loom_ros.bus.qos import TopicQosTable
    from loom_ros.config.params import node_defaults
    defaults = node_defaults('camera_adapter')
    table = TopicQosTable(list(defaults['bus.topic_qos']), default=defaults['bus.default_qos'])
    return EventBus(node, topic_qos=table,
                    max_payload_bytes=int(defaults['bus.max_payload_bytes']))


def _stdin_lines():
    """Lines the harness writes to this worker, as a blocking iterator."""
    for line in sys.stdin:
        yield line.strip()


def _say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def run_publisher(kind: str, qos: str, frames: int, rate_hz: float) -> None:
    import rclpy
    from rclpy.node import Node
    rclpy.init()
    node = Node('camera_bench_pub')
    pixels = make_frame()
    commands = _stdin_lines()
    if kind == 'raw':
        from sensor_msgs.msg import Image
        pub = node.create_publisher(Image, RAW_TOPIC, _qos(qos))
        msg = Image(width=WIDTH, height=HEIGHT, encoding='rgb8', step=WIDTH * 3, data=pixels)
        msg.header.frame_id = 'camera_front_optical'

        def send(i: int) -> None:
            t = time.monotonic_ns()
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(t, 1_000_000_000)
            msg.header.frame_id = str(i)
            pub.publish(msg)
    elif kind == 'service':
        return _run_client(node, pixels, commands, frames, rate_hz)
    else:
        from loom_ros.bus.event import Event, Privacy
        bus = _loom_bus(node)
        pub = bus.publisher_for(LOOM_TOPIC)
        meta = {'width': str(WIDTH), 'height': str(HEIGHT), 'encoding': 'rgb8',
                'step': str(WIDTH * 3)}

        def send(i: int) -> None:   # what camera_adapter_node does with each frame
            t = time.monotonic_ns()
            bus.publish(LOOM_TOPIC, Event(
                type=LOOM_TOPIC, payload=pixels, source='camera_bench',
                metadata={**meta, STAMP_KEY: str(t), INDEX_KEY: str(i)},
                frame_id='camera_front_optical', privacy=Privacy.SENSITIVE))
    deadline = time.monotonic() + MATCH_TIMEOUT_S
    while pub.get_subscription_count() < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    _say(matched=pub.get_subscription_count() >= 1)
    next(commands)   # GO
    cpu0, t0 = time.process_time(), time.monotonic()
    period = 1.0 / rate_hz if rate_hz > 0 else 0.0
    failed = 0
    for i in range(frames):
        if period:
            delay = t0 + i * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        try:
            send(i)
        except Exception:  # noqa: BLE001: a refused write (reliable, history full) is a loss
            failed += 1
    elapsed = time.monotonic() - t0
    _say(sent=frames - failed, failed=failed, send_s=round(elapsed, 3),
         pub_cpu_ms_per_frame=round((time.process_time() - cpu0) * 1000 / frames, 3))
    for command in commands:   # keep the writer (and its shared-memory segment) until EXIT
        if command == 'EXIT':
            break
    node.destroy_node()
    rclpy.shutdown()


def _frame_event(pixels: bytes, index: int):
    from loom_ros.bus.event import Event, Privacy
    return Event(type=LOOM_TOPIC, payload=pixels, source='camera_bench',
                 metadata={'width': str(WIDTH), 'height': str(HEIGHT), 'encoding': 'rgb8',
                           'step': str(WIDTH * 3), STAMP_KEY: str(time.monotonic_ns()),
                           INDEX_KEY: str(index)},
                 frame_id='camera_front_optical', privacy=Privacy.SENSITIVE)


def _run_client(node, pixels: bytes, commands, frames: int, rate_hz: float) -> None:
    """The face flow's plugin call in the one-process-per-node topology: the agent host sends
    the frame event to the plugin host's HandleEvent service and waits for the answer."""
    import rclpy
    from rclpy.task import Future  # noqa: F401

    from loom_msgs.srv import HandleEvent
    from loom_ros.bus.executor import make_executor
    executor = make_executor()
    executor.add_node(node)
    client = node.create_client(HandleEvent, SERVICE)
    _say(matched=client.wait_for_service(timeout_sec=MATCH_TIMEOUT_S))
    next(commands)   # GO
    latencies, failed = [], 0
    cpu0, t0 = time.process_time(), time.monotonic()
    period = 1.0 / rate_hz if rate_hz > 0 else 0.0
    for i in range(frames):
        if period:
            delay = t0 + i * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        start = time.monotonic_ns()
        future = client.call_async(HandleEvent.Request(event=_frame_event(pixels, i).to_msg()))
        executor.spin_until_future_complete(future, timeout_sec=10.0)
        if future.done() and future.result() is not None and future.result().response.ok:
            latencies.append(time.monotonic_ns() - start)
        else:
            failed += 1
            client.remove_pending_request(future)
    elapsed = time.monotonic() - t0
    _say(sent=frames, failed=failed, send_s=round(elapsed, 3),
         pub_cpu_ms_per_frame=round((time.process_time() - cpu0) * 1000 / frames, 3),
         answered=len(latencies), **summarize_ms(latencies),
         lat_ms=[round(v / 1e6, 2) for v in latencies],
         delivered_fps=round(len(latencies) / elapsed, 1) if elapsed > 0 else 0.0)
    for command in commands:
        if command == 'EXIT':
            break
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown()


def _run_server(node, frames: int) -> None:
    """A plugin host's HandleEvent service: takes the frame, answers a small result event."""
    import rclpy

    from loom_msgs.msg import PluginResponse
    from loom_msgs.srv import HandleEvent
    from loom_ros.bus.event import Event
    from loom_ros.bus.executor import make_executor
    executor = make_executor()
    executor.add_node(node)
    seen: set[int] = set()
    state = {'cpu0': None, 'bad': 0}
    result = Event.with_json('face.expression', {'label': 'happy', 'confidence': 0.9})

    def handle(request, response):
        if state['cpu0'] is None:
            state['cpu0'] = time.process_time()
        meta = {kv.key: kv.value for kv in request.event.metadata}
        if len(request.event.payload) != WIDTH * HEIGHT * 3:
            state['bad'] += 1
        seen.add(int(meta[INDEX_KEY]))
        response.response = PluginResponse(ok=True, events=[result.to_msg()])
        return response
    node.create_service(HandleEvent, SERVICE, handle)
    _say(matched=True)
    for command in _stdin_lines_spinning(executor):
        if command == 'END':
            break
    cpu = time.process_time() - state['cpu0'] if state['cpu0'] is not None else 0.0
    _say(received=len(seen), duplicates=0, bad_size=state['bad'], bus_lost=None,
         sub_cpu_ms_per_frame=round(cpu * 1000 / max(1, len(seen)), 3))
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown()


def _stdin_lines_spinning(executor):
    """Spin `executor` while waiting for each line the harness writes."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(_stdin_lines()), daemon=True)
    reader.start()
    while True:
        executor.spin_once(timeout_sec=0.05)
        while lines:
            yield lines.pop(0)
        if not reader.is_alive() and not lines:
            return


def run_subscriber(kind: str, qos: str, frames: int) -> None:
    import rclpy
    from rclpy.node import Node
    from rclpy.task import Future

    from loom_ros.bus.executor import make_executor, spin_until
    rclpy.init()
    node = Node('camera_bench_sub')
    if kind == 'service':
        return _run_server(node, frames)
    executor = make_executor()
    executor.add_node(node)
    done = Future(executor=executor)
    seen: set[int] = set()
    latencies: list[int] = []
    state = {'cpu0': None, 'bad': 0, 'first_stamp': None, 'last_recv': None}

    def record(stamp_ns: int, index: int, size: int) -> None:
        now = time.monotonic_ns()
        if state['cpu0'] is None:
            state['cpu0'] = time.process_time()
        if state['first_stamp'] is None or stamp_ns < state['first_stamp']:
            state['first_stamp'] = stamp_ns
        state['last_recv'] = now
        if size != WIDTH * HEIGHT * 3:
            state['bad'] += 1
        latencies.append(now - stamp_ns)
        seen.add(index)
        if len(seen) >= frames and not done.done():
            done.set_result(True)

    if kind == 'raw':
        from sensor_msgs.msg import Image
        sub = node.create_subscription(
            Image, RAW_TOPIC, lambda m: record(
                m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec,
                int(m.header.frame_id), len(m.data)), _qos(qos))
        publishers = lambda: sub.get_publisher_count()   # noqa: E731
        lost = lambda: None   # noqa: E731
    else:
        bus = _loom_bus(node)
        handle = bus.subscribe(LOOM_TOPIC, lambda e, _t: record(
            int(e.metadata[STAMP_KEY]), int(e.metadata[INDEX_KEY]), len(e.payload)))
        publishers = lambda: node.count_publishers(bus._endpoints[   # noqa: E731
            (LOOM_TOPIC, handle.topics[LOOM_TOPIC])].fq_name)
        lost = lambda: handle.counters.lost   # noqa: E731

    def watch_stdin() -> None:
        for command in _stdin_lines():
            if command == 'END' and not done.done():
                done.set_result(False)   # spin_until polls the future every 0.1 s
                return
    matched = Future(executor=executor)
    timer = node.create_timer(0.02, lambda: publishers() >= 1 and not matched.done()
                              and matched.set_result(True))
    spin_until(executor, matched, poll_s=0.1)
    node.destroy_timer(timer)
    _say(matched=True)
    threading.Thread(target=watch_stdin, daemon=True).start()
    spin_until(executor, done, poll_s=0.1)
    cpu = time.process_time() - state['cpu0'] if state['cpu0'] is not None else 0.0
    span_s = ((state['last_recv'] - state['first_stamp']) / 1e9 if state['last_recv']
              else float('nan'))
    _say(received=len(seen), duplicates=len(latencies) - len(seen), bad_size=state['bad'],
         bus_lost=lost(), delivered_fps=round(len(seen) / span_s, 1) if span_s > 0 else 0.0,
         sub_cpu_ms_per_frame=round(cpu * 1000 / max(1, len(seen)), 3),
         lat_ms=[round(v / 1e6, 2) for v in latencies], **summarize_ms(latencies))
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown()


# -- the harness ------------------------------------------------------------------------------
class Worker:
    """A worker subprocess that speaks one JSON object per stdout line. Its stdout is read
    unbuffered: select() on a buffered pipe misses lines already read ahead."""

    def __init__(self, args: list[str], env: dict):
        self.proc = subprocess.Popen([sys.executable, __file__, *args], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.fd = self.proc.stdout.fileno()
        self.pending = b''
        self.lines: list[str] = []

    def read(self, timeout_s: float, required: bool = True) -> dict | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            while self.lines:
                line = self.lines.pop(0)
                if line.startswith('{'):
                    return json.loads(line)
            if select.select([self.fd], [], [], 0.2)[0]:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                *complete, self.pending = (self.pending + chunk).split(b'\n')
                self.lines.extend(line.decode() for line in complete)
            elif self.proc.poll() is not None:
                break
        if not required and self.proc.poll() is None:
            return None
        raise RuntimeError(f'worker {self.proc.args[2:]} said nothing in {timeout_s} s; '
                           f'stderr: {self._stderr()}')

    def send(self, command: str) -> None:
        try:
            self.proc.stdin.write(command + '\n')
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.stderr.read()[-2000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send('EXIT')
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_case(option: str, kind: str, mode: str, qos: str, frames: int, scratch: str,
             domain: int, discovery: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DDS_ENV and k not in MALLOC_ENV}
    env.update(option_env(option, scratch))
    env.update(ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE=discovery,
               RMW_IMPLEMENTATION='rmw_fastrtps_cpp')
    rate = 30.0 if mode == '30hz' else 0.0
    common = ['--kind', kind, '--qos', qos, '--frames', str(frames)]
    sub = Worker(['--role', 'sub', *common], env)
    pub = Worker(['--role', 'pub', *common, '--rate', str(rate)], env)
    try:
        if not pub.read(MATCH_TIMEOUT_S + 30).get('matched'):
            raise RuntimeError('publisher never matched the subscriber')
        sub.read(MATCH_TIMEOUT_S + 30)
        pub.send('GO')
        sent = pub.read(frames / (rate or 30.0) + 120)
        # The subscriber stops by itself at `frames`; else it is told to stop 5 s after the last
        # frame left (a lost best-effort frame never comes).
        got = sub.read(5.0, required=False) if kind != 'service' else None
        if got is None:
            sub.send('END')
            got = sub.read(30.0)
        return {'load': round(os.getloadavg()[0], 1), 'option': option, 'range': discovery,
                'kind': kind, 'mode': mode, 'qos': qos, 'frames': frames,
                **sent, **got}
    finally:
        pub.close()
        sub.close()


def machine() -> str:
    cpu = 'unknown CPU'
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    with open('/proc/meminfo') as f:
        mem_gb = int(f.readline().split()[1]) / 1024 / 1024
    import rclpy  # noqa: F401
    return (f'{cpu}, {os.cpu_count()} cores, {mem_gb:.1f} GB; {platform.platform()}; Python '
            f'{platform.python_version()}, rmw_fastrtps_cpp (Fast DDS 3.2), EventsExecutor; '
            f'load average at start {os.getloadavg()[0]:.2f}; {time.strftime("%Y-%m-%d")}')


READING = """How to read it:
- *builtin* is what every Loom process used before config/fastdds.xml. A 640x480 RGB Loom event
  is 921,600 bytes of pixels plus its envelope, sent as ~15 RTPS fragments of 64 KB; the builtin
  shared-memory segment is 512 KB, smaller than one frame, so the writer recycles buffers the
  reader has not read yet and best-effort frames are lost (the issue's "received 132, lost 135").
  *shm:N* shows the segment size is the cause: 1 MB is already enough at 30 Hz.
- *udp*: UDP alone loses frames too (fragments overrun the socket buffers); *reliable* over the
  builtin transports delivers by retransmitting, at several times the latency.
- *large_data* (FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA) also works with the default discovery
  range, but the rmw ignores it under ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST (it then builds its
  own transports) and it moves traffic to other hosts onto TCP; the shipped profile works under
  both ranges, so Loom ships the profile.
- *service*: the face flow's plugin call in the one-process-per-node topology (agent host ->
  plugin host HandleEvent carrying the frame, answered with a small result): the frame crosses
  DDS a second time, reliably; its round trip is in the latency column.
- *max*: frames back to back. Best effort keeps the newest (keep last 10), so what a subscriber
  cannot take in time is dropped by design; delivered fps is what the subscriber drained.
- Under LOCALHOST the rmw adds its own shared-memory (512 KB) and UDP transports next to the
  profile's; frames still go through the profile's segment."""


def write_results(runs: list[dict], note: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = combine(runs)
    info = {'machine': machine(), 'note': note, 'rows': rows, 'runs': runs}
    (out / 'camera.json').write_text(json.dumps(info))
    raw = {(r['range'], r['option'], r['mode'], r['qos']): r for r in rows if r['kind'] == 'raw'}
    lines = ['# Camera-frame benchmark', '',
             f"Machine: {info['machine']}.", '', f'Note: {note}', '',
             f'{WIDTH}x{HEIGHT} rgb8 frames ({WIDTH * HEIGHT * 3:,} bytes of pixels) from one '
             'process to another: raw rclpy sensor_msgs/Image vs a Loom `camera.front` event '
             '(Realtime QoS, best effort keep last 10), same run, same executor. Latency: '
             'publish call to subscriber callback, ms (service: call to answer). Ratio: P50 / '
             'raw P50 under the same option and mode. Cases ran in turn, round after round, '
             'so every option met the same load; each row adds its rounds up (load: the '
             '1-minute load average when its cases ran).', '',
             '| discovery | transport | mode | qos | kind | delivered / sent | delivered fps | '
             'P50 / P99 / max ms | ratio P50 | pub CPU ms/frame | sub CPU ms/frame | bus lost | '
             'load |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in rows:
        base = raw.get((r['range'], r['option'], r['mode'], r['qos']))
        ratio = (f"{r['p50_ms'] / base['p50_ms']:.2f}" if base and r['kind'] != 'raw'
                 and base['p50_ms'] == base['p50_ms'] and base['p50_ms'] > 0 else '')
        lines.append(
            f"| {r['range']} | {r['option']} | {r['mode']} | {r['qos']} | {r['kind']} | "
            f"{r['received']}/{r['sent']} | {r['delivered_fps']} | {r['p50_ms']} / {r['p99_ms']} / {r['max_ms']} | "
            f"{ratio} | {r['pub_cpu_ms_per_frame']} | {r['sub_cpu_ms_per_frame']} | "
            f"{'' if r['bus_lost'] is None else r['bus_lost']} | {r['load']} |")
    lines += ['', READING]
    (out / 'camera.md').write_text('\n'.join(lines) + '\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--role', choices=['pub', 'sub'])
    parser.add_argument('--kind', choices=['raw', 'loom', 'service'], default='raw')
    parser.add_argument('--qos', choices=['realtime', 'reliable'], default='realtime')
    parser.add_argument('--rate', type=float, default=30.0)
    parser.add_argument('--frames', type=int, default=None)
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--options', default=None)
    parser.add_argument('--modes', default='30hz,max')
    parser.add_argument('--kinds', default='raw,loom,service')
    parser.add_argument('--reliable', action='store_true',
                        help='also raw Image with RELIABLE QoS')
    parser.add_argument('--ranges', default='SUBNET,LOCALHOST',
                        help='ROS_AUTOMATIC_DISCOVERY_RANGE values: with LOCALHOST the rmw adds '
                        'its own shared-memory (512 KB) and UDP transports to any profile')
    parser.add_argument('--out', default=str(HERE / 'results'))
    parser.add_argument('--rounds', type=int, default=None,
                        help='cases run in turn this many times, so every option meets the '
                        "same machine load; results add the rounds up (default 3, quick 1)")
    parser.add_argument('--append', action='store_true',
                        help='add these rows to the ones already in OUT/camera.json')
    args = parser.parse_args()
    if args.role == 'pub':
        return run_publisher(args.kind, args.qos, args.frames, args.rate)
    if args.role == 'sub':
        return run_subscriber(args.kind, args.qos, args.frames)
    frames = args.frames or (90 if args.quick else 300)
    options = (args.options or ('builtin,loom' if args.quick else
                                'builtin,shm:1048576,loom,udp,large_data')).split(',')
    rounds = args.rounds or (1 if args.quick else 3)
    runs = []
    domain = 200 + os.getpid() % 30   # away from the tests' 100-199
    cases = [(k, 'realtime') for k in args.kinds.split(',')]
    if args.reliable:
        cases.append(('raw', 'reliable'))
    with tempfile.TemporaryDirectory(prefix='camera_bench_') as scratch:
        for _ in range(rounds):
            for discovery in args.ranges.split(','):
                for mode in args.modes.split(','):
                    for option in options:
                        for kind, qos in cases:
                            run = run_case(option, kind, mode, qos, frames, scratch, domain,
                                           discovery)
                            runs.append(run)
                            print(json.dumps({k: v for k, v in run.items() if k != 'lat_ms'}),
                                  flush=True)
    note = os.environ.get('LOOM_BENCH_NOTE', 'no note given (LOOM_BENCH_NOTE)')
    previous = Path(args.out) / 'camera.json'
    if args.append and previous.is_file():
        runs = json.loads(previous.read_text())['runs'] + runs
    write_results(runs, note, Path(args.out))


def combine(runs: list[dict]) -> list[dict]:
    """One row per case: the rounds' frames and latencies added up, CPU and fps averaged."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run['range'], run['option'], run['mode'], run['kind'], run['qos']),
                          []).append(run)
    rows = []
    for (rng, option, mode, kind, qos), group in groups.items():
        lat = [v for r in group for v in r.get('lat_ms', [])]
        mean = lambda key: round(sum(r[key] for r in group) / len(group), 3)   # noqa: E731
        lost = [r['bus_lost'] for r in group if r.get('bus_lost') is not None]
        rows.append({'range': rng, 'option': option, 'mode': mode, 'kind': kind, 'qos': qos,
                     'rounds': len(group), 'sent': sum(r['sent'] for r in group),
                     'received': sum(r.get('answered', r['received']) for r in group),
                     'bus_lost': sum(lost) if lost else None,
                     'delivered_fps': round(mean('delivered_fps'), 1),
                     'pub_cpu_ms_per_frame': mean('pub_cpu_ms_per_frame'),
                     'sub_cpu_ms_per_frame': mean('sub_cpu_ms_per_frame'),
                     'load': f"{min(r['load'] for r in group)}-{max(r['load'] for r in group)}",
                     **summarize_ms([v * 1e6 for v in lat])})
    return rows


if __name__ == '__main__':
    main()
