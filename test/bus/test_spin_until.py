"""`spin_until(..., once=True)` (bus/executor.py) leaves nothing on the future it waits for.

Bring-up's readiness watcher spins rclpy's SingleThreadedExecutor until bring-up stops, returning
every poll. rclpy 9.1.2's `spin_until_future_complete` adds a done-callback to the future at each
call, kept until the future is done: two a second for as long as a robot runs. Real rclpy."""
import threading

from rclpy.executors import SingleThreadedExecutor
from rclpy.task import Future

from loom_ros.bus.executor import spin_until

TURNS = 20


class Counting(SingleThreadedExecutor):
    """rclpy's executor, counting the turns spin_until takes."""

    def __init__(self, context):
        super().__init__(context=context)
        self.turns = 0

    def spin_once(self, timeout_sec=None):
        self.turns += 1
        super().spin_once(timeout_sec=timeout_sec)

    def spin_until_future_complete(self, future, timeout_sec=None):
        self.turns += 1
        super().spin_until_future_complete(future, timeout_sec=timeout_sec)


def _callbacks_after_turns(ros, once: bool) -> int:
    executor = Counting(ros.node.context)
    stop = Future()
    thread = threading.Thread(target=spin_until, args=(executor, stop),
                              kwargs={'poll_s': 0.01, 'once': once}, daemon=True)
    thread.start()
    try:
        ros.wait_for(lambda: executor.turns >= TURNS, f'{TURNS} turns of the executor')
        return len(stop._callbacks)   # rclpy keeps them here until the future is done
    finally:
        stop.set_result(True)
        thread.join(5.0)
        assert not thread.is_alive(), 'spin_until did not return once its future was done'
        executor.shutdown()


def test_spin_once_turns_leave_no_callbacks_on_the_future(ros):
    assert _callbacks_after_turns(ros, once=True) == 0


def test_spin_until_future_complete_turns_pile_callbacks_up(ros):
    """Why `once` exists: without it, rclpy's executor adds one a turn."""
    assert _callbacks_after_turns(ros, once=False) >= TURNS - 1
