"""Plugins: feature extractors, model backends, tools and actuators behind one contract."""
