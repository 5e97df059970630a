"""The cloud inference tier: a server answering Zenoh queries, and the robot-side client."""
