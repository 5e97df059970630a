"""An event's effective privacy: the strictest of its privacy field and any privacy its metadata
states. Both the agents' runtime (what a derived event inherits) and the bridge's gate (what may
leave the robot) decide from this, so neither field can be used to lower the other. Pure Python.
"""
from __future__ import annotations

from loom_ros.bus.event import Event, Privacy

PRIVACY_METADATA_KEYS = ('privacy', 'loom.privacy')   # where a producer may also state it
MAX_STATED_CHARS = 32   # longer is not a tier name: bounded before it is parsed
_NAMES = {p.name.lower().replace('_', ''): p for p in Privacy}


def stated_privacy(value: object) -> Privacy:
    """A tier named in metadata ('private', 'LocalOnly', 'local_only', '2', ...); anything
    unreadable is LocalOnly (never guess: it stays home)."""
    text = str(value)
    if len(text) > MAX_STATED_CHARS:
        return Privacy.LOCAL_ONLY
    key = text.strip().lower().replace('_', '').replace('-', '')
    if key in _NAMES:
        return _NAMES[key]
    if key.isdigit() and int(key) in Privacy._value2member_map_:
        return Privacy(int(key))
    return Privacy.LOCAL_ONLY


def effective_privacy(event: Event) -> Privacy:
    """The strictest of the field and the metadata; an unknown field value is LocalOnly."""
    try:
        tier = Privacy(event.privacy)
    except ValueError:
        return Privacy.LOCAL_ONLY
    metadata = event.metadata if isinstance(event.metadata, dict) else {}
    for key in PRIVACY_METADATA_KEYS:
        if key in metadata:
            tier = max(tier, stated_privacy(metadata[key]))
    return tier
