"""Actuator plugins: robot control (geometry_msgs/Twist on cmd_vel, with limits, watchdog and
e-stop) and the UI (state JSON plus rviz markers). Every command is capability-checked and
audited."""
