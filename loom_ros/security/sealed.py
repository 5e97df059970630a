"""Sealed payloads: data only one identity can read, even through a shared Zenoh router (ECIES).

`seal` makes a fresh P-256 key pair, agrees a secret with the recipient certificate's public key
(ECDH), derives an AES-256-GCM key from it (HKDF-SHA256, bound to both public keys) and encrypts.
The sealed bytes carry no name: whoever holds the recipient's private key and the same `aad`
(e.g. the Zenoh key the sample travels under) can `unseal`; anyone else, or any change to the
bytes or the aad, gets CredentialsError. Layout, version 1 (all lengths fixed but the last):

    b'LSE' 0x01 | ephemeral public point (65 bytes, uncompressed) | nonce (12) | ciphertext + tag

The recipient certificate should be checked against the fleet CA: pass `ca_pem` (or check it
yourself with keys.identity_of) so a stranger's certificate is never sealed to. A sealer that
runs for long holds a `Recipient`: the certificate checked against the CA, its role, its
validity and the keys folder's revocation list, again every keys.REVOCATION_CHECK_S.
"""
from __future__ import annotations

import datetime
import math
import os
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from loom_ros.security import keys
from loom_ros.security.keys import CredentialsError

MAGIC = b'LSE'
VERSION = 1
POINT_BYTES = 65
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + 1 + POINT_BYTES + NONCE_BYTES
OVERHEAD = HEADER_BYTES + TAG_BYTES
# Past the bus's largest payload (4 MiB) plus room; a longer input is refused before any work.
MAX_PLAINTEXT_BYTES = 16 * 1024 * 1024
MAX_SEALED_BYTES = MAX_PLAINTEXT_BYTES + OVERHEAD
MAX_AAD_BYTES = 64 * 1024
_INFO = b'loom sealed v1'


def recipient_key(cert_pem: bytes, ca_pem: bytes | None = None) -> ec.EllipticCurvePublicKey:
    """The P-256 public key of a certificate (checked against `ca_pem` when given)."""
    if ca_pem is not None:
        keys.identity_of(cert_pem, ca_pem)
    if not isinstance(cert_pem, (bytes, bytearray)) or len(cert_pem) > keys.MAX_CERT_BYTES:
        raise CredentialsError('recipient certificate missing or larger than 16 KiB')
    try:
        public = x509.load_pem_x509_certificate(bytes(cert_pem)).public_key()
    except ValueError as exc:
        raise CredentialsError(f'unreadable recipient certificate: {exc}') from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != 'secp256r1':
        raise CredentialsError('recipient certificate does not hold a P-256 key')
    return public


def _key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=_INFO + ephemeral + recipient).derive(shared)


def _point(public: ec.EllipticCurvePublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.X962,
                               serialization.PublicFormat.UncompressedPoint)


def _check_aad(aad: bytes) -> bytes:
    if not isinstance(aad, (bytes, bytearray)) or len(aad) > MAX_AAD_BYTES:
        raise CredentialsError('associated data missing or longer than 64 KiB')
    return bytes(aad)


def seal_to(public: ec.EllipticCurvePublicKey, plaintext: bytes, aad: bytes = b'') -> bytes:
    """`plaintext` sealed to an already loaded and checked recipient key (see recipient_key)."""
    aad = _check_aad(aad)
    if not isinstance(plaintext, (bytes, bytearray, memoryview)) \
            or len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise CredentialsError('plaintext missing or longer than 16 MiB')
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    point = _point(ephemeral.public_key())
    key = _key(ephemeral.exchange(ec.ECDH(), public), point, _point(public))
    nonce = os.urandom(NONCE_BYTES)
    header = MAGIC + bytes((VERSION,)) + point + nonce
    return header + AESGCM(key).encrypt(nonce, bytes(plaintext), header + aad)


def seal(recipient_cert_pem: bytes, plaintext: bytes, aad: bytes = b'',
         ca_pem: bytes | None = None) -> bytes:
    """`plaintext` readable only by the holder of the certificate's key (and the same aad)."""
    return seal_to(recipient_key(recipient_cert_pem, ca_pem), plaintext, aad)


def is_sealed(data: bytes) -> bool:
    """True when `data` starts like a sealed payload of this version (says nothing of who)."""
    return len(data) >= OVERHEAD and bytes(data[:len(MAGIC) + 1]) == MAGIC + bytes((VERSION,))


def unseal(identity: 'keys.Identity | ec.EllipticCurvePrivateKey', sealed: bytes,
           aad: bytes = b'') -> bytes:
    """The plaintext, if `sealed` was sealed to this identity with this aad and is intact;
    CredentialsError otherwise. Bounded before any work: it may come from a stranger."""
    aad = _check_aad(aad)
    if not isinstance(sealed, (bytes, bytearray, memoryview)) or len(sealed) > MAX_SEALED_BYTES:
        raise CredentialsError('sealed payload missing or longer than the limit')
    sealed = bytes(sealed)
    if len(sealed) < OVERHEAD:
        raise CredentialsError(f'sealed payload of {len(sealed)} bytes is shorter than its '
                               f'{OVERHEAD}-byte envelope')
    if sealed[:len(MAGIC)] != MAGIC:
        raise CredentialsError('not a sealed payload')
    if sealed[len(MAGIC)] != VERSION:
        raise CredentialsError(f'sealed payload version {sealed[len(MAGIC)]}, this reads '
                               f'version {VERSION}')
    private = identity if isinstance(identity, ec.EllipticCurvePrivateKey) \
        else identity.private_key()
    if private.curve.name != 'secp256r1':
        raise CredentialsError('the identity does not hold a P-256 key')
    start = len(MAGIC) + 1
    point = sealed[start:start + POINT_BYTES]
    nonce = sealed[start + POINT_BYTES:HEADER_BYTES]
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        shared = private.exchange(ec.ECDH(), ephemeral)
    except ValueError:
        raise CredentialsError('sealed payload holds no valid ephemeral key') from None
    key = _key(shared, point, _point(private.public_key()))
    try:
        return AESGCM(key).decrypt(nonce, sealed[HEADER_BYTES:], sealed[:HEADER_BYTES] + aad)
    except InvalidTag:
        raise CredentialsError('sealed payload not for this identity, or altered') from None


class RecipientRevoked(CredentialsError):
    """The recipient's certificate is in the keys folder's revocation list."""


class Recipient:
    """The certificate a long-running sealer seals to (the bridge: the cloud's), as the fleet says
    it is now: the file `cert_path` (read bounded, a regular file), issued by `ca_pem`'s
    authority, of `role`, valid on the injected clock (POSIX seconds) and not in the revocation
    list of `keys_dir` (revoked.json; while it is unreadable nothing is sealed to: fail closed).
    Looked at again, file and list, at most every keys.REVOCATION_CHECK_S of the clock, so a
    certificate revoked while running is refused within that and one replaced (the new cloud
    certificate copied in) taken. `public_key` is what to seal to, None while `refusal` says why
    not."""

    def __init__(self, cert_path, ca_pem: bytes, keys_dir, *, role: str = 'cloud',
                 clock=time.time):
        self.cert_path = Path(cert_path)
        self.ca_pem = bytes(ca_pem)
        self.keys_dir = keys_dir
        self.role = role
        self.clock = clock
        self.public_key: ec.EllipticCurvePublicKey | None = None
        self.refusal = 'not checked yet'
        self.fingerprint = ''   # of the certificate last read (SHA-256 of its DER, hex)
        self._checked_at = -math.inf
        self._lock = threading.Lock()

    def key(self) -> ec.EllipticCurvePublicKey:
        """The key to seal to, checked again when due; CredentialsError saying why there is none."""
        now = self.clock()
        with self._lock:
            due = not 0 <= now - self._checked_at < keys.REVOCATION_CHECK_S
            public, refusal = self.public_key, self.refusal
        if due:
            return self.check()
        if public is None:
            raise CredentialsError(refusal)
        return public

    def check(self) -> ec.EllipticCurvePublicKey:
        """Read the certificate and the revocation list now; the key, or CredentialsError
        (RecipientRevoked when the list names the certificate)."""
        now = self.clock()
        with self._lock:
            held, held_digest = self.public_key, self.fingerprint
        public, refusal, digest = None, '', ''
        try:
            pem = keys.read_small(self.cert_path)
            digest = keys.fingerprint(pem)
            if digest in keys.read_revocations(self.keys_dir):   # unreadable: CredentialsError
                raise RecipientRevoked(f'the certificate at {self.cert_path} was revoked '
                                       '(revoked.json)')
            _, role = keys.identity_of(pem, self.ca_pem, datetime.datetime.fromtimestamp(
                now, datetime.timezone.utc))
            if role != self.role:
                raise CredentialsError(f'its role is {role}, not {self.role}')
            # the same certificate keeps the same key object: a change is a change of certificate
            public = held if held is not None and digest == held_digest else recipient_key(pem)
        except (OSError, ValueError, OverflowError, CredentialsError) as exc:
            refusal = str(exc)[:300] or type(exc).__name__
            error = exc if isinstance(exc, CredentialsError) else CredentialsError(refusal)
        with self._lock:
            self._checked_at = now
            self.public_key, self.refusal, self.fingerprint = public, refusal, digest
        if public is None:
            raise error
        return public
