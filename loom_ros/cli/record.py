"""`loom record`: ROS 2 topics into an MCAP file that rosbag2 (`ros2 bag info/play`) and Foxglove
read, without rosbag2 (not installable from PyPI wheels).

Messages are stored as they arrive on the wire (CDR, no deserialization), one channel per topic,
with `ros2msg` schemas: the type's .msg definition followed by every nested type's, separated the
way rosbag2 writes them, found through the ament index. Topics are subscribed once they have a
publisher in the graph (reliable when every publisher then is, as rosbag2 does, else best
effort, which matches every publisher; a best-effort publisher appearing later on a topic
recorded reliably is not matched), until SIGINT / SIGTERM or `--duration`; then what has already
reached its readers is written before the file is closed (`drain`, at most 2 s). A JSON line
`{"first_message": topic}` says when each topic's first message is written; the summary
(messages per topic) is one JSON line at the end.

Secrets are masked before anything is written (telemetry's rules, `mask_text`/`mask_value`):
on loom_msgs Event and EventBatch messages the id, type, source, tags, every metadata value
(wholly when its key names a secret) and a UTF-8 text payload; on std_msgs String the data.
Those messages are deserialized, masked and serialized again; other types (images, IMU...) are
stored as they arrived. An event payload is text only when it decodes as UTF-8 and the event
does not name a media encoding (metadata `encoding` rgb8, s16le...: camera frames and mic audio
are kept byte for byte, as a replay needs them). A text payload longer than MAX_MASKED_PAYLOAD is
cut to it (counted in the summary's `cut`); a message that cannot be decoded is not stored
(counted in `unreadable`).

What a replay needs is recorded by default (DEFAULT_TOPICS): camera frames as `camera.front`
events, mic audio (`mic.primary`), route decisions and their outcomes (router/decisions,
router/outcomes), besides what the UI and the agents said. Each channel notes its publisher's
durability (metadata `loom.durability`), so `loom play` offers the same.

Privacy: every event passes the recorder's `privacy` hook (event -> KEEP, STRIP or NO_CONSENT)
before it is written; anything but KEEP empties its payload and marks it (metadata
`loom.stripped`: `privacy`, or `consent`), counted in `stripped` (and `stripped_consent`), and a
hook that raises strips (fails closed). `loom record` uses `consent_hook`: the payload of an
event naming a data subject (`loom.subject`) without `recording` consent in the storage root's
consent registry (storage/consent.py, read-only; a change holds from the next event) is left out,
its metadata kept; anonymous events keep every tier, Private and LocalOnly included, because
this recorder writes to the robot's own disk. A JSON text that says whose its fields are
(`loom.subjects`: the ui plugin's screen state) keeps a subject's fields only as an event naming
that subject would keep its payload; the others are taken out and named in `loom.stripped`.

Matching: DDS matches the recorder's reader with each publisher in its own time (a long-lived
participant with many endpoints can take seconds), and best-effort messages sent before are not
the recorder's. A JSON line `{"matched": topic, "publishers": n}` says when a reader's match
count changes; `lost` in the summary counts what DDS reported lost per topic.

Where: by default a new file `<root>/recordings/<UTC time>.mcap`, where `loom forget` finds and
rewrites recordings (it looks under `<root>/recordings` and at `<root>/*.mcap`); an `--output`
elsewhere is written but a warning says that `loom forget` will not reach it. The output is
opened without following a link and never blocking on a FIFO: a link, FIFO, folder or a file with
other names (hard links) at the path is refused with nothing written (exit 2).

Partial file: while recording, the file is `<name>.partial.mcap` beside the output (created
without following a link, locked while written; readable up to its last chunk, as a long
recording's users read it); only a clean finish (stop, --duration) renames it to the output's
name, so a file under that name is always whole. A crash (SIGKILL, power cut) leaves the partial
file: every record is written whole in one write, so it ends after its last whole chunk, without
its summary. Every reader reads it to that end (the reader's UnfinishedError): `loom play`
plays it and says so (exit 1, as for any file without its end), `loom view` draws it (exit 0,
`unfinished` said), `loom forget` and `loom export` take it as whole (forget rewrites it under
its name like any recording: it is a .mcap where forget looks), and forget leaves a partial file
alone while a running recorder holds its lock. The default output must be new and never replaces a file appearing at its name meanwhile;
an explicit --output replaces a plain file there, as it did, and a partial file left beside it.

Size: a message longer than the replay reader takes (mcap_source's Limits.max_message_bytes) is
not stored, counted in `too_large`, so every recording written replays whole.

`--store`: once the file is finished it moves into the root's object store (storage.objects:
<root>/objects, or S3) as the blob `blobs/recordings/<name>` (storage/blobs.py), where `loom
forget` rewrites it and `loom export` reads it; a JSON line `{"stored": key}` says so.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from loom_ros.bringup.stop_signals import on_stop_signal
from loom_ros.bus import topics
from loom_ros.bus.executor import new_log_throttle, spin_once_counted
from loom_ros.bus.names import to_ros_topic
from loom_ros.bus.privacy import (SUBJECT_METADATA_KEY, SUBJECTS_JSON_KEY, Purpose,
                                  check_subject, json_split, json_subject_fields)
from loom_ros.bus.qos import fastdds_environment
from loom_ros.config.params import config_dir
from loom_ros.replay.mcap_source import Limits
from loom_ros.storage import erasure
from loom_ros.storage.layout import DEFAULT_ROOT, StorageLayout
from loom_ros.telemetry.logs import MASK, mask_node_logger, mask_text, mask_value, secret_name

MIC_PRIMARY = 'mic.primary'   # raw microphone audio (sim_sensors' MIC_TOPIC; not in topics.py)

# What the UI and agents said, and what a replay needs (inputs, decisions and their outcomes).
# Camera frames are opt-in (--camera): about 8 MB/s raw at 10 Hz, 146 MB for a 30 s demo, and
# compressing them took CPU from the face flow it records.
CAMERA_TOPICS = [to_ros_topic(topics.CAMERA_FRONT)]
# Not loom/ui/markers: rviz's copy of the screen's words, with no list of whose they are (the
# state has one, so consent, erasure and export hold for it); `--topics` can still add it.
DEFAULT_TOPICS = [
    'loom/ui/state', topics.ROUTER_DECISIONS, topics.ROUTER_OUTCOMES,
    to_ros_topic(MIC_PRIMARY),
    to_ros_topic(topics.agent_action('face')), to_ros_topic(topics.agent_action('voice')),
    to_ros_topic(topics.agent_intent('voice')), to_ros_topic(topics.MIC_PRIMARY_SPEECH),
    'imu/data', topics.AGENTS_STATUS,
]
PRIMITIVES = {'bool', 'byte', 'char', 'float32', 'float64', 'int8', 'uint8', 'int16', 'uint16',
              'int32', 'uint32', 'int64', 'uint64', 'string', 'wstring', 'time', 'duration'}
SEPARATOR = '=' * 80 + '\n'
MAX_MASKED_PAYLOAD = 64 * 1024   # characters of a text payload masked and kept; the rest is cut
MAX_FIELD_CHARS = 4096           # of any other string field
MASKED_TYPES = ('loom_msgs/msg/Event', 'loom_msgs/msg/EventBatch', 'std_msgs/msg/String')
# Metadata `encoding` values of raw media payloads (perception/image.py, sim_sensors' mic).
MEDIA_ENCODINGS = frozenset({'rgb8', 'bgr8', 'mono8', 'rgba8', 'bgra8', 'mono16', 'jpeg', 'png',
                             's16le', 's16be', 'f32le', 'u8', 'pcm', 'opus', 'wav'})
KEEP, STRIP, NO_CONSENT = 'keep', 'strip', 'no_consent'
STRIP_REASONS = ('consent', 'privacy', 'erased')   # the only words a loom.stripped map keeps
CUT_SLACK = 1024        # read past a cut, so mask_text steps back to a space (no half secret)
MAX_JSON_DEPTH = 16     # of a ui state masked as JSON; deeper is not kept
STRIPPED_KEY = 'loom.stripped'   # value: why ('privacy', or 'consent' for NO_CONSENT)
DURABILITY_KEY = 'loom.durability'
# What the recorder does with one event before it is written: KEEP or STRIP (see the module doc).
PrivacyHook = Callable[[object], str]
# The largest message the replay reader (loom play, view, router train) takes: a longer one in the
# file would be skipped there, or stop the reading, so it is never written.
MAX_MESSAGE_BYTES = Limits().max_message_bytes
OUTPUT_MODE = 0o666     # a new recording's mode before the umask (what open(path, 'wb') gave)
RECORDING_SUFFIX = '.mcap'   # what `loom forget` looks for (storage/erasure.py recording_files)
PARTIAL_SUFFIX = '.partial' + RECORDING_SUFFIX   # the file being recorded: still found by forget
STAMP_FORMAT = '%Y%m%dT%H%M%S.%fZ'   # a default recording's name: its UTC start, microseconds


def keep_every_tier(event) -> str:
    """The default hook: this recorder writes to the robot's own disk, so Private and LocalOnly
    payloads may be kept (they never leave the robot through it)."""
    return KEEP


def consent_hook(lookup, inner: PrivacyHook = keep_every_tier) -> PrivacyHook:
    """A privacy hook that asks the consent registry's `lookup(subject, purpose)`: an event naming
    a data subject (every `loom.subject` entry it has) without `recording` consent is NO_CONSENT;
    an invalid subject id or a registry that cannot answer is too (fail closed). Anonymous
    events, and subjects with consent, go on to `inner`."""
    def hook(event) -> str:
        for kv in event.metadata:
            if kv.key != SUBJECT_METADATA_KEY:
                continue
            try:
                if not lookup(check_subject(kv.value), Purpose.RECORDING.value).granted:
                    return NO_CONSENT
            except Exception:   # noqa: BLE001 - SubjectError, StorageError...: not consented
                return NO_CONSENT
        return inner(event)
    return hook


class SchemaError(LookupError):
    """A message type whose .msg definition cannot be found."""


def _msg_file(full_type: str) -> Path:
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    pkg, _, name = full_type.partition('/msg/')
    try:
        path = Path(get_package_share_directory(pkg)) / 'msg' / f'{name}.msg'
    except PackageNotFoundError:
        raise SchemaError(f'package {pkg!r} of {full_type} is not in the ament index') from None
    if not path.is_file():
        raise SchemaError(f'no definition {path} for {full_type}')
    return path


def _nested(text: str, pkg: str) -> list[str]:
    """Non-primitive field types named in a .msg text, as pkg/msg/Type."""
    found = []
    for line in text.splitlines():
        line = line.split('#', 1)[0].strip()
        if not line:
            continue
        field_type, _, rest = line.partition(' ')
        if '=' in rest.split()[0] if rest.split() else False:
            continue   # a constant: TYPE NAME=value
        base = re.sub(r'\[.*\]$', '', field_type)
        base = re.sub(r'<=\d+$', '', base)
        if base in PRIMITIVES:
            continue
        if base == 'Header':
            found.append('std_msgs/msg/Header')
        elif '/' in base:
            p, _, t = base.rpartition('/')
            found.append(f'{p.split("/")[0]}/msg/{t}')
        else:
            found.append(f'{pkg}/msg/{base}')
    return found


def ros2msg_schema(full_type: str) -> str:
    """The ros2msg schema text of `pkg/msg/Type` (its definition, then each dependency once)."""
    text = _msg_file(full_type).read_text(encoding='utf-8')
    parts, seen = [text.rstrip('\n') + '\n'], {full_type}
    queue = _nested(text, full_type.split('/')[0])
    while queue:
        dep = queue.pop(0)
        if dep in seen:
            continue
        seen.add(dep)
        dep_text = _msg_file(dep).read_text(encoding='utf-8')
        parts.append(f'{SEPARATOR}MSG: {dep.replace("/msg/", "/")}\n{dep_text.rstrip(chr(10))}\n')
        queue.extend(_nested(dep_text, dep.split('/')[0]))
    return ''.join(parts)


class SecretMasker:
    """CDR in, CDR out, with the secrets of one message type masked and each event through the
    privacy hook (see the module doc)."""

    def __init__(self, full_type: str, privacy: PrivacyHook = keep_every_tier):
        from rclpy.serialization import deserialize_message, serialize_message
        self._decode, self._encode = deserialize_message, serialize_message
        self.msg_type = message_class(full_type)
        self.privacy = privacy
        self.cut = 0
        self.stripped = 0           # every stripped payload
        self.stripped_consent = 0   # of those, for a subject without recording consent

    def __call__(self, data: bytes) -> bytes:
        msg = self._decode(data, self.msg_type)
        if hasattr(msg, 'events'):
            for event in msg.events:
                self._event(event)
        elif hasattr(msg, 'payload'):
            self._event(msg)
        else:   # std_msgs/String
            msg.data = self._text(msg.data)
        return self._encode(msg)

    def _text(self, text: str) -> str:
        """A String's text, masked; a JSON state that says whose its fields are (the ui
        plugin's, SUBJECTS_JSON_KEY) keeps a subject's fields only when the privacy hook keeps
        an event naming that subject: the others are taken out and marked why. Such a state is
        masked as JSON (_mask_json: names and values, so it stays readable) with its map's ids
        as written (checked ids: a masked one could not be found by forget or export); one that
        says it has a map but is longer than MAX_MASKED_PAYLOAD or cannot be read is not kept."""
        if f'"{SUBJECTS_JSON_KEY}"' not in text:
            return _masked_cut(text, MAX_MASKED_PAYLOAD)
        read = json_subject_fields(text) if len(text) <= MAX_MASKED_PAYLOAD else None
        if read is None:
            self.stripped += 1
            return json.dumps({STRIPPED_KEY: 'unreadable'})
        data, owners = read
        refused = {}
        for who in set(owners.values()):
            try:
                verdict = self.privacy(_Named(who))
            except Exception:   # noqa: BLE001 - a failing hook strips (fails closed)
                verdict = STRIP
            if verdict != KEEP:
                refused[who] = verdict
        stripped = {}
        if refused:
            self.stripped += 1
            self.stripped_consent += NO_CONSENT in refused.values()
            consent = all(v == NO_CONSENT for v in refused.values())
            data, _theirs = json_split(data, owners, refused, 'consent' if consent else 'privacy')
            stripped = data.get(STRIPPED_KEY, {})
        # One pass over the fields: a value and its owner are kept under the same masked name.
        # Names that mask alike (two e-mails, two tokens) are all left out: kept, one subject's
        # value could be filed under another's id. The map is rebuilt, never copied; why a
        # field is gone is said only in this recorder's words.
        names: dict[str, list[str]] = {}
        for key in data:
            if key not in (SUBJECTS_JSON_KEY, STRIPPED_KEY):
                names.setdefault(mask_text(key), []).append(key)
        out, owned = {}, {}
        gone = {mask_text(f): why for f, why in stripped.items() if why in STRIP_REASONS}
        for name, keys in names.items():
            if len(keys) > 1:
                gone[name] = 'privacy'
                continue
            out[name] = _mask_json(data[keys[0]], keys[0])
            if keys[0] in owners:
                owned[name] = owners[keys[0]]
        if owned:
            out[SUBJECTS_JSON_KEY] = owned
        if gone:
            out[STRIPPED_KEY] = gone
        return json.dumps(out, ensure_ascii=False, separators=(',', ':'))

    def _event(self, event) -> None:
        try:
            verdict = self.privacy(event)
        except Exception:   # noqa: BLE001 - a failing hook strips (fails closed)
            verdict = STRIP
        if verdict != KEEP:
            self.stripped += 1
            self.stripped_consent += verdict == NO_CONSENT
            event.payload = b''
            event.metadata.append(_key_value(
                STRIPPED_KEY, 'consent' if verdict == NO_CONSENT else 'privacy'))
        for name in ('id', 'type', 'source'):
            setattr(event, name, mask_text(getattr(event, name)[:MAX_FIELD_CHARS]))
        event.tags = [mask_text(t[:MAX_FIELD_CHARS]) for t in event.tags]
        media = False
        for kv in event.metadata:
            if kv.key == 'encoding' and kv.value.strip().lower() in MEDIA_ENCODINGS:
                media = True
            if kv.key == SUBJECT_METADATA_KEY and _valid_subject(kv.value):
                continue   # a checked id, kept as it is: forget and export find events by it
            kv.value = str(mask_value(kv.value[:MAX_FIELD_CHARS], kv.key[:MAX_FIELD_CHARS]))
        if media:
            return   # a camera frame, audio: kept byte for byte (a replay needs them)
        try:
            text = bytes(event.payload).decode()
        except UnicodeDecodeError:
            return   # binary: no text to mask
        if len(text) > MAX_MASKED_PAYLOAD:
            self.cut += 1
        event.payload = _masked_cut(text, MAX_MASKED_PAYLOAD).encode()


_WORD_CHARS = frozenset('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+@:/=-')


def _masked_cut(text: str, limit: int) -> str:
    """`text` masked, at most `limit` characters of it kept: the masking sees CUT_SLACK past
    the cut (a secret across it is whole when masked), and the cut steps back over a word
    that runs into it (compact JSON has no spaces to step back to: no half e-mail is kept)."""
    if len(text) <= limit:
        return mask_text(text, limit)
    masked = mask_text(text[:limit + CUT_SLACK], limit + CUT_SLACK)[:limit]
    start = len(masked)   # back over the word the cut ran into, at most CUT_SLACK characters
    while start > 0 and len(masked) - start < CUT_SLACK and masked[start - 1] in _WORD_CHARS:
        start -= 1
    if start > 0 and len(masked) - start < CUT_SLACK:
        masked = masked[:start]
    return f'{masked}...[{len(text) - len(masked)} more chars not recorded]'


def _mask_json(value, name: str | None = None, depth: int = 0):
    """A JSON value masked as its text would have been, and still JSON: under a secret name
    (telemetry's secret_name) a value is hidden; names and strings go through mask_text."""
    if name is not None and secret_name(name) and value not in (None, ''):
        return MASK
    if depth > MAX_JSON_DEPTH:
        return '<nested too deep>'
    if isinstance(value, str):
        return mask_text(value, MAX_MASKED_PAYLOAD)
    if isinstance(value, dict):
        return {mask_text(str(k)): _mask_json(v, str(k), depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_json(v, None, depth + 1) for v in value]
    return value   # numbers, true, false, null


def _valid_subject(value: str) -> bool:
    try:
        check_subject(value)
    except ValueError:
        return False
    return True


class _Named:
    """What a privacy hook reads of an event (`metadata` key/value pairs, privacy Public) for
    the fields of a JSON state that are one subject's."""

    privacy = 0

    def __init__(self, subject: str):
        self.metadata = [_key_value(SUBJECT_METADATA_KEY, subject)]


def _key_value(key: str, value: str):
    from loom_msgs.msg import KeyValue
    return KeyValue(key=key, value=value)


class OutputError(OSError):
    """The output path is not one a recording may be written to (a link, a FIFO, a folder, a
    file with other names): nothing was written to it."""


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return 'a symbolic link'
    if stat.S_ISFIFO(mode):
        return 'a FIFO'
    if stat.S_ISDIR(mode):
        return 'a folder'
    if stat.S_ISSOCK(mode):
        return 'a socket'
    return 'a device or special file'


def partial_path(path: str | Path) -> Path:
    """Where the recording of `path` is written until it is finished (see the module doc):
    `run.mcap` -> `run.partial.mcap`, any other name gets the suffix whole."""
    path = Path(path)
    stem = path.name[:-len(RECORDING_SUFFIX)] if path.name.endswith(RECORDING_SUFFIX) and \
        path.name != RECORDING_SUFFIX else path.name
    return path.with_name(stem + PARTIAL_SUFFIX)


def check_output(path: str | Path, exclusive: bool = False) -> None:
    """What may be at the output's name, which is only renamed onto at the end: nothing, or
    (not `exclusive`) a plain file with no other name. OutputError says why not."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise OutputError(f'{path}: {_kind(info.st_mode)} is there, not a plain file; refused, '
                          'nothing written')
    if exclusive:
        raise OutputError(f'{path}: a file already is there; refused, nothing written')
    if info.st_nlink > 1:
        raise OutputError(f'{path}: the file has {info.st_nlink - 1} other name(s) (hard '
                          'links); refused, nothing written')


class WholeWrites:
    """The recording's file for mcap's Writer, unbuffered: each write (a whole record, a chunk
    with its indexes) goes to the file in one system call, so a recorder killed at any moment
    leaves whole records only (a buffered stream had flushed records in 8 KB pieces)."""

    def __init__(self, fd: int):
        self.fd, self._pos = fd, os.lseek(fd, 0, os.SEEK_CUR)

    def write(self, data) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def open_output(path: str | Path, exclusive: bool = False) -> WholeWrites:
    """The recording's file, open for writing and locked (flock, until it is closed: `loom
    forget` leaves a locked partial file alone). A planted link made `open(path, 'wb')`
    overwrite the file it pointed at, and a FIFO blocked it: the name is opened without
    following a link (O_NOFOLLOW) or blocking (O_NONBLOCK), and the open file itself is checked
    (a regular file with no other name, not locked by another process) before it is emptied,
    so nothing else is ever truncated. `exclusive`: the file must be new. OutputError says why
    a path is refused."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f'{path}: {_kind(mode)} is there, not a plain file; refused, nothing '
                          'written')
    flags = (os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC |
             (os.O_EXCL if exclusive else 0))
    try:
        fd = os.open(path, flags, OUTPUT_MODE)
    except OSError as exc:   # swapped in after the check: a link (ELOOP), a FIFO (ENXIO)
        why = {errno.ELOOP: 'a symbolic link', errno.ENXIO: 'a FIFO',
               errno.EEXIST: 'a file already'}.get(exc.errno)
        if why:
            raise OutputError(f'{path}: {why} is there; refused, nothing written') from None
        raise OutputError(f'{path}: cannot write: {exc.strerror or exc}') from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OutputError(f'{path}: {_kind(info.st_mode)} is there, not a plain file; '
                              'refused, nothing written')
        if info.st_nlink > 1:
            raise OutputError(f'{path}: the file has {info.st_nlink - 1} other name(s) (hard '
                              'links); refused, nothing written')
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f'{path}: in use by another process (a running loom record or '
                              'loom forget); refused, nothing written') from None
        os.ftruncate(fd, 0)
        return WholeWrites(fd)
    except BaseException:
        os.close(fd)
        raise


class McapRecorder:
    """Writes CDR messages to an MCAP file, secrets masked and events through `privacy` first
    (SecretMasker); thread-safe (callbacks from an executor)."""

    def __init__(self, path: str | Path, privacy: PrivacyHook = keep_every_tier,
                 on_first: Callable[[str], None] | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, exclusive: bool = False):
        """`on_first(topic)`: called once per topic, after its first message is written.
        `max_message_bytes`: longer messages are not written (`too_large`); the replay
        reader's limit, so everything written replays. `exclusive`: the file must be new.
        Written to `partial` until close() renames it to `path` (the module doc). OutputError
        when `path` may not be written (check_output, open_output)."""
        from mcap.writer import CompressionType, Writer
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self.partial = str(partial_path(path))
        self.exclusive = exclusive
        self.max_message_bytes = max_message_bytes
        check_output(path, exclusive)
        self._stream = open_output(self.partial, exclusive)
        self._writer = Writer(self._stream, compression=CompressionType.ZSTD)
        self._writer.start(profile='ros2', library='loom record')
        self._lock = threading.Lock()
        self._channels: dict[str, int] = {}
        self._maskers: dict[str, SecretMasker] = {}
        self.counts: dict[str, int] = {}
        self.unreadable: dict[str, int] = {}
        self.too_large: dict[str, int] = {}   # per topic: longer than max_message_bytes
        self.privacy = privacy
        self.on_first = on_first
        self._closed = False

    def add_topic(self, topic: str, full_type: str, metadata: dict[str, str] | None = None
                  ) -> None:
        """`metadata`: the channel's, e.g. {DURABILITY_KEY: 'transient_local'}."""
        with self._lock:
            if topic in self._channels:
                return
            schema = self._writer.register_schema(name=full_type, encoding='ros2msg',
                                                  data=ros2msg_schema(full_type).encode())
            if full_type in MASKED_TYPES:
                self._maskers[topic] = SecretMasker(full_type, self.privacy)
            self._channels[topic] = self._writer.register_channel(
                topic=topic, message_encoding='cdr', schema_id=schema,
                metadata=dict(metadata or {}))
            self.counts[topic] = 0

    def write(self, topic: str, data: bytes, stamp_ns: int | None = None) -> None:
        now = stamp_ns or time.time_ns()
        masker = self._maskers.get(topic)
        if masker is not None:
            try:
                data = masker(bytes(data))
            except Exception:   # not decodable as its type: not stored, counted
                with self._lock:
                    self.unreadable[topic] = self.unreadable.get(topic, 0) + 1
                return
        with self._lock:
            if self._closed:
                return
            if len(data) > self.max_message_bytes:   # the reader would refuse it: not stored
                self.too_large[topic] = self.too_large.get(topic, 0) + 1
                return
            self._writer.add_message(channel_id=self._channels[topic], log_time=now, data=data,
                                     publish_time=now, sequence=self.counts[topic])
            self.counts[topic] += 1
            first = self.counts[topic] == 1
        if first and self.on_first is not None:
            self.on_first(topic)

    def cut(self) -> int:
        """Text payloads cut to MAX_MASKED_PAYLOAD so far."""
        return sum(m.cut for m in self._maskers.values())

    def stripped(self) -> int:
        """Events whose payload the privacy hook stripped so far."""
        return sum(m.stripped for m in self._maskers.values())

    def stripped_consent(self) -> int:
        """Of those, payloads of subjects without recording consent."""
        return sum(m.stripped_consent for m in self._maskers.values())

    def close(self) -> None:
        """Finish the file and rename it to `path`. OutputError (the file kept, finished, as
        `partial`) when it cannot take that name: a file appeared at the default output, a
        folder there, or the partial file was replaced meanwhile."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._writer.finish()
                os.fsync(self._stream.fd)   # whole on disk before it takes the final name
                self._rename()
            finally:
                self._stream.close()   # the lock goes with it

    def _rename(self) -> None:
        try:
            same = os.path.samestat(os.fstat(self._stream.fd), os.lstat(self.partial))
        except OSError:
            same = False
        if not same:
            raise OutputError(f'{self.partial}: no longer the file recorded (removed or '
                              f'replaced while recording); not renamed to {self.path}')
        try:
            if self.exclusive:   # never over a file that appeared at the name meanwhile
                os.link(self.partial, self.path, follow_symlinks=False)
                os.unlink(self.partial)
            else:
                check_output(self.path)
                os.replace(self.partial, self.path)
        except FileExistsError:
            raise OutputError(f'{self.path}: a file appeared there while recording; the '
                              f'recording is kept as {self.partial}') from None
        except OSError as exc:
            raise OutputError(f'{self.path}: cannot take the name ({exc.strerror or exc}); the '
                              f'recording is kept as {self.partial}') from None
        self.partial = self.path


def message_class(full_type: str):
    """The Python class of `pkg/msg/Type` (what rosidl_runtime_py.get_message does)."""
    import importlib
    pkg, _, name = full_type.partition('/msg/')
    return getattr(importlib.import_module(f'{pkg}.msg'), name)


def _record_node(recorder: McapRecorder, topics: list[str],
                 on_matched: Callable[[str, int], None] | None = None):
    """`on_matched(topic, publishers)`: the recorder's reader on `topic` now matches that many
    publishers (DDS's subscription-matched event)."""
    from rclpy.event_handler import SubscriptionEventCallbacks
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    class RecorderNode(Node):
        def __init__(self):
            super().__init__('loom_record')
            mask_node_logger(self)   # every log line masked from the first (issue 13, fault 10)
            self.wanted = [self.resolve_topic_name(t) for t in topics]
            self.subs = {}
            self.problems: dict[str, str] = {}
            self.lost: dict[str, int] = {}   # per topic, as DDS reports it (message_lost)
            self.create_timer(0.2, self._discover)

        def _discover(self):
            for name, types in self.get_topic_names_and_types():
                if name not in self.wanted or name in self.subs or name in self.problems:
                    continue
                if not self.get_publishers_info_by_topic(name):
                    continue   # seen through a subscriber only: its QoS is the publishers' to say
                try:
                    recorder.add_topic(name, types[0], self._channel_metadata(name))
                    msg_type = message_class(types[0])
                except (SchemaError, AttributeError, ModuleNotFoundError, ValueError) as exc:
                    self.problems[name] = str(exc)
                    self.get_logger().error(f'cannot record {name}: {exc}')
                    continue
                self.subs[name] = self.create_subscription(
                    msg_type, name, lambda data, n=name: recorder.write(n, data),
                    self._qos(name), raw=True, event_callbacks=SubscriptionEventCallbacks(
                        matched=lambda info, n=name: self._matched(n, info),
                        message_lost=lambda info, n=name: self._lost(n, info)))

        def _matched(self, name: str, info) -> None:
            if on_matched is not None:
                on_matched(name, int(info.current_count))

        def _lost(self, name: str, info) -> None:
            self.lost[name] = int(info.total_count)

        def _qos(self, name: str) -> QoSProfile:
            """rosbag2's choice: reliable when every publisher is (nothing sent reliably is
            lost to the recording), else best effort (matches every publisher)."""
            infos = self.get_publishers_info_by_topic(name)
            reliable = bool(infos) and all(
                i.qos_profile.reliability == ReliabilityPolicy.RELIABLE for i in infos)
            return QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE if reliable
                              else ReliabilityPolicy.BEST_EFFORT)

        def _channel_metadata(self, name: str) -> dict[str, str]:
            """The publishers' durability: transient_local if any offers it."""
            from rclpy.qos import DurabilityPolicy
            durable = any(info.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL
                          for info in self.get_publishers_info_by_topic(name))
            return {DURABILITY_KEY: 'transient_local' if durable else 'volatile'}
    return RecorderNode()


DRAIN_TURN_S = 0.05    # on stop: one turn of the executor while messages keep coming
DRAIN_LIMIT_S = 2.0    # ... and never longer than this in all


def drain(executor, written: Callable[[], int], turn_s: float = DRAIN_TURN_S,
          limit_s: float = DRAIN_LIMIT_S, clock: Callable[[], float] = time.monotonic) -> int:
    """After a stop, write what had already reached the recorder before the file is closed: a
    loaded recorder was told to stop with messages delivered to its readers but not yet taken,
    and they were missing from the file (decisions, which are reliable). Turns until one turn
    writes nothing, within `limit_s`; returns how many it wrote."""
    start = before = written()
    deadline, last_log = clock() + limit_s, new_log_throttle()
    while clock() < deadline:
        end = min(deadline, clock() + turn_s)
        while clock() < end:   # a whole turn: a timer's callback does not end it
            # a failing callback (another node's, in a shared executor) is counted, not fatal
            spin_once_counted(executor, max(0.0, end - clock()), last_log)
        now = written()
        if now == before:
            break
        before = now
    return before - start


def add_parser(sub) -> None:
    p = sub.add_parser('record', help='record ROS topics to an MCAP file (rosbag2/Foxglove)')
    _arguments(p)
    p.set_defaults(run=lambda args: run(args, args.ros_args))


def _arguments(p) -> None:
    p.add_argument('--output', default=None,
                   help='MCAP file to write (default: a new <root>/recordings/<UTC time>.mcap, '
                        'where `loom forget` finds it; elsewhere it warns that forget will not)')
    p.add_argument('--topics', nargs='*', default=None,
                   help=f'ROS topics (relative ones under the namespace); default: '
                        f'{" ".join(DEFAULT_TOPICS)}')
    p.add_argument('--camera', action='store_true',
                   help=f'also record camera frames ({" ".join(CAMERA_TOPICS)}; about 8 MB/s at '
                        '10 Hz), what a replay of the face flow needs')
    p.add_argument('--duration', type=float, default=0.0, help='stop after this many seconds')
    p.add_argument('--root', default=DEFAULT_ROOT,
                   help=f'storage.root whose consent registry says who may be recorded '
                        f'(default {DEFAULT_ROOT}; its consent.db, read only), and whose '
                        f'recordings folder the file goes to by default')
    p.add_argument('--consent-config', default='',
                   help='consent defaults (default: the shipped config/consent.yaml)')
    p.add_argument('--store', action='store_true',
                   help="when done, move the file into the root's object store (storage.objects "
                        'in config/loom.yaml: <root>/objects or S3) as blobs/recordings/<name>, '
                        'where forget and export reach it')


def default_output(root: str) -> Path:
    """A new file in the root's recordings folder (the storage layout's), where `loom forget`
    rewrites recordings: the old default (demo_output/ under the current folder) was out of its
    reach, and a subject's payload stayed there after `forget`."""
    stamp = datetime.now(timezone.utc).strftime(STAMP_FORMAT)
    return StorageLayout.at(root).recordings / f'{stamp}{RECORDING_SUFFIX}'


def forget_reaches(path: str | Path, root: str) -> bool:
    """Whether `loom forget --root <root>` finds a recording at `path`: a .mcap file under
    <root>/recordings or directly in <root> (the storage layer's rule: erasure.reaches)."""
    return erasure.reaches(StorageLayout.at(root), Path(os.path.expanduser(str(path))))


def run(args, ros_args: list[str]) -> int:
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    from rclpy.task import Future

    from loom_ros.bus.executor import make_executor, spin_until
    # Here, not at the top: every `loom` command imports this module to build its parser.
    from loom_ros.storage.consent import ConsentError, ConsentRegistry, consent_path, load_defaults
    try:
        registry = ConsentRegistry(
            consent_path(args.root), load_defaults(args.consent_config or
                                                   config_dir() / 'consent.yaml'),
            read_only=True)
    except ConsentError as exc:
        print(f'loom record: {exc}', file=sys.stderr)
        return 2
    exclusive = args.output is None
    if exclusive:
        args.output = str(default_output(args.root))
    try:   # before ROS starts: a refused path costs nothing
        recorder = McapRecorder(args.output, privacy=consent_hook(registry.lookup),
                                on_first=lambda topic: print(
                                    json.dumps({'first_message': topic}), flush=True),
                                exclusive=exclusive)
    except OSError as exc:   # OutputError, or a folder that cannot be made
        print(f'loom record: --output {exc}', file=sys.stderr)
        registry.close()
        return 2
    if not getattr(args, 'store', False) and not forget_reaches(args.output, args.root):
        recordings = StorageLayout.at(args.root).recordings
        print(f'loom record: warning: `loom forget --root {args.root}` will not reach '
              f'{args.output}: it rewrites only .mcap files under {recordings} or directly in '
              f'the root; leave out --output (default {recordings}/<UTC time>.mcap) or add '
              '--store', file=sys.stderr, flush=True)
    # Loom's Fast DDS profile (as bring-up gives its nodes), so camera frames reach the recorder
    # whole; the profile is read when the participant is made, after this.
    os.environ.update(fastdds_environment(os.environ, config_dir()))
    try:
        rclpy.init(args=['loom_record', *ros_args],
                   signal_handler_options=SignalHandlerOptions.NO)
    except BaseException:   # bad --ros-args: the file is finished (empty) and closed
        recorder.close()
        registry.close()
        raise
    stop = Future()

    def request_stop(*_):
        if not stop.done():
            stop.set_result(True)
    on_stop_signal(request_stop)   # set on a thread of its own, never in the handler
    node = _record_node(recorder, (args.topics or DEFAULT_TOPICS) +
                        (CAMERA_TOPICS if getattr(args, 'camera', False) else []),
                        on_matched=lambda topic, n: print(
                            json.dumps({'matched': topic, 'publishers': n}), flush=True))
    if args.duration:
        node.create_timer(args.duration, request_stop)
    executor = make_executor()
    executor.add_node(node)
    print(json.dumps({'recording': args.output, 'partial': recorder.partial}), flush=True)
    problem = ''
    try:
        spin_until(executor, stop, poll_s=0.2)
        drain(executor, lambda: sum(recorder.counts.values()))
    finally:
        try:
            recorder.close()
        except OSError as exc:   # OutputError: finished, but kept under its partial name
            problem = str(exc)
            print(f'loom record: {problem}', file=sys.stderr, flush=True)
        print(json.dumps({'file': recorder.partial, 'messages': recorder.counts,
                          'unreadable': recorder.unreadable, 'too_large': recorder.too_large,
                          'cut': recorder.cut(),
                          'stripped': recorder.stripped(),
                          'stripped_consent': recorder.stripped_consent(), 'lost': node.lost,
                          'problems': node.problems}), flush=True)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        registry.close()
    if problem:
        return 1
    return _store(args) if getattr(args, 'store', False) else 0


def _store(args) -> int:
    """`--store`: the finished file into the object store (storage/blobs.py)."""
    from loom_ros.storage.blobs import store_recording
    from loom_ros.storage.errors import StorageError
    from loom_ros.storage.service import default_params
    try:
        ref = store_recording(args.output, {**default_params(), 'storage.root': args.root},
                              os.environ)
    except StorageError as exc:
        print(f'loom record: --store: {exc}', file=sys.stderr)
        return 1
    print(json.dumps({'stored': ref.key, 'bytes': ref.bytes}), flush=True)
    return 0


def main(argv=None) -> int:
    from loom_ros.cli import standalone
    return standalone('loom record', __doc__.splitlines()[0], _arguments, run, argv)


if __name__ == '__main__':
    sys.exit(main())
