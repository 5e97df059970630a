"""The inbound contract: which Zenoh samples may become which bus events, from whom, how often.

A sample under `loom/<robot_id>/<path>` reaches the bus only through a declared rule (the
`inbound_file`, default config/inbound.yaml): the first rule whose `key` pattern matches the
path names the bus topic, the privacy the event gets (set by the rule, never by the sender) and a
token-bucket rate (excess dropped and counted). A rule with a `grant` takes only signed samples:
the envelope below carries the sender's certificate and an ECDSA signature over the key, a
timestamp, a nonce and the event, so a sample is refused unless the fleet's authority issued the
certificate, the signature holds, the identity's name or role holds the grant (`grants`), and the
(timestamp, nonce) is fresh and unseen (no replays within the window). Actuator topics (motion,
speech: the `actuators` patterns) can only be reached through such a rule: a rule naming one
without a grant is a config error, and a wildcard rule without one never delivers to one. Pure Python; clocks
are passed in.

Signed envelope, version 1 (everything bounded before it is parsed):
    b'LSC' 0x01 | cert length (2, BE) | cert PEM | sig length (1) | sig | ts_ms (8, BE) |
    nonce (16) | codec sample
signed bytes: b'loom command v1\\0' + key (UTF-8) + b'\\0' + ts_ms + nonce + codec sample
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from loom_ros.bridge import codec
from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.names import TopicNameError, TopicPattern, validate_topic
from loom_ros.bus.privacy import PRIVACY_METADATA_KEYS
from loom_ros.security import keys
from loom_ros.security.keys import CredentialsError
from loom_ros.security.ratelimit import TokenBucket  # noqa: F401  (also the bridge's API)

MAGIC = b'LSC\x01'
_CERT_LEN = struct.Struct('>H')
_TAIL = struct.Struct('>Q16s')
NONCE_BYTES = 16
MAX_SIG_BYTES = 128          # a DER ECDSA P-256 signature is at most 72
DEFAULT_REPLAY_WINDOW_S = 30.0
MAX_REMEMBERED_NONCES = 100_000
MAX_RULES = 256
MAX_RATE = 1_000_000.0
_DOMAIN = b'loom command v1\x00'


class ContractError(ValueError):
    """An inbound file that cannot be a contract; says which rule and why."""


# -- the declared rules -----------------------------------------------------------------------
@dataclass(frozen=True)
class InboundRule:
    key: TopicPattern            # matched against the key's path under loom/<robot_id>/
    topic: str | None            # the bus topic; None: the key's own path
    privacy: Privacy
    rate: float                  # events per second
    burst: float
    grant: str | None = None     # required grant: signed samples of an identity holding it

    def bus_topic(self, path: str) -> str:
        return self.topic or path


@dataclass(frozen=True)
class InboundContract:
    rules: tuple[InboundRule, ...] = ()
    grants: dict = field(default_factory=dict)      # identity name or role -> frozenset(grants)
    actuators: tuple[TopicPattern, ...] = ()
    replay_window_s: float = DEFAULT_REPLAY_WINDOW_S

    @classmethod
    def parse(cls, doc: object) -> 'InboundContract':
        """From the inbound file's YAML; ContractError naming the rule on anything unusable."""
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise ContractError('inbound file: expected a mapping with rules, grants, actuators')
        unknown = set(doc) - {'rules', 'grants', 'actuators', 'replay_window_s'}
        if unknown:
            raise ContractError(f'inbound file: unknown keys {sorted(unknown)}')
        try:
            actuators = tuple(TopicPattern.parse(p) for p in _strings(doc.get('actuators'),
                                                                      'actuators'))
            grants = {}
            raw = doc.get('grants') or {}
            if not isinstance(raw, dict):
                raise ContractError('grants: expected {identity name or role: [grant, ...]}')
            for who, held in raw.items():
                keys._check_name(str(who))
                grants[str(who)] = frozenset(_strings(held, f'grants.{who}'))
            window = float(doc.get('replay_window_s', DEFAULT_REPLAY_WINDOW_S))
            if not 0 < window <= 3600:
                raise ContractError(f'replay_window_s must be in (0, 3600], got {window}')
            rules = doc.get('rules') or []
            if not isinstance(rules, list) or len(rules) > MAX_RULES:
                raise ContractError(f'rules: expected a list of at most {MAX_RULES}')
            parsed = tuple(_rule(i, r, actuators) for i, r in enumerate(rules))
        except (TopicNameError, CredentialsError, TypeError) as exc:
            raise ContractError(f'inbound file: {exc}') from None
        return cls(parsed, grants, actuators, window)

    def rule_for(self, path: str) -> InboundRule | None:
        return next((r for r in self.rules if r.key.matches(path)), None)

    def is_actuator(self, topic: str) -> bool:
        return any(p.matches(topic) for p in self.actuators)

    def holds(self, name: str, role: str, grant: str) -> bool:
        """The identity holds `grant` by its name or by its role."""
        return grant in self.grants.get(name, ()) or grant in self.grants.get(role, ())


def _strings(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ContractError(f'{where}: expected a list of strings, got {value!r}'[:300])
    return value


def _rule(index: int, raw: object, actuators) -> InboundRule:
    where = f'rules[{index}]'
    if not isinstance(raw, dict):
        raise ContractError(f'{where}: expected a mapping')
    unknown = set(raw) - {'key', 'topic', 'privacy', 'rate', 'burst', 'grant'}
    if unknown or 'key' not in raw or 'privacy' not in raw or 'rate' not in raw:
        raise ContractError(f'{where}: needs key, privacy and rate (optional topic, burst, '
                            f'grant); unknown {sorted(unknown)}')
    key = TopicPattern.parse(str(raw['key']))
    topic = validate_topic(str(raw['topic'])) if raw.get('topic') else None
    if topic is None and key.is_wildcard is False:
        topic = key.text
    try:
        privacy = Privacy[str(raw['privacy']).upper()]
    except KeyError:
        raise ContractError(f'{where}: privacy {raw["privacy"]!r}: one of '
                            f'{", ".join(p.name.lower() for p in Privacy)}') from None
    rate = float(raw['rate'])
    burst = float(raw.get('burst', max(1.0, rate)))
    if not (0 < rate <= MAX_RATE and 1 <= burst <= MAX_RATE):
        raise ContractError(f'{where}: rate must be in (0, {MAX_RATE:g}] and burst >= 1')
    grant = str(raw['grant']) if raw.get('grant') else None
    if grant is None and topic is not None and any(p.matches(topic) for p in actuators):
        raise ContractError(f'{where}: {topic} is an actuator topic and needs a grant')
    return InboundRule(key, topic, privacy, rate, burst, grant)


# -- the signed envelope ----------------------------------------------------------------------
@dataclass(frozen=True)
class Signed:
    cert_pem: bytes
    signature: bytes
    ts_ms: int
    nonce: bytes
    sample: bytes      # the codec sample inside

    def signed_bytes(self, key: str) -> bytes:
        return _signed_bytes(key, self.ts_ms, self.nonce, self.sample)


def _signed_bytes(key: str, ts_ms: int, nonce: bytes, sample: bytes) -> bytes:
    return b''.join((_DOMAIN, key.encode('utf-8', 'replace'), b'\x00',
                     _TAIL.pack(ts_ms, nonce), sample))


def is_signed(data: bytes) -> bool:
    return bytes(data[:len(MAGIC)]) == MAGIC


def sign_sample(identity: keys.Identity, key: str, event: Event, ts_ms: int | None = None,
                nonce: bytes | None = None) -> bytes:
    """A sample for `key` carrying `event`, signed by `identity` (what an operator sends)."""
    ts_ms = time.time_ns() // 1_000_000 if ts_ms is None else int(ts_ms)
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    sample = codec.encode(event)
    cert = identity.cert_pem()
    sig = keys.sign(identity, _signed_bytes(key, ts_ms, nonce, sample))
    return b''.join((MAGIC, _CERT_LEN.pack(len(cert)), cert, bytes((len(sig),)), sig,
                     _TAIL.pack(ts_ms, nonce), sample))


def read_signed(data: bytes) -> Signed:
    """The envelope's parts, lengths checked before anything is parsed; CredentialsError."""
    data = bytes(data)
    at = len(MAGIC)
    if data[:at] != MAGIC or len(data) < at + _CERT_LEN.size:
        raise CredentialsError('not a signed sample')
    (cert_len,) = _CERT_LEN.unpack_from(data, at)
    at += _CERT_LEN.size
    if cert_len > keys.MAX_CERT_BYTES or len(data) < at + cert_len + 1:
        raise CredentialsError('signed sample: certificate too long or truncated')
    cert = data[at:at + cert_len]
    at += cert_len
    sig_len = data[at]
    at += 1
    if sig_len > MAX_SIG_BYTES or len(data) < at + sig_len + _TAIL.size:
        raise CredentialsError('signed sample: signature too long or truncated')
    sig = data[at:at + sig_len]
    at += sig_len
    ts_ms, nonce = _TAIL.unpack_from(data, at)
    return Signed(cert, sig, ts_ms, nonce, data[at + _TAIL.size:])


class ReplayGuard:
    """Refuses a (timestamp, nonce) outside the window or seen within it. Bounded: past
    MAX_REMEMBERED_NONCES unexpired nonces, new ones are refused (never forgotten early).
    The nonces live in memory, so a guard refuses every sample signed before it started
    ('before_start'): a bridge that restarted (a crash, a respawn, cleanup and configure) has
    forgotten them, and a command it executed before would otherwise pass again within the
    window. A sender whose clock is behind the robot's by d is refused for d after a restart."""

    def __init__(self, window_s: float, wall_ms: Callable[[], int],
                 limit: int = MAX_REMEMBERED_NONCES):
        self.window_ms = int(window_s * 1000)
        self.wall_ms = wall_ms
        self.limit = limit
        self.started_ms = int(wall_ms())
        self._seen: OrderedDict[bytes, int] = OrderedDict()   # nonce -> expiry, in arrival order

    def check(self, ts_ms: int, nonce: bytes) -> str | None:
        """None when fresh (and now remembered); else 'stale', 'before_start', 'replayed' or
        'replay_full'."""
        verdict = self.precheck(ts_ms, nonce)
        if verdict is not None:
            return verdict
        # expiry: the latest time this sample could still pass the window check
        self._seen[nonce] = max(ts_ms + self.window_ms, self.wall_ms())
        return None

    def precheck(self, ts_ms: int, nonce: bytes) -> str | None:
        """What check() would answer, remembering nothing: a sample refused here needs no
        signature check (only a verified sample's nonce is ever remembered)."""
        now = self.wall_ms()
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if abs(now - ts_ms) > self.window_ms:
            return 'stale'
        if ts_ms < self.started_ms:
            return 'before_start'
        if nonce in self._seen:
            return 'replayed'
        if len(self._seen) >= self.limit:
            return 'replay_full'
        return None


def ruled_event(event: Event, rule: InboundRule) -> Event:
    """The event as the rule says it is: its privacy is the rule's, whatever the sender said."""
    event.privacy = rule.privacy
    if any(k in event.metadata for k in PRIVACY_METADATA_KEYS):
        event.metadata = {k: v for k, v in event.metadata.items()
                          if k not in PRIVACY_METADATA_KEYS}
    return event


# -- the operator's tool ----------------------------------------------------------------------
def send_command(session, identity: keys.Identity, robot_id: str, topic: str,
                 event: Event) -> str:
    """Put one signed command for `robot_id` on `topic` through a Zenoh session; its key."""
    from loom_ros.bridge.keys import robot_key
    key = robot_key(robot_id, topic)
    session.put(key, sign_sample(identity, key, event))
    return key


def main(argv=None) -> int:
    """`python -m loom_ros.bridge.inbound ROBOT TOPIC JSON --as NAME`: one signed command."""
    import zenoh
    from loom_ros.bridge.zenoh_link import INSECURE_WARNING, session_config
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument('robot_id')
    parser.add_argument('topic')
    parser.add_argument('payload', help='the command as JSON, e.g. {"linear": {"x": 0.2}}')
    parser.add_argument('--as', dest='name', required=True, help='the identity that signs')
    parser.add_argument('--type', default='', help="event type (default: the topic's last two "
                        'segments, e.g. robot.move)')
    parser.add_argument('--keys-dir', default=keys.DEFAULT_KEYS_DIR)
    parser.add_argument('--connect', action='append', default=[],
                        help='Zenoh endpoint (default tls/127.0.0.1:7447; tcp/ means tls/)')
    parser.add_argument('--insecure', action='store_true',
                        help='plain TCP without TLS (the command is still signed)')
    args = parser.parse_args(argv)
    try:
        identity = keys.load(args.keys_dir, args.name)
        event = Event.with_json(args.type or '.'.join(args.topic.split('.')[-2:]),
                                json.loads(args.payload), source=f'operator/{identity.name}')
    except (CredentialsError, ValueError) as exc:
        print(f'loom command: {exc}', file=sys.stderr)
        return 2
    if args.insecure:
        print(f'loom command: {INSECURE_WARNING}', file=sys.stderr)
    try:   # the link is mutual TLS as the signer, as every Loom session (unless --insecure)
        session = zenoh.open(session_config('client', args.connect or ['tls/127.0.0.1:7447'],
                                            identity=None if args.insecure else identity))
    except (zenoh.ZError, ValueError) as exc:
        print(f'loom command: cannot open the Zenoh session: {str(exc)[:500]}', file=sys.stderr)
        return 1
    try:
        print(send_command(session, identity, args.robot_id, args.topic, event))
    finally:
        session.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
