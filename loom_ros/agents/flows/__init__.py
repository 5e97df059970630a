"""The seed's two flows as agent behaviors: `face` (Flow 1, real-time face emotion) and `voice`
(Flow 2, hybrid voice assistant), plus what the agent node injects as their ports: service
clients on its own node (link.py) and the host's cloud link (cloud.py)."""
