"""Loom: event-driven AI middleware for robots, as a ROS 2 package (the thin ROS shell over pure cores)."""
