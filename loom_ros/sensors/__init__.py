"""Simulated sensors, so Loom runs end to end on a laptop with no robot attached."""
