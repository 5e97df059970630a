"""The cloud tier's wire format: JSON requests and replies over Zenoh queries on
`loom/cloud/infer/<task>`, with a correlation id in both. Pure Python.

Request: {"id": "...", "text": "..."} | {"texts": [...]} | {"embedding": [384 floats]} |
         {"messages": [{"role": ..., "content": ...}]}
Reply (ok): {"id", "ok": true, "task", "result": {...}, "model", "cost", "server_ms"}
Reply (error, sent as a Zenoh error reply): {"id", "ok": false, "code", "error"}

Both directions are bounded before parsing (MAX_MESSAGE_BYTES) and every parser failure, deep
nesting (RecursionError) and escaped lone surrogates included, is one error type per direction:
RequestInvalid for requests, ReplyInvalid for replies.

Signed framing (issue 14): every request and reply travels as `MAGIC <header JSON>\n<body JSON>`.
The header names the id, carries the sender's certificate and an ECDSA signature; a request's
signature covers (task, id, time, audience, body digest), a reply's (request id, request digest,
body digest), so a reply is bound to the one request it answers. The audience (`aud`) is the
server instance the client addressed, or `*` (ANY_SERVER) for the shared key: a server refuses a
request addressed to another instance, so a captured request cannot be replayed to a second
server (each server refuses a replay to itself); a `*` request may be answered once by each
(the client asks ALL servers at once for those). The header is bounded and the signature checked
before the body is parsed: a stranger's bytes never reach the JSON parser.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import threading
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from loom_ros.security import keys
from loom_ros.security.keys import CredentialsError

KEY_PREFIX = 'loom/cloud/infer'
TASKS = ('embed', 'intent', 'chat', 'hello')
RETRYABLE = frozenset({'busy', 'internal'})  # worth another attempt; the rest will fail again
MAX_MESSAGE_BYTES = 4 * 1024 * 1024   # 256 texts of 16 KiB fit; a larger body is refused unread
MAX_ID_CHARS = 256
ANY_SERVER = '*'   # the audience of a request to the shared key: whichever server answers


class RequestInvalid(ValueError):
    """A request the server cannot answer; `code` is what the error reply carries."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def task_key(task: str, prefix: str = KEY_PREFIX) -> str:
    return f'{prefix}/{task}'


_INSTANCE = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z')


def check_instance(name) -> str:
    """A server instance's name, safe as one key chunk (no wildcards, '/', '@' or '$');
    ValueError otherwise. Names come from replies, so they are bounded before any use."""
    if not isinstance(name, str) or len(name) > 64 or not _INSTANCE.match(name):
        raise ValueError('instance name: 1-64 letters, digits, _, . or -, starting with a '
                         'letter or digit')
    return name


def instance_key(instance: str, task: str, prefix: str = KEY_PREFIX) -> str:
    """Where one server answers alone: `loom/cloud/<instance>/infer/<task>` for the default
    prefix (under loom/cloud/**, the cloud role's keys; never matched by the shared
    `<prefix>/*`, which has one chunk fewer)."""
    base, _, leaf = prefix.rpartition('/')
    return f'{base}/{instance}/{leaf}/{task}' if base else f'{instance}/{leaf}/{task}'


class ReplyInvalid(ValueError):
    """A reply the client cannot use (not JSON, too large, fields of the wrong type)."""


def _parse_object(data: bytes, what: str) -> dict:
    """The JSON object in `data`; ValueError naming what is wrong, and nothing else."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f'{what} of {len(data)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}')
    data = bytes(data)
    try:
        body = json.loads(data or b'null')
        if b'\\u' in data:   # an escaped lone surrogate fails later, when re-encoded
            json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, RecursionError) as exc:   # UnicodeError is a ValueError
        raise ValueError(f'{what} is not JSON: {type(exc).__name__}: {str(exc)[:200]}') from None
    if not isinstance(body, dict):
        raise ValueError(f'{what} must be a JSON object')
    ident = body.get('id', '')
    if not isinstance(ident, str) or len(ident) > MAX_ID_CHARS:
        raise ValueError(f'id must be a string of at most {MAX_ID_CHARS} characters')
    return body


def parse_request(data: bytes) -> dict:
    """The request object; RequestInvalid('bad_request') for anything else."""
    try:
        return _parse_object(data, 'request')
    except ValueError as exc:
        raise RequestInvalid('bad_request', str(exc)) from None


def parse_reply(data: bytes) -> dict:
    """A reply object with its fields checked (`result` a mapping, `cost` a finite number,
    `code`, `error` and `model` strings); ReplyInvalid for anything else."""
    try:
        reply = _parse_object(data, 'reply')
    except ValueError as exc:
        raise ReplyInvalid(str(exc)) from None
    cost = reply.get('cost', 0.0)
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not (
            isinstance(cost, float) or abs(cost) < 2**53) or not math.isfinite(cost):
        raise ReplyInvalid(f'cost must be a finite number, got a {type(cost).__name__}')
    if not isinstance(reply.get('result', {}), dict):
        raise ReplyInvalid('result must be a JSON object')
    for name in ('code', 'error', 'model'):
        if not isinstance(reply.get(name, ''), str):
            raise ReplyInvalid(f'{name} must be a string')
    return reply


def encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(',', ':')).encode()


MAGIC = b'LOOMC1 '
MAX_HEADER_BYTES = keys.MAX_CERT_BYTES + 1024   # a certificate, a signature, an id, a time
MAX_SIGNATURE_CHARS = 200                        # base64 of a DER ECDSA P-256 signature (<= 72 B)


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def request_signed_bytes(task: str, ident: str, ts_ms: int, body: bytes,
                         aud: str = ANY_SERVER) -> bytes:
    """What a request's signature covers: its task, id, send time, audience and body."""
    return b'\0'.join((b'loom-cloud-request/2', task.encode(), ident.encode(),
                       str(int(ts_ms)).encode(), aud.encode(), digest(body)))


def reply_signed_bytes(ident: str, request_digest: bytes, body: bytes) -> bytes:
    """What a reply's signature covers: the request it answers (id and digest) and its body."""
    return b'\0'.join((b'loom-cloud-reply/1', ident.encode(), request_digest, digest(body)))


def sealed_aad(task: str, client: str) -> bytes:
    """What a sealed request body is bound to besides the cloud's key: its task and the identity
    that signs the request carrying it. Bound to the task only, a blob another robot saw on a
    shared router could be put in a request that robot signed, and the cloud answered it with
    what the blob held (a Sensitive embedding's intent) to the wrong robot."""
    return f'loom-cloud/{task}/{client}'.encode()


def pack(header: dict, body: bytes) -> bytes:
    return MAGIC + encode(header) + b'\n' + body


def unpack(data: bytes, max_body: int = MAX_MESSAGE_BYTES) -> tuple[dict, bytes]:
    """(header, body) of a framed message, the header's fields checked; ValueError for anything
    else (unframed, over `max_body`, a header too long or of the wrong shape). Reads no body."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError('message must be bytes')
    if len(data) > max_body + MAX_HEADER_BYTES:
        raise ValueError(f'message of {len(data)} bytes exceeds the limit of {max_body}')
    data = bytes(data)
    if not data.startswith(MAGIC):
        raise ValueError('not a signed Loom cloud message')
    end = data.find(b'\n', len(MAGIC), len(MAGIC) + MAX_HEADER_BYTES)
    if end < 0:
        raise ValueError('message header missing or longer than its limit')
    try:
        header = json.loads(data[len(MAGIC):end])
    except (ValueError, RecursionError):
        raise ValueError('message header is not JSON') from None
    if not isinstance(header, dict):
        raise ValueError('message header must be a JSON object')
    ident, cert, sig = header.get('id'), header.get('cert'), header.get('sig')
    if not isinstance(ident, str) or len(ident) > MAX_ID_CHARS:
        raise ValueError(f'header id must be a string of at most {MAX_ID_CHARS} characters')
    if not isinstance(cert, str) or len(cert) > keys.MAX_CERT_BYTES:
        raise ValueError('header cert must be a PEM certificate of at most 16 KiB')
    if not isinstance(sig, str) or len(sig) > MAX_SIGNATURE_CHARS:
        raise ValueError('header sig must be a short base64 signature')
    ts = header.get('ts', 0)
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts < 2**53:
        raise ValueError('header ts must be milliseconds since the epoch')
    aud = header.setdefault('aud', ANY_SERVER)
    if aud != ANY_SERVER:
        try:
            check_instance(aud)
        except ValueError:
            raise ValueError('header aud must be * or a server instance name') from None
    return header, data[end + 1:]


class Signer:
    """An identity's key, loaded once (keys.sign reads it per call), and its certificate."""

    def __init__(self, identity: keys.Identity):
        self.identity = identity
        self.name, self.role = identity.name, identity.role
        self.cert_pem = identity.cert_pem()
        self._cert = self.cert_pem.decode()
        self.private_key = identity.private_key()

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.private_key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()

    def request(self, task: str, body: dict, ident: str, now_ms: int,
                aud: str = ANY_SERVER) -> bytes:
        """A signed request for `aud`: the one server instance addressed, or ANY_SERVER."""
        payload = encode({**body, 'id': ident})
        sig = self.sign(request_signed_bytes(task, ident, now_ms, payload, aud))
        return pack({'id': ident, 'ts': int(now_ms), 'aud': aud, 'cert': self._cert,
                     'sig': sig}, payload)

    def reply(self, ident: str, request_digest: bytes, body: dict, **extra) -> bytes:
        payload = encode(body)
        sig = self.sign(reply_signed_bytes(ident, request_digest, payload))
        return pack({'id': ident, 'cert': self._cert, 'sig': sig, **extra}, payload)


class Verifier:
    """Signatures checked against the fleet's authority, for the given roles only. Certificates
    are checked against the CA once and known by their digest after (keys.KnownCertificates:
    bounded, failures remembered, new ones checked at most `new_certs_per_s`), with their
    validity window re-checked on every use against the injected clock. A revoked certificate
    is refused once the keys folder is named: `keys_dir` here, or `certs.preload(keys_dir)` (what
    the cloud tier does; the folder's revoked.json is re-read when it changes). With `keys_dir`
    the list is also read again every keys.REVOCATION_CHECK_S of the injected clock (what the
    robot's client and fleet eraser pass), so a certificate revoked while running is refused
    within that; an unreadable list refuses every certificate (CredentialsError here at start)."""

    def __init__(self, ca_pem: bytes, roles, *, clock=time.time, cache_size: int = 256,
                 new_certs_per_s: float = 50.0, keys_dir=None):
        self.ca_pem = ca_pem
        self.roles = frozenset(roles)
        self.clock = clock
        self.certs = keys.KnownCertificates(ca_pem, size=cache_size, clock=clock,
                                            new_per_s=new_certs_per_s,
                                            new_burst=2 * new_certs_per_s)
        self.keys_dir = keys_dir
        # when revoked.json was last read, on `clock` (read only with a keys folder)
        self._revocations_at = clock() if keys_dir is not None else 0.0
        self._revocations_lock = threading.Lock()
        if keys_dir is not None:
            self.certs.watch_revocations(keys_dir)
        self.signatures_checked = 0   # ECDSA checks run (what a forger can make it spend)

    def verify(self, header: dict, data: bytes) -> tuple[str, str]:
        """(name, role) of whoever signed `data` with the header's certificate; CredentialsError
        when the certificate is not the fleet's, out of date, of another role, or the signature
        does not match."""
        known = self.identify(header)
        self.check(known, header, data)
        return known.name, known.role

    def identify(self, header: dict) -> keys.KnownCertificate:
        """Whom the header's certificate names, a fleet member of one of the roles, not revoked
        (cheap for a known certificate: a hash); the signature is not checked yet."""
        return self.identify_certificate(header['cert'].encode())

    def identify_certificate(self, cert_pem: bytes) -> keys.KnownCertificate:
        """identify() for a certificate held apart from a message (the cloud's, to seal to)."""
        self._recheck_revocations()
        known = self.certs.get(cert_pem)
        if known.role not in self.roles:
            raise CredentialsError(f'{known.name} has role {known.role}, not one of '
                                   f'{sorted(self.roles)}')
        return known

    def _recheck_revocations(self) -> None:
        """Read revoked.json again once keys.REVOCATION_CHECK_S passed on the injected clock (or
        it went back); CredentialsError while the list is unreadable."""
        if self.keys_dir is None:
            return
        now = self.clock()
        with self._revocations_lock:
            if 0 <= now - self._revocations_at < keys.REVOCATION_CHECK_S:
                return
            self._revocations_at = now
        self.certs.watch_revocations(self.keys_dir)

    def check(self, known: keys.KnownCertificate, header: dict, data: bytes) -> None:
        """CredentialsError unless the header's signature over `data` is `known`'s key's."""
        self.signatures_checked += 1
        try:
            known.public_key.verify(base64.b64decode(header['sig'], validate=True), data,
                                    ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, binascii.Error, ValueError):
            raise CredentialsError(f'bad signature for {known.name}') from None
