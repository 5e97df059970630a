"""Bring-up: the node table, the lifecycle manager for every Loom lifecycle node, and the one
way Loom starts and stops processes."""
