"""An event's effective privacy: the strictest of its privacy field and any privacy its metadata
states. Both the agents' runtime (what a derived event inherits) and the bridge's gate (what may
leave the robot) decide from this, so neither field can be used to lower the other. Also the
vocabulary of data subjects and consent every layer shares: the metadata key that names whom an
event is about (and its validation), the purposes consent is given for, and a consent answer.
Pure Python.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from enum import Enum

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


# -- data subjects and consent ------------------------------------------------------------------
# An event about a person names them in this metadata key (set by perception, an app, or a face
# or speaker identifier); anonymous events have none. Consent, erasure and export go by it.
SUBJECT_METADATA_KEY = 'loom.subject'
MAX_SUBJECT_CHARS = 128   # bounded before it is matched
# ASCII letters and digits first, then also _ . : @ + - (an email, 'face:1234'); no spaces,
# separators, control characters or look-alike letters from other scripts, no '..'.
_SUBJECT = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.:@+\-]{0,127}\Z')


class SubjectError(ValueError):
    """A subject id that is not usable (type, length or characters); says which rule failed."""


def check_subject(value: object) -> str:
    """`value` as a subject id, or SubjectError saying which rule failed and where, never the
    value (an invalid id is often a person's name, and these errors reach logs and health)."""
    if not isinstance(value, str):
        raise SubjectError(f'a data subject must be a string, got {type(value).__name__}')
    if not value or len(value) > MAX_SUBJECT_CHARS:
        raise SubjectError(f'a data subject has 1-{MAX_SUBJECT_CHARS} characters, got '
                           f'{len(value)}')
    if not _SUBJECT.match(value) or '..' in value:
        where = next((i for i, c in enumerate(value)
                      if not (c.isascii() and (c.isalnum() or (i and c in '_.:@+-')))),
                     value.find('..'))
        raise SubjectError(f'a data subject of {len(value)} characters, the one at {where + 1} '
                           'refused: use ASCII letters, digits and _ . : @ + - (starting with a '
                           'letter or digit, no "..")')
    return value


def event_subject(event: Event) -> str:
    """The data subject an event names ('' when anonymous); SubjectError when the metadata
    names one that is not a valid id (whoever enforces consent then treats it as unconsented)."""
    metadata = event.metadata if isinstance(event.metadata, dict) else {}
    if SUBJECT_METADATA_KEY not in metadata:
        return ''
    return check_subject(metadata[SUBJECT_METADATA_KEY])


SOMEONE = '..'   # a subject named but not by a valid id: someone, no consent for anything


def named_subject(event: Event) -> str:
    """The data subject as the event names it, unchecked, to carry onto what is derived from it
    (whoever enforces consent judges it: an invalid id stays local). '' only when it names none:
    a present but empty id is no more anonymous than a malformed one (event_subject refuses
    both), so it goes on as SOMEONE, which no check accepts. Bounded, as a metadata value is."""
    metadata = event.metadata if isinstance(event.metadata, dict) else {}
    if SUBJECT_METADATA_KEY not in metadata:
        return ''
    return str(metadata[SUBJECT_METADATA_KEY])[:1024] or SOMEONE


def subject_or_someone(event: Event) -> str:
    """The data subject `event` names: '' anonymous, its id, or SOMEONE for a present but
    invalid (or empty) one, which no consent check accepts."""
    try:
        return event_subject(event)
    except SubjectError:
        return SOMEONE


# A JSON object derived from events (the ui plugin's screen state) says whose data each of its
# fields holds under this key ({field: subject}), so the recorder asks their consent and erasure
# and export find those fields, as they do with an event's `loom.subject`.
SUBJECTS_JSON_KEY = 'loom.subjects'
STRIPPED_JSON_KEY = 'loom.stripped'   # {field: why} of the fields taken out
MAX_SUBJECTS_JSON_CHARS = 256 * 1024   # longer text is not parsed for it
MAX_SUBJECTS_PER_JSON = 32   # more distinct subjects: every field someone's (each costs a lookup)


def json_subject_fields(text: str) -> tuple[dict, dict[str, str]] | None:
    """(the object, {field: subject}) of a JSON object that says whose its fields are (subjects
    not valid ids as SOMEONE; a SUBJECTS_JSON_KEY that is not such a map makes every field
    SOMEONE's), or None when the text is not one (no key, not JSON, too long or too deep)."""
    if not isinstance(text, str) or f'"{SUBJECTS_JSON_KEY}"' not in text or \
            len(text) > MAX_SUBJECTS_JSON_CHARS:
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or SUBJECTS_JSON_KEY not in data:
        return None
    listed = data[SUBJECTS_JSON_KEY]
    if not isinstance(listed, dict):
        listed = {field: SOMEONE for field in data}
    owners = {}
    for field, value in listed.items():
        if field in data and field not in (SUBJECTS_JSON_KEY, STRIPPED_JSON_KEY):
            try:
                owners[field] = check_subject(value)
            except SubjectError:
                owners[field] = SOMEONE
    if len(set(owners.values())) > MAX_SUBJECTS_PER_JSON:
        owners = {field: SOMEONE for field in owners}
    return data, owners


def json_split(data: dict, owners: dict[str, str], subjects, why: str) -> tuple[dict, dict]:
    """(the object without the fields of `subjects`, each marked in STRIPPED_JSON_KEY with
    `why`; an object of only those fields, with whose they are)."""
    gone = {field: who for field, who in owners.items() if who in subjects}
    kept = {k: v for k, v in data.items() if k not in gone and k != SUBJECTS_JSON_KEY}
    left = {field: who for field, who in owners.items() if field not in gone}
    if left:
        kept[SUBJECTS_JSON_KEY] = left
    if gone:
        stripped = kept.get(STRIPPED_JSON_KEY)
        kept[STRIPPED_JSON_KEY] = {**(stripped if isinstance(stripped, dict) else {}),
                                   **{field: why for field in gone}}
    theirs = {field: data[field] for field in gone}
    if gone:
        theirs[SUBJECTS_JSON_KEY] = gone
    return kept, theirs


class Purpose(str, Enum):
    """What a subject's data may be used for; consent is per subject and purpose."""

    STORE = 'store'            # raw payloads kept in storage (else counts only)
    CLOUD = 'cloud'            # cloud inference (else routed as LocalOnly)
    RECORDING = 'recording'    # payloads in MCAP recordings
    FLEET = 'fleet'            # forwarded to other robots by the bridge
    LEARNING = 'learning'      # training rows of the learned router


@dataclass(frozen=True)
class ConsentState:
    """One subject's consent for one purpose, as a consent lookup answers it."""

    purpose: str
    granted: bool
    asked: bool = False        # False: the configured default for subjects never asked
    source: str = ''           # who or what recorded the change (cli, app, ...)
    changed_ms: int = 0

    def describe(self) -> str:
        """In words, without the subject's id (this text is logged and published)."""
        word = 'granted' if self.granted else 'not granted'
        if not self.asked:
            return f'{self.purpose} consent {word} (default for subjects never asked)'
        when = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.changed_ms / 1000))
        state = 'granted' if self.granted else 'withdrawn'
        return f'{self.purpose} consent {state} at {when} by {self.source or "?"}'



def audit_withholds(event: Event) -> str:
    """Why an append-only audit record must not keep what `event` carries ('' when it may: the
    event is Public and names no data subject). The audit log cannot be erased, so it keeps
    nothing `forget` would have to take back."""
    try:
        subject = event_subject(event)
    except SubjectError:
        subject = 'invalid'
    if subject:
        return 'the event names a data subject'
    tier = effective_privacy(event)
    return f'the event is {tier.name.lower()}' if tier > Privacy.PUBLIC else ''


def audit_excerpt(event: Event, text: str, limit: int = 512) -> str:
    """`text` from `event` as an audit record may keep it: bounded, or only its size."""
    why = audit_withholds(event)
    if why:
        return f'<{len(text)} characters withheld: {why}>'
    return text if len(text) <= limit else text[:limit] + '...'
