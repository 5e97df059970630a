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
    revoked.json                certificates no longer trusted (SHA-256 of their DER), owner-only
    <name>/cert.pem key.pem     one identity; ca.pem is all a peer needs to check it

A folder holding ca.pem without ca.key (a robot's, a cloud server's) checks certificates and
never issues: nothing here makes a new authority next to an existing half of one, nor replaces
an existing key.pem, without `force`. The keys folder and its identity folders must be this
user's (or root's) and not writable by group or others (Loom makes them 0700); private keys
must be owner-only (chmod 600) to be used. Key and certificate files are read bounded, never
through a link and never unless regular (a FIFO or a device there is refused, not waited on);
every file is written to a new file and renamed.

Revocation (`revoke`; `issue(force=True)` revokes the certificate it replaces) goes in
revoked.json. What reads it: `load`, `list_identities` (so `loom keys list` and the router's
access control drop a revoked identity's name) and `KnownCertificates` (the cloud tier's and the
bridge's message checks, which re-read it when it changes). Zenoh's TLS itself cannot be told:
its config has no revocation list, and its access control matches a certificate's common name
only, so a router refuses a revoked certificate only while no valid one of that name is in its
keys folder.
"""
from __future__ import annotations

import binascii
import datetime
import errno
import fcntl
import hashlib
import ipaddress
import json
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
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
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
MAX_KEY_FILE_BYTES = 64 * 1024   # a key or certificate file larger than this is not one
MAX_REVOKED_BYTES = 4 * 1024 * 1024
MAX_DAYS = 3650
REVOKED_FILE = 'revoked.json'
REVOCATION_CHECK_S = 1.0   # how often a running checker looks whether revoked.json changed
_FINGERPRINT = re.compile(r'[0-9a-f]{64}\Z')


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
        return _read_file(self.cert, 'certificate', MAX_CERT_BYTES)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return _load_private_key(self.key, 'private key')


def keys_path(keys_dir: str | Path = DEFAULT_KEYS_DIR) -> Path:
    return Path(os.path.expanduser(str(keys_dir)))


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise CredentialsError(f'identity name {name!r}: use 1-64 letters, digits, _ or -, '
                               'starting with a letter or digit')
    return name


def _check_days(days) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise CredentialsError(f'validity of {days!r} days: use 1 to {MAX_DAYS}')
    return days


def _owned(st: os.stat_result) -> bool:
    return st.st_uid in (os.geteuid(), 0)


def check_folder(path: Path) -> None:
    """CredentialsError unless `path` is a folder of this user's (or root's) that group and
    others cannot write to: anyone who can write there can swap in an authority of their own,
    or links that turn a write here into one elsewhere (what Loom makes is 0700; reading it is
    not refused, its private keys being owner-only files). OSError (FileNotFoundError) when it
    is not there."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CredentialsError(f'{path} is not a folder')
    if not _owned(st):
        raise CredentialsError(f'{path} belongs to uid {st.st_uid}, not to you (uid '
                               f'{os.geteuid()}): another user could have put an authority of '
                               'their own there; use a keys folder of your own')
    if st.st_mode & 0o022:
        raise CredentialsError(f'{path} is writable by group or others (mode '
                               f'{stat.S_IMODE(st.st_mode):o}): run `chmod 700 {path}`')


def _make_folder(path: Path) -> None:
    """`path` and every missing folder above it, each made 0700 (whatever the umask)."""
    missing = []
    at = path
    while not os.path.lexists(at) and at != at.parent:
        missing.append(at)
        at = at.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:   # made meanwhile: checked by the caller like any other
            continue
        os.chmod(folder, 0o700)


def _read_file(path: Path, what: str, limit: int = MAX_KEY_FILE_BYTES, *,
               private: bool = False) -> bytes:
    """A key or certificate file: never through a link, only a regular file (a FIFO is refused,
    not waited on: opened non-blocking), at most `limit` bytes (a larger one is refused unread).
    `private`: also owned by this user (or root) and owner-only. FileNotFoundError when absent;
    CredentialsError for anything else wrong with it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CredentialsError(f'{path} is a link: the {what} must be a file of its '
                                   'own') from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CredentialsError(f'{path} is not a regular file (the {what})')
        if st.st_size > limit:
            raise CredentialsError(f'{path} is {st.st_size} bytes: too large (the {what} is at '
                                   f'most {limit // 1024} KiB)')
        if private and not _owned(st):
            raise CredentialsError(f'{path} belongs to uid {st.st_uid}, not to you: the {what} '
                                   'must be your own')
        if private and st.st_mode & 0o077:
            raise CredentialsError(f'{path} is readable by group or others (mode '
                                   f'{stat.S_IMODE(st.st_mode):o}): run `chmod 600 {path}` '
                                   'and consider it exposed')
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise CredentialsError(f'{path} is too large (the {what} is at most '
                                   f'{limit // 1024} KiB)')
        return b''.join(chunks)
    finally:
        os.close(fd)


def _load_private_key(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    """An unencrypted ECDSA private key from an owner-only file; CredentialsError otherwise
    (FileNotFoundError when absent)."""
    data = _read_file(path, what, private=True)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CredentialsError(f'{path} is encrypted (passphrase-protected): Loom reads '
                               'unencrypted keys, kept owner-only') from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CredentialsError(f'{path} is not a readable {what}: {str(exc)[:200]}') from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f'{path} is not an ECDSA key ({type(key).__name__[:40]}): '
                               'Loom\'s keys are ECDSA P-256, as `loom keys init` and `issue` '
                               'make them')
    return key


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """`data` at `path` with `mode`: written to a new file (never through a link, never into an
    older file's looser mode, which O_TRUNC kept on --force), then renamed over `path` (a link
    there is replaced, not followed)."""
    tmp = path.with_name(f'.{path.name}.{secrets.token_hex(8)}.tmp')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        with os.fdopen(fd, 'wb') as out:
            os.fchmod(out.fileno(), mode)   # whatever the umask
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_private(path: Path, data: bytes) -> None:
    """A private key, the owner's only (_write_atomic)."""
    _write_atomic(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    """A certificate: written like a private key (a link at `path` is replaced, not followed)."""
    _write_atomic(path, data, 0o644)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def init_ca(keys_dir: str | Path = DEFAULT_KEYS_DIR, *, days: int = 3650,
            force: bool = False) -> Path:
    """Create the authority (ca.pem, ca.key); an existing one is kept (checked: readable, the
    key owner-only and ca.pem's) unless `force`. Half of one (ca.pem alone: a robot's folder;
    ca.key alone: a lost certificate) is never replaced without `force`: CredentialsError
    naming the missing file. The folder is made 0700 and must be this user's and closed."""
    days = _check_days(days)
    root = keys_path(keys_dir)
    _make_folder(root)
    check_folder(root)
    ca_pem, ca_key = root / 'ca.pem', root / 'ca.key'
    has_pem, has_key = os.path.lexists(ca_pem), os.path.lexists(ca_key)
    if not force:
        if has_pem and has_key:
            _load_ca(root)
            return ca_pem
        if has_pem:
            raise CredentialsError(
                f'{ca_pem} is here without {ca_key.name}: a folder that checks certificates (a '
                'robot\'s, a server\'s) and issues none; issue where ca.key is kept. Nothing '
                'was changed (--force makes a NEW authority: every certificate the old one '
                'issued stops being trusted)')
        if has_key:
            raise CredentialsError(
                f'{ca_key} is here without {ca_pem.name}: restore ca.pem from a copy (robots '
                'and servers hold one). Nothing was changed (--force makes a NEW authority)')
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
    _write_public(ca_pem, cert.public_bytes(serialization.Encoding.PEM))
    return ca_pem


def issue(keys_dir: str | Path, name: str, role: str, *, days: int = 825,
          hosts: tuple[str, ...] = ('localhost', '127.0.0.1'), force: bool = False,
          serve: bool | None = None) -> Identity:
    """An identity signed by the authority: CN=name, OU=role, a TLS client (Zenoh's mutual TLS)
    and a message signer. `serve` (default: routers only) also makes it a TLS server at `hosts`,
    which a peer that listens needs. An existing one is kept unless `force`; asking to serve
    with one that cannot is an error (reissue it). Half of one (cert.pem or key.pem alone) is
    never replaced without `force`. With `force`, the certificate replaced (when this
    authority's) is revoked first (revoked.json): its key no longer speaks for `name`."""
    _check_name(name)
    if role not in ROLES:
        raise CredentialsError(f'role {role!r}: one of {", ".join(ROLES)}')
    days = _check_days(days)
    serve = role == 'router' if serve is None else bool(serve)
    root = keys_path(keys_dir)
    if not os.path.lexists(root):
        raise CredentialsError(f'no certificate authority in {root} (ca.pem missing): run '
                               '`loom keys init` first')
    check_folder(root)
    ca_cert, ca_key = _load_ca(root)
    folder = root / name
    if os.path.lexists(folder):
        check_folder(folder)
    cert_path, key_path = folder / 'cert.pem', folder / 'key.pem'
    has_cert, has_key = os.path.lexists(cert_path), os.path.lexists(key_path)
    if has_cert != has_key and not force:
        there, gone = (cert_path, key_path) if has_cert else (key_path, cert_path)
        raise CredentialsError(f'{there} is here without {gone.name}: nothing was replaced; '
                               f'restore {gone.name}, or add --force to give {name} a new key '
                               'and certificate (the old certificate is then revoked)')
    if has_cert and has_key and not force:
        found = load(root, name)
        if found.role != role:
            raise CredentialsError(f'identity {name!r} exists with role {found.role!r}, not '
                                   f'{role!r} (use force to reissue)')
        if serve and not can_serve(found):
            raise CredentialsError(f'identity {name!r} exists without the right to serve TLS '
                                   '(use force to reissue it with serve)')
        return found
    if has_cert:   # force: what it replaces no longer speaks for `name`
        _revoke_replaced(root, cert_path, ca_cert, name)
    _make_folder(folder)
    check_folder(folder)
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
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return Identity(name, role, cert_path, key_path, root / 'ca.pem')


def _revoke_replaced(root: Path, cert_path: Path, ca_cert, name: str) -> None:
    """Revoke the certificate at `cert_path` before it is replaced, when it is this authority's
    (another's, or garbage, is trusted by no one here: nothing to revoke). The revocation list
    is written before anything is replaced: if that fails, nothing is."""
    try:
        der = certificate_der(_read_file(cert_path, 'certificate', MAX_CERT_BYTES))
        cert = _load_der(der)
        _check_issued_by(cert, ca_cert)
    except (CredentialsError, OSError):
        return
    _add_revocation(root, _revocation_entry(der, cert, 'reissued'))


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
    has no readable authority. A certificate in the folder's revocation list is listed as
    revoked; every one is, as unverifiable, when that list is unreadable (fail closed)."""
    root = keys_path(keys_dir)
    try:
        ca = _read_file(root / 'ca.pem', 'authority certificate', MAX_CERT_BYTES)
    except CredentialsError as exc:
        raise OSError(str(exc)) from None
    try:
        revoked, revoked_error = read_revocations(root), ''
    except (CredentialsError, OSError) as exc:
        revoked, revoked_error = {}, f'revocation list unreadable: {str(exc)[:160]}'
    out = []
    for cert in sorted(root.glob('*/cert.pem'))[:limit]:
        folder = cert.parent.name
        try:
            pem = read_small(cert)
            name, role = identity_of(pem, ca)
            if revoked_error:
                raise CredentialsError(revoked_error)
            entry = revoked.get(_sha256(certificate_der(pem)).hex())
            if entry is not None:
                raise CredentialsError(f'revoked ({str(entry.get("reason", ""))[:20]} '
                                       f'{str(entry.get("revoked_at", ""))[:32]})')
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
    """An identity issued before; a clear error naming the missing file otherwise. Its folders
    must be this user's and not writable by others, and its certificate not revoked (in this
    folder's revocation list). Its key is checked (owner-only, ECDSA) when it is read to sign
    (Identity.private_key)."""
    _check_name(name)
    root = keys_path(keys_dir)
    folder = root / name
    for path in (root / 'ca.pem', folder / 'cert.pem', folder / 'key.pem'):
        if not os.path.lexists(path):
            raise CredentialsError(f'{path} is missing: run `loom keys init` and '
                                   f'`loom keys issue {name} --role ROLE` (robot, router, cloud or '
                                   'operator; or `loom bringup` once, which makes local '
                                   'credentials)')
    check_folder(root)
    check_folder(folder)
    if not stat.S_ISREG(os.lstat(folder / 'key.pem').st_mode):   # zenoh opens it by path
        raise CredentialsError(f'{folder / "key.pem"} is not a regular file (a link, a FIFO?)')
    try:
        cert_pem = _read_file(folder / 'cert.pem', 'certificate', MAX_CERT_BYTES)
        name_, role = identity_of(cert_pem, _read_file(root / 'ca.pem', 'authority certificate',
                                                       MAX_CERT_BYTES))
    except FileNotFoundError as exc:   # removed meanwhile
        raise CredentialsError(f'{exc.filename} is missing') from None
    entry = read_revocations(root).get(_sha256(certificate_der(cert_pem)).hex())
    if entry is not None:
        raise CredentialsError(f'the certificate of {name_} in {folder} was revoked '
                               f'({str(entry.get("revoked_at", ""))[:32]}): issue a new one where '
                               f'ca.key is kept (`loom keys issue {name_} --role {role} --force`)')
    return Identity(name_, role, folder / 'cert.pem', folder / 'key.pem', root / 'ca.pem')


def ensure_local(keys_dir: str | Path, identities: dict[str, str]) -> dict[str, Identity]:
    """The authority and every {name: role} identity, made on first use (loopback set-ups): an
    empty (or absent) folder gets all of them. A folder with ca.pem but no ca.key (a robot's)
    never gets an authority of its own: its identities are used as they are, and any missing is
    a CredentialsError naming them. ca.key without ca.pem is an error too (init_ca)."""
    root = keys_path(keys_dir)
    if os.path.lexists(root / 'ca.pem') and not os.path.lexists(root / 'ca.key'):
        check_folder(root)
        found, missing = {}, []
        for name, role in identities.items():
            if not os.path.lexists(root / _check_name(name) / 'cert.pem'):
                missing.append(name)
                continue
            ident = load(root, name)
            if ident.role != role:
                raise CredentialsError(f'identity {name!r} in {root} has role {ident.role!r}, '
                                       f'not {role!r}')
            found[name] = ident
        if missing:
            raise CredentialsError(
                f'{root} holds ca.pem without ca.key (a robot\'s folder), so no identity is made '
                f'here; missing: {", ".join(missing)}. Issue them where ca.key is kept (`loom '
                'keys issue NAME --role ROLE`) and copy NAME/cert.pem and key.pem here')
        return found
    init_ca(root)
    return {name: issue(root, name, role) for name, role in identities.items()}


def _load_ca(root: Path):
    """The authority's certificate and key: both readable, the key owner-only, ECDSA and the
    certificate's own. CredentialsError naming what is missing or wrong."""
    try:
        data = _read_file(root / 'ca.pem', 'authority certificate', MAX_CERT_BYTES)
    except FileNotFoundError:
        raise CredentialsError(f'no certificate authority in {root} (ca.pem missing): run '
                               '`loom keys init` first') from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CredentialsError(f'the certificate authority in {root} is unreadable: '
                               f'{str(exc)[:200]}') from None
    try:
        key = _load_private_key(root / 'ca.key', 'authority key')
    except FileNotFoundError:
        raise CredentialsError(f'{root / "ca.key"} is missing: this folder checks certificates '
                               'and cannot issue them; issue where ca.key is kept (keep it off '
                               'robots)') from None
    if key.public_key() != cert.public_key():
        raise CredentialsError(f'{root / "ca.key"} is not the key of {root / "ca.pem"}')
    return cert, key


def fingerprint(cert_pem: bytes) -> str:
    """The SHA-256 of a certificate's DER, hex: what revocation lists it by."""
    return _sha256(certificate_der(cert_pem)).hex()


def _revocation_entry(der: bytes, cert, reason: str) -> dict:
    try:
        name, role = _name_and_role(cert)
    except CredentialsError:
        name, role = '', ''
    return {'sha256': _sha256(der).hex(), 'serial': format(cert.serial_number, 'x'),
            'name': name, 'role': role,
            'not_after': cert.not_valid_after_utc.isoformat(timespec='seconds'),
            'revoked_at': _now().isoformat(timespec='seconds'), 'reason': reason}


def read_revocations(keys_dir: str | Path) -> dict[str, dict]:
    """The keys folder's revocation list, {SHA-256 hex of DER: entry}; {} when there is none.
    CredentialsError when it is there and unreadable (its reader should then trust no one)."""
    return _read_revocation_file(keys_path(keys_dir) / REVOKED_FILE)


def _read_revocation_file(path: Path) -> dict[str, dict]:
    try:
        data = _read_file(path, 'revocation list', MAX_REVOKED_BYTES)
    except FileNotFoundError:
        return {}
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise CredentialsError(f'{path} is not JSON: {str(exc)[:100]}') from None
    entries = doc.get('revoked') if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise CredentialsError(f'{path}: expected {{"revoked": [...]}}')
    out = {}
    for entry in entries:
        digest = entry.get('sha256') if isinstance(entry, dict) else None
        if not isinstance(digest, str) or not _FINGERPRINT.match(digest):
            raise CredentialsError(f'{path}: an entry without a sha256 fingerprint')
        out[digest] = entry
    return out


def _add_revocation(root: Path, entry: dict) -> dict:
    """Add `entry` to the folder's revocation list (one writer at a time: a lock on the folder;
    owner-only; written to a new file and renamed). Entries past their certificate's end are
    dropped: an expired certificate is refused anyway. Returns the entry listed."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        current = read_revocations(root)
        if entry['sha256'] in current:
            return current[entry['sha256']]
        now = _now().isoformat(timespec='seconds')
        kept = [e for e in current.values() if str(e.get('not_after', '9')) >= now]
        text = json.dumps({'version': 1, 'revoked': kept + [entry]}, indent=1,
                          sort_keys=True).encode() + b'\n'
        if len(text) > MAX_REVOKED_BYTES:
            raise CredentialsError('the revocation list is full: make a new authority')
        _write_atomic(root / REVOKED_FILE, text, 0o600)
        return entry
    finally:
        os.close(fd)   # and the lock with it


def revoke(keys_dir: str | Path, name: str | None = None, *,
           cert_pem: bytes | None = None) -> dict:
    """Revoke identity `name`'s current certificate (`<name>/cert.pem`), or the certificate
    `cert_pem` (a copy kept of one since replaced or deleted), in the keys folder's revocation
    list; returns its entry. Only ca.pem is needed (a cloud server's folder can revoke too): the
    certificate must be this authority's, expired or not. Its files are left in place."""
    root = keys_path(keys_dir)
    if not os.path.lexists(root):
        raise CredentialsError(f'no keys folder at {root}')
    check_folder(root)
    try:
        ca = x509.load_pem_x509_certificate(_read_file(root / 'ca.pem', 'authority certificate',
                                                       MAX_CERT_BYTES))
    except FileNotFoundError:
        raise CredentialsError(f'no certificate authority in {root} (ca.pem missing)') from None
    except ValueError as exc:
        raise CredentialsError(f'{root / "ca.pem"} is unreadable: {str(exc)[:200]}') from None
    if cert_pem is None:
        path = root / _check_name(name) / 'cert.pem'
        if os.path.lexists(path.parent):
            check_folder(path.parent)
        try:
            cert_pem = _read_file(path, 'certificate', MAX_CERT_BYTES)
        except FileNotFoundError:
            raise CredentialsError(f'{path} is missing: nothing to revoke (a copy of the '
                                   'certificate can be revoked with --cert FILE)') from None
    der = certificate_der(cert_pem)
    cert = _load_der(der)
    _check_issued_by(cert, ca)
    entry = _revocation_entry(der, cert, 'revoked')
    if name is not None and entry['name'] != name:
        raise CredentialsError(f'the certificate names {entry["name"][:64]!r}, not {name!r}')
    return _add_revocation(root, entry)


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
    callbacks): the lock covers the maps and the budget, not the parse, CA check or signature.

    Revocation: once `watch_revocations` (or `preload`) names the keys folder, a certificate in
    its revocation list (revoked.json) is refused whichever map knows it, and the list is looked
    at again (a stat) at most every `revocation_check_s` and re-read when it changed. While it
    is unreadable no certificate is accepted (fail closed). Looks are timed by the injected clock
    (a clock that went back looks at once)."""

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
        self.revocation_check_s = REVOCATION_CHECK_S
        self._revoked: frozenset[bytes] = frozenset()   # DER digests
        self._revocations: Path | None = None
        self._revocations_seen: object = None    # the list's stat when last read
        self._revocations_error = ''
        self._revocations_looked = None          # the injected clock at the last look

    def watch_revocations(self, keys_dir: str | Path) -> int:
        """Refuse the certificates in the keys folder's revocation list from now on (re-read when
        it changes). Returns how many it lists; CredentialsError when it is unreadable."""
        self._revocations = keys_path(keys_dir) / REVOKED_FILE
        with self._lock:
            self._revocations_looked, self._revocations_seen = None, None
        self._refresh_revocations()
        if self._revocations_error:
            raise CredentialsError(self._revocations_error)
        return len(self._revoked)

    def _refresh_revocations(self) -> None:
        path = self._revocations
        if path is None:
            return
        now = self.clock()
        with self._lock:
            last = self._revocations_looked
            # a clock that went back (the wall clock stepped) looks at once
            if last is not None and 0 <= now - last < self.revocation_check_s:
                return
            self._revocations_looked = now
        try:
            st = os.lstat(path)
            seen: object = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            seen = 'absent'
        except OSError as exc:
            seen = f'error: {exc}'
        if seen == self._revocations_seen:
            return
        try:
            revoked = frozenset(bytes.fromhex(d) for d in _read_revocation_file(path))
            error = ''
        except (CredentialsError, OSError) as exc:
            revoked = self._revoked
            error = f'revocation list unreadable, no certificate is accepted: {str(exc)[:200]}'
        with self._lock:
            self._revoked, self._revocations_error = revoked, error
            self._revocations_seen = seen

    def preload(self, keys_dir: str | Path, limit: int = 1024) -> int:
        """Know the certificates of the keys folder (`<name>/cert.pem`, at most `limit`) that the
        authority signed, outside the new-certificate budget and for good: a flood of strangers'
        certificates cannot make a member wait. Others are skipped (checked like any new one if
        they come). Revoked ones are skipped, and the folder's revocation list is watched from
        now on (watch_revocations; CredentialsError when it is unreadable). Returns how many
        are known."""
        self.watch_revocations(keys_dir)
        loaded = 0
        for path in sorted(keys_path(keys_dir).glob('*/cert.pem'))[:limit]:
            try:
                der = certificate_der(read_small(path))
                if _sha256(der) in self._revoked:
                    continue
                known = self._identify(_load_der(der))
            except (OSError, CredentialsError):
                continue
            with self._lock:
                self._members[_sha256(der)] = known
            loaded += 1
        return loaded

    def get(self, cert_pem: bytes) -> KnownCertificate:
        """The certificate's identity, valid now and not revoked; CredentialsError otherwise."""
        der = certificate_der(cert_pem)
        key = _sha256(der)
        self._refresh_revocations()
        with self._lock:
            if self._revocations_error:
                raise CredentialsError(self._revocations_error)
            if key in self._revoked:
                known = self._members.get(key) or self._known.get(key)
                raise CredentialsError(f'certificate{" of " + known.name if known else ""} '
                                       'revoked')
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
