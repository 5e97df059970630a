"""Storage node: runs the data lifecycle of every unit database under `storage.root` on a timer
(in a worker thread, one small move at a time, so the service stays responsive), publishes
StorageStats on storage/stats, budget checks on /diagnostics (WARN 80 %, ERROR 95 %, with the
numbers), and answers loom_msgs/StorageQuery on storage/query (episodes by time, memories by
meaning). A lifecycle node: configure opens the databases and the embedder, activate starts the
moves, deactivate pauses them, cleanup closes everything."""
from __future__ import annotations

import json
import os
import threading

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from loom_ros.bus import topics
from loom_ros.bus.executor import ReleasingLifecycleNode, run_lifecycle_node
from loom_ros.bus.qos import to_qos_profile
from loom_ros.config.params import ConfigError, ParamSpec, declare_parameters
from loom_ros.storage.service import StorageService, default_params, settings_from_params
from loom_ros.storage.errors import StorageError
from loom_ros.telemetry.node_telemetry import attach_telemetry
from loom_ros.telemetry.logs import mask_node_logger

STATS_TOPIC = topics.STORAGE_STATS
QUERY_SERVICE = topics.STORAGE_QUERY
MAX_RESULTS = 1000
MAX_QUERY_CHARS = 2000


class StorageNode(ReleasingLifecycleNode, LifecycleNode):

    def __init__(self, **kwargs):
        super().__init__('storage', **kwargs)
        mask_node_logger(self)
        from rcl_interfaces.msg import ParameterDescriptor
        self.params = {name: self.declare_parameter(
            name, value, ParameterDescriptor(description='see config/loom.yaml /**/storage and docs/storage.md',
                                             read_only=True)).value
            for name, value in default_params().items()}
        self.params.update(declare_parameters(self, 'storage', [ParamSpec(
            'autostart', 'Configure and activate on start when run standalone', read_only=True)]))
        self.service: StorageService | None = None
        self.configure_error = ''
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._worker = None
        self._active = False
        self._srv = None
        self.rejected = 0
        self.telemetry = attach_telemetry(self, 'storage')
        self.telemetry.add_check('storage budget', self._budget_check)

    # -- lifecycle ------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        from loom_msgs.msg import StorageStats
        from loom_msgs.srv import StorageQuery
        self.configure_error = ''
        try:
            settings = settings_from_params(self.params, os.environ)
            self.service = StorageService(settings)
        except (StorageError, ConfigError, OSError) as exc:
            self.configure_error = str(exc)
            self.get_logger().error(f'cannot configure: {exc}')
            return TransitionCallbackReturn.FAILURE
        self.stats_pub = self.create_lifecycle_publisher(StorageStats, STATS_TOPIC,
                                                         to_qos_profile('batched'))
        self._srv = self.create_service(StorageQuery, QUERY_SERVICE, self._on_query)
        self._stats_timer = self.create_timer(float(self.params['storage.stats_period_s']),
                                              self._publish_stats)
        self.get_logger().info(f'configured: root {settings.layout.root}, '
                               f'{len(self.service.units())} databases')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = True
        self._stop.clear()
        self._worker = threading.Thread(target=self._run_moves, name='storage-moves', daemon=True)
        self._worker.start()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._halt()
        return super().on_deactivate(state)

    def _halt(self) -> None:
        self._active = False
        self._stop.set()
        if self._worker is not None:
            self._worker.join(60)
            self._worker = None

    def _release(self) -> None:
        self._halt()
        if self._srv is not None:
            self.destroy_service(self._srv)
            self.destroy_timer(self._stats_timer)
            self.destroy_lifecycle_publisher(self.stats_pub)
            self._srv = None
        if self.service is not None:
            with self._lock:
                self.service.close()
            self.service = None

    # -- moves ----------------------------------------------------------------------------------
    def _run_moves(self) -> None:
        period = float(self.params['storage.move_period_s'])
        while not self._stop.wait(period if self.service and self.service.rounds else 0.0):
            try:
                self.service.run_round(self._lock, self._stop)
            except Exception as exc:   # noqa: BLE001 - one bad round never stops the node
                self.get_logger().error(f'lifecycle round failed: {exc}')

    # -- stats ----------------------------------------------------------------------------------
    def _publish_stats(self) -> None:
        from loom_msgs.msg import StorageStats, StorageTier
        if self.service is None:
            return
        with self._lock:
            stats = self.service.stats()
        msg = StorageStats()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.root = str(self.service.settings.layout.root)
        for name, tier in stats['tiers'].items():
            msg.tiers.append(StorageTier(name=name, rows=int(tier['rows']), bytes=int(tier['bytes']),
                                         budget_bytes=int(tier.get('budget_bytes', 0)),
                                         oldest_ms=int(tier['oldest_ms'])))
        msg.total_bytes, msg.total_budget_bytes = int(stats['total_bytes']), int(
            stats['total_budget_bytes'])
        for key in ('condensed', 'memories', 'archived', 'deleted', 'archive_deleted',
                    'budget_deleted', 'rounds'):
            setattr(msg, key, int(stats[key]))
        msg.error = stats['error'][:1000]
        self.stats_pub.publish(msg)

    def _budget_check(self):
        from loom_ros.telemetry.diagnostics import WARN, CheckResult
        if self.service is None:
            return CheckResult(WARN, 'storage not configured')
        with self._lock:
            return self.service.worst_check()

    # -- query ----------------------------------------------------------------------------------
    def _on_query(self, request, response):
        if not self._active or self.service is None:
            response.ok, response.error = False, 'storage node is not active'
            return response
        if len(request.query) > MAX_QUERY_CHARS:
            self.rejected += 1
            response.ok, response.error = False, f'query longer than {MAX_QUERY_CHARS} characters'
            return response
        try:
            with self._lock:
                found = self.service.query(
                    request.kind, unit=request.unit, agent_id=request.agent_id, type=request.type,
                    source=request.source, text=request.query, start_ms=request.start_ms,
                    end_ms=request.end_ms or 2**63 - 1,
                    limit=min(max(1, request.limit or 100), MAX_RESULTS))
        except (StorageError, ValueError) as exc:
            self.rejected += 1
            response.ok, response.error = False, str(exc)[:1000]
            return response
        response.ok = True
        response.results = [json.dumps(item, separators=(',', ':'))[:65536] for item in found]
        return response


def main(args=None) -> int:
    return run_lifecycle_node(StorageNode, args)


if __name__ == '__main__':
    import sys
    sys.exit(main())
