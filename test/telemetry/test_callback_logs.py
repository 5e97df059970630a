"""A callback that raises on every message costs a few log lines a second, not three per
message: rclpy's executor logs each escaping exception (FATAL, then its traceback) through the
node's logger before Loom's loop counts it, and the masking logger throttles those two lines as
Loom throttles its own (a forged heartbeat flood wrote 800 KB to a manager's log). The count
stays exact. A real node in a real subprocess, its stderr read whole."""
import math
import os
import subprocess
import sys

from harness import REPO

RAISING_NODE = """
import sys, threading, time
import rclpy
from rclpy.node import Node
from rclpy.task import Future
from std_msgs.msg import String
from loom_ros.bus import executor as lx
from loom_ros.telemetry.logs import mask_node_logger

count = int(sys.argv[1])
rclpy.init()
node = Node('raising_node')
mask_node_logger(node)   # what every Loom node does first
calls = []
node.create_subscription(String, 'raising', lambda m: calls.append(1) or 1 / 0, count)
executor = lx.make_executor()
executor.add_node(node)
stop = Future()


def feed():
    context = rclpy.Context()
    context.init()
    sender = Node('raising_sender', context=context)
    pub = sender.create_publisher(String, 'raising', count)
    while pub.get_subscription_count() < 1:
        time.sleep(0.01)
    start = time.monotonic()
    for _ in range(count):
        pub.publish(String(data='x'))
    # a call appends before it raises, and is counted after: wait for both
    while len(calls) < count or lx.callback_errors['/raising_node'] < len(calls):
        time.sleep(0.01)
    print(f'elapsed {time.monotonic() - start:.3f}', file=sys.stderr, flush=True)
    print(f'errors {lx.callback_errors["/raising_node"]}', file=sys.stderr, flush=True)
    stop.set_result(True)
    sender.destroy_node()
    context.shutdown()


threading.Thread(target=feed, daemon=True).start()
lx.spin_until(executor, stop)
"""


def test_an_exception_per_message_is_counted_each_and_logged_a_few_times_a_second():
    count = 200
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    done = subprocess.run([sys.executable, '-c', RAISING_NODE, str(count)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    err = done.stderr
    assert done.returncode == 0, err[-2000:]
    assert f'errors {count}' in err, err[-2000:]   # every one counted
    elapsed = float(err.split('elapsed ')[1].split()[0])
    allowed = math.ceil(elapsed) + 1   # once a second, per line, from the first one on
    fatal = err.count("Exception in 'subscriptions' callback")
    tracebacks = err.count('Error occurred at:')
    loom = err.count('a callback raised')
    assert 1 <= fatal <= allowed and 1 <= tracebacks <= allowed and 1 <= loom <= allowed, \
        (fatal, tracebacks, loom, elapsed)
