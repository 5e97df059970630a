"""How Loom processes spin: rclpy's EventsExecutor (Kilted, ~8x faster here), else the
SingleThreadedExecutor (Jazzy has no EventsExecutor).

Measured on rclpy 9.1.2: `EventsExecutor.spin()` neither fires timers nor returns on rclpy's own
SIGINT handling (it hangs in context cleanup), while `spin_until_future_complete` works. So Loom
processes install their own SIGINT/SIGTERM handlers that complete a future, and spin until it.
"""
from __future__ import annotations

import signal


def make_executor(context=None):
    try:
        from rclpy.experimental import EventsExecutor
    except ImportError:  # Jazzy and older
        from rclpy.executors import SingleThreadedExecutor
        return SingleThreadedExecutor(context=context)
    return EventsExecutor(context=context)


def spin_until(executor, future, poll_s: float = 0.5) -> None:
    """Spin until `future` is done, returning to Python every `poll_s` so signals are handled."""
    while not future.done():
        executor.spin_until_future_complete(future, timeout_sec=poll_s)


def run_node(node_factory, args=None) -> None:
    """The demos' main(): init, spin until Ctrl-C / SIGTERM / shutdown, then tear down cleanly."""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.signals import SignalHandlerOptions
    from rclpy.task import Future

    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = Future()

    def request_stop(signum, _frame):
        if not stop.done():
            stop.set_result(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    node = executor = None
    try:
        node = node_factory()
        executor = make_executor()
        executor.add_node(node)
        spin_until(executor, stop)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if executor is not None:
            executor.shutdown()
        if node is not None:
            finalize_node(node)
            node.destroy_node()
        rclpy.try_shutdown()


def finalize_node(node) -> None:
    """A lifecycle node goes through its shutdown transition on the way out (Ctrl-C, SIGTERM),
    so on_shutdown commits state and closes sessions and files; a plain node has nothing to do."""
    trigger = getattr(node, 'trigger_shutdown', None)
    if trigger is None:
        return
    try:
        trigger()
    except Exception as exc:  # already finalized, or a transition that is not allowed now
        node.get_logger().debug(f'no shutdown transition on exit: {exc}')


def run_lifecycle_node(node_factory, args=None) -> None:
    """run_node for a lifecycle node with an `autostart` parameter: standalone (`ros2 run`), it
    configures and activates itself when autostart is true; else a lifecycle manager does."""
    from rclpy.lifecycle import TransitionCallbackReturn

    def started():
        node = node_factory()
        if node.get_parameter('autostart').value:
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
        return node
    run_node(started, args)
