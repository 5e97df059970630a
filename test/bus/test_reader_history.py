"""A Loom reader's DDS history holds the depth it asks for, with the Fast DDS profile Loom ships
(config/fastdds.xml). Found with the bridge benchmark: the bridge asks 10,000 deep for its readers
(bridge_node.OUT_READER_DEPTH), but Fast DDS caps every DataReader at 5,000 samples by default
(ResourceLimitsQos max_samples), so a burst past 5,000 was dropped in DDS before the bridge took
it (7,065 of 10,000 put on Zenoh). The profile raises the limit; the depth bounds each reader.

A real bus subscription at the bridge's depth and a publisher on the same topic, in one child
process started with what bring-up gives every Loom process: Fast DDS hands a sample to a reader
of its own participant on the publishing call, so the count does not depend on any timing; the
subscriber takes only after every event was published."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BURST = 6000     # past Fast DDS's default 5,000 samples, under the bridge's 10,000

CHILD = r'''
import json, sys
import rclpy
from rclpy.node import Node
from rclpy.parameter import Parameter
from loom_ros.bridge.bridge_node import OUT_READER_DEPTH
from loom_ros.bus.bus import create_bus
from loom_ros.bus.event import Event
from loom_ros.bus.executor import make_executor
rclpy.init()
# through DDS: the bus's own in-process hand-over would skip the reader being tested
node = Node('reader_history', parameter_overrides=[Parameter('bus.intra_process', value=False)])
bus = create_bus(node, 'zenoh_bridge')
got = []
bus.subscribe('sensor.burst', lambda event, topic: got.append(event.id), depth=OUT_READER_DEPTH)
executor = make_executor()
executor.add_node(node)
for _ in range(20):                     # let the subscription settle before the burst
    executor.spin_once(timeout_sec=0.01)
burst = int(sys.argv[1])
for i in range(burst):
    bus.publish('sensor.burst', Event(type='sensor.burst', id=f'b{i}', source='test'))
before = len(got)
idle = 0
while idle < 50:                         # take until the reader is empty (50 empty turns)
    n = len(got)
    executor.spin_once(timeout_sec=0.02)
    idle = idle + 1 if len(got) == n else 0
print(json.dumps({'taken_before': before, 'taken': len(set(got)), 'depth': OUT_READER_DEPTH}))
bus.destroy()
executor.shutdown()
node.destroy_node()
rclpy.try_shutdown()
'''


def test_a_bridge_reader_holds_a_burst_past_fast_dds_default_sample_limit():
    from loom_ros.bus.qos import FASTDDS_USER_VARS, fastdds_environment
    env = {k: v for k, v in os.environ.items() if k not in FASTDDS_USER_VARS}
    env.update(fastdds_environment(env, ROOT / 'config'))
    out = subprocess.run([sys.executable, '-c', CHILD, str(BURST)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result['depth'] >= BURST
    assert result['taken_before'] == 0           # nothing taken while it was published
    assert result['taken'] == BURST, result
