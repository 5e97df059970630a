"""Security: capability grants and runtime checks for plugins, and the audit log."""
