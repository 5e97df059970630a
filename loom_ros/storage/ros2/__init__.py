"""The storage layer's ROS shell: the lifecycle node (moves on a timer, stats, Query service)."""
