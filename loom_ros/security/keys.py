"""Fleet credentials: a small certificate authority and one identity (an ECDSA P-256 key and an
X.509 certificate) per robot, Zenoh router and cloud server, made with `cryptography`.

The certificate's common name is the identity's name (a robot id, `router`, `cloud`), which
Zenoh's access control matches (`cert_common_names`); its organizational unit is the role. The
same keys sign application messages (cloud replies, inbound commands), so a receiver knows who
spoke even through a shared router.

Only an identity that serves TLS (a router; a peer that listens, issued with `serve`) gets the
serverAuth usage and the host names it is reached at: Zenoh's TLS client (rustls) refuses a
server certificate without it, so a robot's or an operator's credentials cannot stand in for
the router to another member. Layout under `keys_dir` (default `~/.loom/keys`, mode 0700):

    ca.pem  ca.key              the authority (keep ca.key off robots in a real fleet)
    <name>/cert.pem key.pem     one identity; ca.pem is all a peer needs to check it
"""
from __future__ import annotations

import binascii
import datetime
import hashlib
import ipaddress
import os
import re
import secrets
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from loom_ros.security.ratelimit import TokenBucket

DEFAULT_KEYS_DIR = '~/.loom/keys'
ROLES = ('robot', 'router', 'cloud', 'operator')
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_\-]{0,63}\Z')
MAX_CERT_BYTES = 16 * 1024   # a certificate sent along with a message is bounded before parsing
_PEM_BEGIN, _PEM_END = b'-----BEGIN CERTIFICATE-----', b'-----END CERTIFICATE-----'
_BASE64 = re.compile(rb'[A-Za-z0-9+/]+={0,2}\Z')


class CredentialsError(RuntimeError):
    """Credentials that are missing, unreadable, not from this authority, or a bad name."""


@dataclass(frozen=True)
class Identity:
    name: str
    role: str
    cert: Path
    key: Path
    ca: Path

    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return serialization.load_pem_private_key(self.key.read_bytes(), password=None)


def keys_path(keys_dir: str | Path = DEFAULT_KEYS_DIR) -> Path:
    return Path(os.path.expanduser(str(keys_dir)))


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise CredentialsError(f'identity name {name!r}: use 1-64 letters, digits, _ or -, '
                               'starting with a letter or digit')
    return name


def _write_private(path: Path, data: bytes) -> None:
    """A private key, the owner's only: written to a new file (never through a link, never
    into an older file's looser mode, which O_TRUNC kept on --force), then renamed over `path`
    (a link there is replaced, not followed)."""
    tmp = path.with_name(f'.{path.name}.{secrets.token_hex(8)}.tmp')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, 'wb') as out:
            os.fchmod(out.fileno(), 0o600)   # whatever the umask
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def init_ca(keys_dir: str | Path = DEFAULT_KEYS_DIR, *, days: int = 3650,
            force: bool = False) -> Path:
    """Create the authority (ca.pem, ca.key); an existing one is kept unless `force`."""
    root = keys_path(keys_dir)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_pem, ca_key = root / 'ca.pem', root / 'ca.key'
    if ca_pem.exists() and ca_key.exists() and not force:
        return ca_pem
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'Loom fleet CA')])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_private(ca_key, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    ca_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca_pem


def issue(keys_dir: str | Path, name: str, role: str, *, days: int = 825,
          hosts: tuple[str, ...] = ('localhost', '127.0.0.1'), force: bool = False,
          serve: bool | None = None) -> Identity:
    """An identity signed by the authority: CN=name, OU=role, a TLS client (Zenoh's mutual TLS)
    and a message signer. `serve` (default: routers only) also makes it a TLS server at `hosts`,
    which a peer that listens needs. An existing one is kept unless `force`; asking to serve
    with one that cannot is an error (reissue it)."""
    _check_name(name)
    if role not in ROLES:
        raise CredentialsError(f'role {role!r}: one of {", ".join(ROLES)}')
    serve = role == 'router' if serve is None else bool(serve)
    root = keys_path(keys_dir)
    ca_cert, ca_key = _load_ca(root)
    folder = root / name
    if (folder / 'cert.pem').exists() and (folder / 'key.pem').exists() and not force:
        found = load(root, name)
        if found.role != role:
            raise CredentialsError(f'identity {name!r} exists with role {found.role!r}, not '
                                   f'{role!r} (use force to reissue)')
        if serve and not can_serve(found):
            raise CredentialsError(f'identity {name!r} exists without the right to serve TLS '
                                   '(use force to reissue it with serve)')
        return found
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    for host in hosts if serve else ():   # where a server is reached; a client is not checked
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if serve else []
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages + [ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(folder / 'key.pem', key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (folder / 'cert.pem').write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(name, role, folder / 'cert.pem', folder / 'key.pem', root / 'ca.pem')


def can_serve(identity: Identity) -> bool:
    """The identity's certificate allows TLS serving (serverAuth): a router, or `serve`."""
    with open(identity.cert, 'rb') as stream:   # OSError: the caller's to report
        pem = stream.read(MAX_CERT_BYTES + 1)
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return False
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:   # no usage named: TLS takes it for any (not Loom's own)
        return True
    return ExtendedKeyUsageOID.SERVER_AUTH in usage


def read_small(path: Path, limit: int = MAX_CERT_BYTES) -> bytes:
    """At most limit + 1 bytes of a regular file (more means too large to be a certificate).
    A folder's entries are anyone's to place: a FIFO would block a plain read for good and a
    link to /dev/zero would never end, so neither is read (OSError). Looked at before it is
    opened (opening some devices acts on them) and again once open (it may have been swapped)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f'{path.name} is not a regular file')
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f'{path.name} is not a regular file')
        with os.fdopen(fd, 'rb', closefd=False) as stream:
            return stream.read(limit + 1)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Listed:
    """One `<name>/cert.pem` of a keys folder: its identity, or why it is not one."""

    folder: str
    cert: Path
    identity: Identity | None
    problem: str = ''


def list_identities(keys_dir: str | Path, limit: int = 1024) -> list[Listed]:
    """Every `<name>/cert.pem` in the keys folder (at most `limit`, by name), each with its
    identity when the folder's authority signed it, it is valid now and it names its own
    folder, else with why not. What `signed_identities` trusts and `loom keys list` shows come
    from here, so the two never disagree. Only certificates are read. OSError when the folder
    has no readable authority."""
    root = keys_path(keys_dir)
    ca = (root / 'ca.pem').read_bytes()
    out = []
    for cert in sorted(root.glob('*/cert.pem'))[:limit]:
        folder = cert.parent.name
        try:
            name, role = identity_of(read_small(cert), ca)
        except CredentialsError as exc:
            out.append(Listed(folder, cert, None, str(exc)[:200]))
            continue
        except OSError as exc:
            out.append(Listed(folder, cert, None,
                              f'unreadable: {str(exc.strerror or exc)[:200]}'))
            continue
        if name != folder:   # moved or copied in: its name is not where it sits
            out.append(Listed(folder, cert, None,
                              f'the certificate names {name[:64]!r}, not its folder'))
            continue
        out.append(Listed(folder, cert, Identity(name, role, cert, cert.parent / 'key.pem',
                                                 root / 'ca.pem')))
    return out


def signed_identities(keys_dir: str | Path, limit: int = 1024) -> list[Identity]:
    """The identities in the keys folder whose certificates its authority signed and that are
    valid now, each in the folder of its own name (others are skipped; `list_identities` says
    why); at most `limit` folders are read. Only certificates are read: a router needs no
    member's private key. OSError when the folder has no readable authority."""
    return [entry.identity for entry in list_identities(keys_dir, limit)
            if entry.identity is not None]


def serving_non_routers(keys_dir: str | Path, limit: int = 1024) -> list[str]:
    """Names of the identities in the keys folder that may serve TLS without being routers
    (non_routers_serving); [] when the folder has no readable authority."""
    try:
        return non_routers_serving(signed_identities(keys_dir, limit))
    except OSError:
        return []


def non_routers_serving(identities: Iterable[Identity]) -> list[str]:
    """Names of those `identities` that may serve TLS without being routers: listening peers
    issued with `serve`, or identities made before only routers served (each can stand in for a
    router to a member that reaches its address)."""
    return [i.name for i in identities if i.role != 'router' and can_serve(i)]


def load(keys_dir: str | Path, name: str) -> Identity:
    """An identity issued before; a clear error naming the missing file otherwise."""
    _check_name(name)
    root = keys_path(keys_dir)
    folder = root / name
    for path in (root / 'ca.pem', folder / 'cert.pem', folder / 'key.pem'):
        if not path.is_file():
            raise CredentialsError(f'{path} is missing: run `loom keys init` and '
                                   f'`loom keys issue {name} --role ROLE` (robot, router, cloud or '
                                   'operator; or `loom bringup` once, which makes local '
                                   'credentials)')
    name_, role = identity_of((folder / 'cert.pem').read_bytes(), (root / 'ca.pem').read_bytes())
    return Identity(name_, role, folder / 'cert.pem', folder / 'key.pem', root / 'ca.pem')


def ensure_local(keys_dir: str | Path, identities: dict[str, str]) -> dict[str, Identity]:
    """The authority and every {name: role} identity, made on first use (loopback set-ups)."""
    init_ca(keys_dir)
    return {name: issue(keys_dir, name, role) for name, role in identities.items()}


def _load_ca(root: Path):
    try:
        cert = x509.load_pem_x509_certificate((root / 'ca.pem').read_bytes())
        key = serialization.load_pem_private_key((root / 'ca.key').read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise CredentialsError(f'no certificate authority in {root} ({exc.filename} missing): '
                               'run `loom keys init` first') from None
    except ValueError as exc:
        raise CredentialsError(f'the certificate authority in {root} is unreadable: {exc}') \
            from None
    return cert, key


def identity_of(cert_pem: bytes, ca_pem: bytes, now: datetime.datetime | None = None) \
        -> tuple[str, str]:
    """(name, role) of a certificate the authority signed and that is valid now; else
    CredentialsError. Bounded before parsing: it may come from a stranger."""
    cert = _load_der(certificate_der(cert_pem))
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise CredentialsError(f'unreadable certificate: {exc}') from None
    _check_issued_by(cert, ca)
    when = now or _now()
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise CredentialsError('certificate expired or not yet valid')
    return _name_and_role(cert)


def certificate_der(cert_pem: bytes) -> bytes:
    """The DER of a PEM certificate: what it is, whatever whitespace or text surrounds its block,
    so receivers know a certificate by it (never by its PEM text, which a sender can vary at
    will). Bounded before it is read; a block of anything but base64 (PEM headers included:
    Loom's certificates have none) is unreadable."""
    if not isinstance(cert_pem, (bytes, bytearray)) or len(cert_pem) > MAX_CERT_BYTES:
        raise CredentialsError('certificate missing or larger than 16 KiB')
    pem = bytes(cert_pem)
    start = pem.find(_PEM_BEGIN)
    end = pem.find(_PEM_END, start + len(_PEM_BEGIN)) if start >= 0 else -1
    if end < 0:
        raise CredentialsError('unreadable certificate: no PEM certificate block')
    body = b''.join(pem[start + len(_PEM_BEGIN):end].split())
    if not body or not _BASE64.match(body):
        raise CredentialsError('unreadable certificate: its PEM block is not base64')
    try:
        return binascii.a2b_base64(body, strict_mode=True)
    except binascii.Error as exc:
        raise CredentialsError(f'unreadable certificate: {exc}') from None


def _load_der(der: bytes):
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise CredentialsError(f'unreadable certificate: {str(exc)[:200]}') from None


def _check_issued_by(cert, ca) -> None:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CredentialsError('certificate not issued by this fleet\'s authority') from None


def _name_and_role(cert) -> tuple[str, str]:
    """The Loom name (common name) and role (organizational unit) a certificate states."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    roles = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not names or not roles or roles[0].value not in ROLES:
        raise CredentialsError('certificate without a Loom name and role')
    return str(names[0].value), str(roles[0].value)


def sign(identity: Identity, data: bytes) -> bytes:
    """An ECDSA-SHA256 signature of `data` by this identity's key."""
    return identity.private_key().sign(data, ec.ECDSA(hashes.SHA256()))


def verify(cert_pem: bytes, ca_pem: bytes, data: bytes, signature: bytes) -> tuple[str, str]:
    """(name, role) of who signed `data`, if the certificate is the fleet's and the signature its;
    else CredentialsError."""
    who = identity_of(cert_pem, ca_pem)
    if not isinstance(signature, (bytes, bytearray)) or len(signature) > 256:
        raise CredentialsError('signature missing or too long')
    public = _load_der(certificate_der(cert_pem)).public_key()
    try:
        public.verify(bytes(signature), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise CredentialsError(f'bad signature for {who[0]}') from None
    return who


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class KnownCertificate:
    """A fleet certificate the authority's signature was checked on: who, and its key."""

    name: str
    role: str
    public_key: object
    not_before: float   # POSIX seconds
    not_after: float


class KnownCertificates:
    """Certificates sent along with messages, checked against the authority once and then known
    by the digest of their DER (certificate_der: however the PEM is written, one key): a known one
    costs a base64 decode and a hash. Checking a new one (a parse and the CA's signature) is what a
    stranger can make a receiver pay for, so at most `new_per_s` (burst `new_burst`) are checked;
    past that a new certificate is refused as busy (CredentialsError) and known ones still pass.

    Three maps, each bounded, none able to evict another's entries: the fleet's members preloaded
    from the keys folder (`preload`; they never need the new-certificate budget and are never
    evicted), other good ones (`size`, least recently used go first) and failures (`bad_size`,
    least recently used go first; a failure is remembered by its DER, so the same bad certificate
    with other text around it costs no new check). Validity windows are re-checked on every use
    against the injected clock (POSIX seconds). Safe from several threads (the cloud tier's Zenoh
    callbacks): the lock covers the maps and the budget, not the parse, CA check or signature."""

    def __init__(self, ca_pem: bytes, *, size: int = 256, bad_size: int = 1024,
                 new_per_s: float = 50.0, new_burst: float = 100.0, clock=None):
        self.clock = clock or time.time
        try:
            self.ca = x509.load_pem_x509_certificate(bytes(ca_pem))
        except ValueError as exc:
            raise CredentialsError(f'unreadable authority certificate: {exc}') from None
        self.size, self.bad_size = int(size), int(bad_size)
        self._members: dict[bytes, KnownCertificate] = {}                  # DER digest -> known
        self._known: OrderedDict[bytes, KnownCertificate] = OrderedDict()  # DER digest -> known
        self._bad: OrderedDict[bytes, str] = OrderedDict()                 # DER digest -> why
        self._lock = threading.Lock()
        self._budget = TokenBucket(new_per_s, new_burst, self.clock)
        self.checked = self.refused_busy = 0

    def preload(self, keys_dir: str | Path, limit: int = 1024) -> int:
        """Know the certificates of the keys folder (`<name>/cert.pem`, at most `limit`) that the
        authority signed, outside the new-certificate budget and for good: a flood of strangers'
        certificates cannot make a member wait. Others are skipped (checked like any new one if
        they come). Returns how many are known."""
        loaded = 0
        for path in sorted(keys_path(keys_dir).glob('*/cert.pem'))[:limit]:
            try:
                der = certificate_der(read_small(path))
                known = self._identify(_load_der(der))
            except (OSError, CredentialsError):
                continue
            with self._lock:
                self._members[_sha256(der)] = known
            loaded += 1
        return loaded

    def get(self, cert_pem: bytes) -> KnownCertificate:
        """The certificate's identity, valid now; CredentialsError otherwise."""
        der = certificate_der(cert_pem)
        key = _sha256(der)
        with self._lock:
            known = self._members.get(key)
            if known is None:
                known = self._known.get(key)
                if known is not None:
                    self._known.move_to_end(key)   # most recently used last
                else:
                    why = self._bad.get(key)
                    if why is not None:
                        self._bad.move_to_end(key)
                        raise CredentialsError(why)
        if known is None:
            known = self._check(key, der)
        now = self.clock()
        if not known.not_before <= now <= known.not_after:
            raise CredentialsError(f'certificate of {known.name} expired or not yet valid')
        return known

    def _check(self, key: bytes, der: bytes) -> KnownCertificate:
        cert = _load_der(der)   # a parse that fails costs no CA check: not remembered
        with self._lock:
            if not self._budget.take():
                self.refused_busy += 1   # not remembered: it may be a member's, checked later
                raise CredentialsError('busy: too many new certificates to check; try again')
            self.checked += 1
        try:   # the same checks as identity_of; its validity window is read at every use
            known = self._identify(cert)
        except CredentialsError as exc:
            with self._lock:
                self._bad[key] = str(exc)
                self._bad.move_to_end(key)
                while len(self._bad) > self.bad_size:
                    self._bad.popitem(last=False)
            raise
        with self._lock:
            self._known[key] = known
            self._known.move_to_end(key)
            while len(self._known) > self.size:
                self._known.popitem(last=False)
        return known

    def _identify(self, cert) -> KnownCertificate:
        _check_issued_by(cert, self.ca)
        name, role = _name_and_role(cert)
        return KnownCertificate(name, role, cert.public_key(),
                                cert.not_valid_before_utc.timestamp(),
                                cert.not_valid_after_utc.timestamp())

    def verify(self, cert_pem: bytes, data: bytes, signature: bytes) -> KnownCertificate:
        """Who signed `data`: the certificate known (or checked) and the signature its key's."""
        known = self.get(cert_pem)
        if not isinstance(signature, (bytes, bytearray)) or len(signature) > 256:
            raise CredentialsError('signature missing or too long')
        try:
            known.public_key.verify(bytes(signature), data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise CredentialsError(f'bad signature for {known.name}') from None
        return known
