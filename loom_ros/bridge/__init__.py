"""Zenoh bridge: Loom topics between a robot's ROS 2 bus and a fleet's Zenoh network."""
