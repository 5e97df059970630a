"""Structured JSON logs with sensitive data masked before anything is written.

`NodeLog(name, node=...)` is what nodes use: `log.info('routed', event=ev, route='cloud')`.
Every record is masked first, then written as one JSON line (when a JSON stream is configured)
and as text through the rclpy logger (so /rosout and `ros2 run` consoles get it too).
`MaskingFilter` and `JsonFormatter` also apply to plain `logging` loggers.

Masking:
- by field name: any field whose name contains a sensitive word as a part (token, key, password,
  secret, authorization, cookie, credential, ...: `api_key`, `X-Auth-Token`, `db.password`);
- by pattern, inside any string: bearer tokens, JWTs, API-key-like strings (sk-..., ghp_...,
  AKIA..., xoxb-...), `key=value` pairs whose key is sensitive, e-mail addresses;
- key material, inside any string and before the patterns above: PEM private-key blocks
  (`-----BEGIN ... PRIVATE KEY-----` to its END line, or to the end of a text cut before it),
  and raw 256-bit keys in base64, standing alone: 44 characters ending in one '=' (what
  `loom storage keygen` prints and security/keyring.py reads), or 43 unpadded (standard or URL
  alphabet, secrets.token_urlsafe(32)) that look random: an upper-case letter, a lower-case
  one and a digit, 22 different characters or more, no run of 12 hex digits; either ending as an
  encoder ends 32 bytes. Ids stay readable: hex (UUIDs, sha256, event ids) has no upper and
  lower case together, a name with a hex id in it has its hex run, and a run longer or shorter
  than a key is no key; a base64 sha256 digest (`sha256-...=` of subresource integrity) is
  masked like a key, and so is, rarely, a 43-character random-looking mixed-case name;
- events: the raw payload of an event whose effective privacy (the stricter of its field and
  its metadata's, bus/privacy.py) is Private or LocalOnly is never logged (size only); the data
  subject (`loom.subject`) shows as <subject>; other payloads and metadata, keys included, go
  through the two rules above.

Bounds (any string can come from a hostile event): each string is cut to MAX_TEXT_CHARS (a
traceback to MAX_TRACEBACK_CHARS) *before* any pattern runs on it, with a marker saying how much
was cut; containers keep MAX_ITEMS items; a whole line is cut to MAX_LINE_CHARS after masking.
Every pattern runs in time linear in its input: a match may only start where a run of its
characters starts (lookbehind), and quantifiers are possessive, so a failed attempt never
rescans a run. A level that is off costs no masking at all.
"""
from __future__ import annotations

import datetime
import itertools
import json
import logging
import os
import re
import sys
import threading

from loom_ros.bus.event import Privacy
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY, effective_privacy

MASK = '***'
# What a log shows for the data subject an event names: the id is personal data (often an
# e-mail or a name), and a keyed hash needs the storage root's key, which a log does not hold.
SUBJECT_MASK = '<subject>'

SENSITIVE_WORDS = frozenset({
    'token', 'key', 'password', 'passwd', 'pwd', 'secret', 'authorization', 'auth', 'cookie',
    'credential', 'credentials', 'apikey', 'passphrase', 'signature', 'session', 'private',
})
_NAME_PARTS = re.compile(r'[^a-z0-9]+')
_CAMEL = re.compile(r'(?<=[a-z0-9])(?=[A-Z])')

MAX_TEXT_CHARS = 4096         # one string, before any pattern runs on it
MAX_TRACEBACK_CHARS = 16384   # a traceback keeps more: its last lines say what went wrong
MAX_ITEMS = 64                # items kept per dict/list in a logged value
MAX_LINE_CHARS = 16384        # one whole log line (message and fields), after masking
_TAIL_SCAN = 256              # a cut never ends inside a word shorter than this (no half secrets)

PATTERNS: list[tuple[re.Pattern, object]] = [
    # Authorization: Bearer abc.def / Basic xyz
    (re.compile(r'\b(Bearer|Basic|Token)\s++[A-Za-z0-9\-._~+/]{6,}+=*+', re.IGNORECASE),
     lambda m: f'{m.group(1)} {MASK}'),
    # JSON Web Tokens (only where a run of token characters starts: `x-eyJ...` is not one)
    (re.compile(r'(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,}+\.[A-Za-z0-9_-]{5,}+\.[A-Za-z0-9_-]*+'),
     MASK),
    # Provider keys with well-known prefixes
    (re.compile(r'\b(?:sk|pk|rk)[-_](?:live[-_]|test[-_]|proj[-_]|ant[-_])?[A-Za-z0-9_-]{12,}+'),
     MASK),
    (re.compile(r'\b(?:ghp|gho|ghu|ghs|ghr|github_pat|glpat|xox[abprs])[-_][A-Za-z0-9_-]{10,}+'),
     MASK),
    (re.compile(r'\b(?:AKIA|ASIA)[0-9A-Z]{16}\b'), MASK),
    (re.compile(r'\bAIza[0-9A-Za-z_-]{30,}+'), MASK),
    # e-mail addresses (the local part starts where its run starts)
    (re.compile(r'(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]++@[A-Za-z0-9.-]+\.[A-Za-z]{2,}+'),
     '<email>'),
]
# key=value / "key": "value" where the key is sensitive: found as a whole key run and its
# separator (linear), the key checked apart, then the value masked (see _mask_key_values).
_KEY_SEPARATOR = re.compile(
    r'''(?<![A-Za-z0-9_.-])(?P<name>[A-Za-z0-9_.-]++)["']?+\s*+[:=]\s*+["']?+''')
_SECRET_KEY = re.compile(r'token|api[_-]?key|apikey|secret|password|passwd|authorization|'
                         r'credential|cookie', re.IGNORECASE)
_SECRET_VALUE = re.compile(r'''[^\s"',;&}]++''')


def secret_name(name: str) -> bool:
    """Whether a field name designates a secret by either rule: its words (sensitive_name) or
    the key=value rule's words anywhere in it (`accesstoken`, `dbpassword`), as text masking
    would have hidden the value after it."""
    return sensitive_name(name) or _SECRET_KEY.search(str(name)[:MAX_TEXT_CHARS]) is not None


def sensitive_name(name: str) -> bool:
    """Whether a field name designates a secret (`api_key`, `X-Auth-Token`; not `monkey`)."""
    text = _CAMEL.sub('_', str(name)[:MAX_TEXT_CHARS]).lower()
    if text in SENSITIVE_WORDS:
        return True
    return any(part in SENSITIVE_WORDS for part in _NAME_PARTS.split(text) if part)


def bound_text(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """`text` cut to `limit` characters plus a marker naming what was cut. The cut moves back to
    a space when one is near, so a secret is never left half there for the patterns to miss."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    space = max(head.rfind(' ', limit - _TAIL_SCAN), head.rfind('\n', limit - _TAIL_SCAN))
    if space > 0:
        head = head[:space]
    return f'{head} ...[{len(text) - len(head)} more chars not logged]'


def mask_text(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """`text` bounded to `limit` characters, then masked (see the module docstring)."""
    if type(text) is not str:
        text = str(text)
    return _mask_patterns(text if len(text) <= limit else bound_text(text, limit))


# What every pattern above needs somewhere in the text to match at all, case-folded (a
# superset: each pattern's literal start, '-'/'_' after a provider's k, '@' of an e-mail, each
# secret key word). A text with none of them is one no pattern would change, so the usual
# payload (sensor readings, labels) costs a few substring scans instead of eight regex passes;
# test_mask_precheck checks that both paths agree. casefold(), not lower(): the Bearer pattern
# is case-insensitive, where 'ſ' matches 's', the Kelvin sign 'k' and 'İ'/'ı' match 'i'.
_SECRET_TRIGGERS = ('@', 'bearer', 'basic', 'token', 'eyj', 'k-', 'k_', 'gh', 'github', 'glpat', 'xox',
                    'akia', 'asia', 'aiza', 'key', 'secret', 'passw', 'authorization',
                    'credential', 'cookie')
# The triggers as one search (a third cheaper than a substring test each: this runs for every
# episode an agent stores). Plain literals: the search is linear in the text.
_ANY_TRIGGER = re.compile('|'.join(map(re.escape, _SECRET_TRIGGERS)))


# Key material (see the module docstring). Linear: the PEM header is bounded words, its body a
# possessive run up to the first '-----'; a base64 key starts only where its run starts and is a
# fixed count of characters, then a run boundary.
_PEM_PRIVATE_KEY = re.compile(
    r'-----BEGIN (?:[A-Z0-9]{1,16} ){0,3}PRIVATE KEY-----[^-]*+(?:-(?!----)[^-]*+)*+'
    r'(?:-----END (?:[A-Z0-9]{1,16} ){0,3}PRIVATE KEY-----)?+')
_B64_KEY = re.compile(r'(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{43}(?P<pad>=?)(?![A-Za-z0-9+/=_-])')
_B64_LAST = frozenset('AEIMQUYcgkosw048')   # the last character of 32 bytes, unpadded
# An unpadded run is a key only if it looks random: 43 random base64 characters hold 31 different
# ones on average (fewer than 22 in about 1 key in 30,000) and a run of 12 hex digits in about 1
# in 500,000; a name with a UUID or hash in it (`CANARYalice<uuid hex>`) has both.
_B64_MIN_DISTINCT = 22
_HEX_RUN = re.compile(r'[0-9a-f]{12}|[0-9A-F]{12}')
PRIVATE_KEY_MASK = '<private key>'


def _raw_key(match: re.Match) -> str:
    """MASK for a run of 43 base64 characters (and its '=') that an encoder of 32 bytes wrote."""
    text = match.group(0)
    body = text[:43]
    if body[-1] not in _B64_LAST or \
            (('+' in body or '/' in body) and ('-' in body or '_' in body)):
        return text   # not how 32 bytes end, or two alphabets: no encoder wrote it
    if not match['pad'] and (
            not (any(c.isupper() for c in body) and any(c.islower() for c in body)
                 and any(c.isdigit() for c in body))
            or len(set(body)) < _B64_MIN_DISTINCT or _HEX_RUN.search(body) is not None):
        return text   # a name of 43 characters: one case, few letters, or a hex id in it
    return MASK


def _mask_key_material(text: str, folded: str | None = None) -> str:
    """PEM private keys and raw base64 256-bit keys in `text` masked (the trigger pre-check does
    not skip this: a raw key holds no trigger word); linear time. With `folded` (`text` case
    folded) the base64 scan is skipped where no key can be: a padded one needs its '=', an
    unpadded one an upper-case letter (then `folded` differs from `text`)."""
    if '-----BEGIN' in text:
        text = _PEM_PRIVATE_KEY.sub(PRIVATE_KEY_MASK, text)
    if len(text) >= 43 and (folded is None or folded != text or '=' in text):
        text = _B64_KEY.sub(_raw_key, text)
    return text


def _mask_patterns(text: str) -> str:
    """Every masking pattern over `text`; linear time in its length (no bound applied here)."""
    if text.isascii():
        folded = text.lower()
    else:   # and the dotted and dotless i, which the regex engine also takes for 'i'
        folded = text.casefold().replace('\u0131', 'i').replace('i\u0307', 'i')
    # (`folded` still serves the trigger check after: a mask adds no trigger the key lacked)
    text = _mask_key_material(text, folded)
    if _ANY_TRIGGER.search(folded) is not None:
        return _mask_all_patterns(text)
    return text


def _mask_all_patterns(text: str) -> str:
    """Every pattern, without the pre-check (what _mask_patterns must agree with)."""
    text = _mask_key_material(text)
    for pattern, replacement in PATTERNS:
        text = pattern.sub(replacement, text)
    return _mask_key_values(text)


def _mask_key_values(text: str) -> str:
    """`password=...`, `"api_key": "..."`: the value of every sensitive key replaced by MASK."""
    out, done = [], 0
    for match in _KEY_SEPARATOR.finditer(text):
        if match.start() < done or not _SECRET_KEY.search(match['name']):
            continue   # inside a value already masked, or an ordinary key
        value = _SECRET_VALUE.match(text, match.end())
        if value is not None:
            out += (text[done:match.end()], MASK)
            done = value.end()
    if not out:
        return text
    out.append(text[done:])
    return ''.join(out)


def mask_event(event) -> dict:
    """A loggable view of an Event: the payload replaced when its effective privacy is Private
    or LocalOnly (metadata can raise a Public field's), the subject hidden, the rest masked."""
    privacy = effective_privacy(event)   # an unknown field value: LocalOnly
    try:
        field = Privacy(event.privacy).name
    except ValueError:
        field = mask_text(str(event.privacy), 32)
    metadata = mask_value(event.metadata)
    if isinstance(metadata, dict) and SUBJECT_METADATA_KEY in metadata:
        metadata[SUBJECT_METADATA_KEY] = SUBJECT_MASK
    view = {'id': mask_value(event.id), 'type': mask_value(event.type),
            'source': mask_value(event.source), 'timestamp_ms': event.timestamp_ms,
            'privacy': field, 'confidence': event.confidence, 'tags': mask_value(event.tags),
            'metadata': metadata}
    if privacy in (Privacy.PRIVATE, Privacy.LOCAL_ONLY):
        view['payload'] = f'<{privacy.name.lower()}: {len(event.payload)} bytes not logged>'
    else:
        try:
            view['payload'] = mask_value(bytes(event.payload).decode())
        except UnicodeDecodeError:
            view['payload'] = f'<{len(event.payload)} bytes>'
    return view


def mask_value(value, name: str | None = None, _depth: int = 0):
    """Mask a value for logging: a sensitive `name` hides it entirely; containers recurse."""
    if name is not None and sensitive_name(name) and value not in (None, '', b''):
        return MASK
    if _depth > 8:
        return '<nested too deep>'
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in itertools.islice(value.items(), MAX_ITEMS):
            k = bound_text(str(k), _TAIL_SCAN)
            shown = _mask_patterns(k)   # a key can be an e-mail address or a token too
            if shown in out:   # two keys masked alike: both kept
                shown = f'{shown}#{len(out)}'
            out[shown] = mask_value(v, k, _depth + 1)
        if len(value) > MAX_ITEMS:
            out['...'] = f'{len(value) - MAX_ITEMS} more items not logged'
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        out = [mask_value(v, None, _depth + 1) for v in itertools.islice(value, MAX_ITEMS)]
        if len(value) > MAX_ITEMS:
            out.append(f'... {len(value) - MAX_ITEMS} more items not logged')
        return out
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f'<{len(value)} bytes>'
    if type(value).__name__ == 'Event' and hasattr(value, 'privacy'):
        return mask_event(value)
    return mask_text(_bounded_repr(value))


def _bounded_repr(value) -> str:
    """repr of an unknown object; a huge one (a numpy array, a long deque) is cut afterwards."""
    try:
        return repr(value)
    except Exception as exc:  # a broken __repr__ must not lose the log line
        return f'<{type(value).__name__}: repr failed: {exc!r}>'


# -- logging integration ---------------------------------------------------------------------------
_RESERVED = frozenset(vars(logging.LogRecord('', 0, '', 0, '', None, None))) | {'message', 'asctime'}


class MaskingFilter(logging.Filter):
    """Masks a record's message (after %-formatting) and its extra fields in place, so every
    handler after it (file, console, JSON) only ever sees masked text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, '_loom_masked', False):
            try:
                message = record.getMessage()
            except Exception:  # bad %-args: log what we have rather than fail
                message = f'{record.msg} {record.args!r}'
            record.msg, record.args = mask_text(message), None
            for key, value in list(vars(record).items()):
                if key not in _RESERVED and not key.startswith('_'):
                    setattr(record, key, mask_value(value, key))
            if record.exc_text:
                record.exc_text = mask_text(record.exc_text, MAX_TRACEBACK_CHARS)
            elif record.exc_info:
                record.exc_text = mask_text(logging.Formatter().formatException(record.exc_info),
                                            MAX_TRACEBACK_CHARS)
            record._loom_masked = True
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC ISO), level, logger, node, msg, then the extra fields."""

    def __init__(self, node: str = ''):
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        if not getattr(record, '_loom_masked', False):
            MaskingFilter().filter(record)
        entry = {'ts': datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
                 .isoformat(timespec='milliseconds'),
                 'level': _LEVEL_NAMES.get(record.levelno, record.levelname),
                 'logger': record.name, 'node': getattr(record, 'node', self.node),
                 'msg': record.getMessage()}
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith('_') and key != 'node':
                entry[key] = value
        if record.exc_text:
            entry['exc'] = record.exc_text
        return json.dumps(entry, default=str, separators=(',', ':'))


_ROS_SEVERITY = {logging.DEBUG: 10, logging.INFO: 20, logging.WARNING: 30, logging.ERROR: 40,
                 logging.CRITICAL: 50}   # rclpy LoggingSeverity values
_LEVEL_NAMES = {logging.DEBUG: 'DEBUG', logging.INFO: 'INFO', logging.WARNING: 'WARN',
                logging.ERROR: 'ERROR', logging.CRITICAL: 'FATAL'}
LEVELS = {'debug': logging.DEBUG, 'info': logging.INFO, 'warn': logging.WARNING,
          'warning': logging.WARNING, 'error': logging.ERROR, 'fatal': logging.CRITICAL}

_STREAMS: dict[str, object] = {}
_STREAMS_LOCK = threading.Lock()


def _json_handler(target: str) -> logging.Handler:
    """One handler per target per process: '-' or 'stderr' for stderr, else an appended file."""
    with _STREAMS_LOCK:
        handler = _STREAMS.get(target)
        if handler is None:
            if target in ('-', 'stderr'):
                handler = logging.StreamHandler(sys.stderr)
            else:
                import os
                os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
                handler = logging.FileHandler(target, encoding='utf-8')
            handler.addFilter(MaskingFilter())
            handler.setFormatter(JsonFormatter())
            _STREAMS[target] = handler
        return handler


class NodeLog:
    """A node's structured logger: masked JSON lines to `json_target` ('' = none) and masked text
    through the rclpy logger of `node` (so /rosout works). Fields are keyword arguments."""

    def __init__(self, name: str, node=None, json_target: str = '', level: str = 'info'):
        self.name = name
        self.node_name = node.get_fully_qualified_name() if node is not None else name
        self._ros = node.get_logger() if node is not None else None
        self._logger = logging.getLogger(f'loom.{name}')
        self._logger.propagate = False
        self._logger.setLevel(LEVELS.get(level.lower(), logging.INFO) if isinstance(level, str)
                              else level)
        self.json_target = json_target
        if json_target:
            handler = _json_handler(json_target)
            if handler not in self._logger.handlers:
                self._logger.addHandler(handler)

    def log(self, level: int, msg: str, **fields) -> dict | None:
        """Mask, then write. Returns the masked record (message and fields) or None if filtered."""
        if not self._logger.isEnabledFor(level):
            return None
        text = mask_text(msg)
        masked = {k: mask_value(v, k) for k, v in fields.items()}
        if self._logger.handlers:
            self._logger.log(level, text, extra={'node': self.node_name, '_loom_masked': True,
                                                 **{k: v for k, v in masked.items()
                                                    if k not in _RESERVED}})
        if self._ros is not None:
            suffix = (' ' + json.dumps(masked, default=str, separators=(',', ':'))) if masked else ''
            ros_log = {logging.DEBUG: self._ros.debug, logging.INFO: self._ros.info,
                       logging.WARNING: self._ros.warning, logging.ERROR: self._ros.error,
                       logging.CRITICAL: self._ros.fatal}.get(level, self._ros.info)
            ros_log(bound_text(text + suffix, MAX_LINE_CHARS))
        return {'msg': text, **masked}

    def debug(self, msg: str, **fields):
        return self.log(logging.DEBUG, msg, **fields)

    def info(self, msg: str, **fields):
        return self.log(logging.INFO, msg, **fields)

    def warning(self, msg: str, **fields):
        return self.log(logging.WARNING, msg, **fields)

    warn = warning

    def error(self, msg: str, **fields):
        return self.log(logging.ERROR, msg, **fields)


# rclpy's executors log every exception that escapes a callback, FATAL with a traceback, through
# the node's logger, before Loom's spinning loop counts it and logs it at most once a second
# (bus/executor.py): each message a callback could not take cost two more lines, unthrottled
# (a forged heartbeat flood wrote 800 KB to a manager's log). Those two lines are throttled here,
# per call site as rclpy throttles; the count stays exact (callback_error).
RCLPY_CALLBACK_LINES = ("Exception in '", 'Error occurred at:')
CALLBACK_LOG_PERIOD_S = 1.0


class MaskedRosLogger:
    """What `node.get_logger()` returns once telemetry is attached: the node's rclpy logger with
    every message masked before rclpy (and /rosout) sees it, and, when the structured log is on,
    the same record as a masked JSON line. So a node's own log calls are masked and structured
    without changing them. rclpy's per-call-site `once`/`throttle` filters keep working: this
    file is registered as one of rclpy's internal callers, so the call site is the node's line."""

    _LEVELS = {'debug': logging.DEBUG, 'info': logging.INFO, 'warning': logging.WARNING,
               'warn': logging.WARNING, 'error': logging.ERROR, 'fatal': logging.CRITICAL}

    def __init__(self, ros_logger, structured: 'NodeLog | None' = None):
        _register_internal_caller()
        self._ros = ros_logger
        self._structured = structured if structured is not None and \
            structured._logger.handlers else None

    def __getattr__(self, name):   # name, get_child, set_level, get_effective_level, ...
        return getattr(self._ros, name)

    def _emit(self, level: str, message, kwargs) -> bool:
        if not self._ros.is_enabled_for(_ROS_SEVERITY[self._LEVELS[level]]):
            return False   # a level that is off costs no masking
        if level in ('fatal', 'warning', 'warn') and isinstance(message, str) and \
                message.startswith(RCLPY_CALLBACK_LINES) and 'throttle_duration_sec' not in kwargs:
            kwargs = {**kwargs, 'throttle_duration_sec': CALLBACK_LOG_PERIOD_S}
        text = mask_text(message)
        method = 'warning' if level == 'warn' else level
        logged = getattr(self._ros, method)(text, **kwargs)
        if logged and self._structured is not None:
            self._structured._logger.log(self._LEVELS[level], text, extra={
                'node': self._structured.node_name, '_loom_masked': True})
        return logged

    def debug(self, message, **kwargs) -> bool:
        return self._emit('debug', message, kwargs)

    def info(self, message, **kwargs) -> bool:
        return self._emit('info', message, kwargs)

    def warning(self, message, **kwargs) -> bool:
        return self._emit('warning', message, kwargs)

    def warn(self, message, **kwargs) -> bool:
        return self._emit('warning', message, kwargs)

    def error(self, message, **kwargs) -> bool:
        return self._emit('error', message, kwargs)

    def fatal(self, message, **kwargs) -> bool:
        return self._emit('fatal', message, kwargs)


def _register_internal_caller() -> None:
    from rclpy.impl import rcutils_logger
    here = os.path.realpath(__file__)
    if here not in rcutils_logger._internal_callers:
        rcutils_logger._internal_callers.append(here)


def mask_node_logger(node, structured: 'NodeLog | None' = None) -> MaskedRosLogger:
    """Make `node.get_logger()` return the masking logger (idempotent). Whoever takes a node's
    logger first (the bus does, before telemetry exists) calls this, so no reference to the
    unmasked logger is ever kept; a later call with `structured` adds the JSON lines."""
    current = node.get_logger()
    if isinstance(current, MaskedRosLogger):
        if structured is not None and structured._logger.handlers:
            current._structured = structured
        return current
    wrapper = MaskedRosLogger(current, structured)
    node.get_logger = lambda: wrapper
    return wrapper
