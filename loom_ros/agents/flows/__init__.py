"""The seed's two flows as agent behaviors: `face` (Flow 1, real-time face emotion) and `voice`
(Flow 2, hybrid voice assistant), plus the link they share to the router and the plugins."""
