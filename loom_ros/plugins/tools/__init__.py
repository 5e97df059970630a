"""Tool plugins: calendar, memory search, read-only database query, weather. Each answers one
query event type (`tool.<tool>.query`, a JSON object) with one result event
(`tool.<tool>.result`); bad queries come back as failures that say what is wrong.

What they share lives here: reading the JSON query and building the result event.
"""
from __future__ import annotations

import json
from loom_ros.bus.event import Event


class ToolInputError(ValueError):
    """A query a tool cannot answer: wrong event type, not JSON, a missing or bad field."""


def read_query(event: Event, expected_type: str) -> dict:
    """The query object of `event`; ToolInputError when it is not an `expected_type` JSON object."""
    if event.type != expected_type:
        raise ToolInputError(f'expected a {expected_type!r} event, got {event.type!r}')
    try:
        query = json.loads(bytes(event.payload) or b'{}')
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ToolInputError(f'{expected_type} payload is not JSON: {exc}') from None
    if not isinstance(query, dict):
        raise ToolInputError(f'{expected_type} payload must be a JSON object, got '
                             f'{type(query).__name__}')
    return query


def result_event(result_type: str, data: object, source: str) -> Event:
    return Event.with_json(result_type, data, source=source)
