"""Perception feature extractors: face detection (BlazeFace), facial expression (fer's model),
sentence embedding (MiniLM), the camera frame formats, and their plugins."""
