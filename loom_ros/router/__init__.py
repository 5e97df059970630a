"""The model router: per event, where inference runs (local, cloud, hybrid, local fallback), and why."""
