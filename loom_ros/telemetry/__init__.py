"""Telemetry: OpenTelemetry tracing carried inside events, metrics with real percentiles,
/diagnostics, structured JSON logs with masking, and the `loom status` live view."""
