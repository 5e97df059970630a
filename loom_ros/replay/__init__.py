"""Replaying `loom record` MCAP files: a bounded reader (mcap_source), a pure player with an
injected clock (player), the rclpy publisher behind `loom play` (ros), and the rows the learned
router trains on (router/train_recorded.py reads recordings through mcap_source)."""
