"""keys.KnownCertificates against a stranger who varies what it sends (review findings): a
certificate is known by its DER, never by its PEM text; failures, other good certificates and
the keys folder's members are kept apart, each bounded; and the cache holds under threads (the
cloud tier's Zenoh callbacks). Real certificates from the project's own authority code."""
from __future__ import annotations

import base64
import datetime
import random
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from harness import run_threads
from loom_ros.security import keys


class Clock:
    def __init__(self):
        self.now = datetime.datetime.now(datetime.timezone.utc).timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope='module')
def fleet(tmp_path_factory):
    """A fleet folder with twelve members, and another authority's `ops` (a stranger)."""
    root = tmp_path_factory.mktemp('fleet')
    keys.init_ca(root)
    members = {f'robot{i}': keys.issue(root, f'robot{i}', 'robot') for i in range(10)}
    members['ops'] = keys.issue(root, 'ops', 'operator')
    members['cloud'] = keys.issue(root, 'cloud', 'cloud')
    other = tmp_path_factory.mktemp('other')
    keys.init_ca(other)
    return root, members, keys.issue(other, 'ops', 'operator')


def variants(pem: bytes, count: int) -> list[bytes]:
    """`count` different PEM texts of the same certificate: text before the block, other line
    lengths, CRLF, spaces; a PEM reader (and the old cache's digest) took each as new bytes."""
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    body = base64.b64encode(der)
    out = []
    for i in range(count):
        width = 16 + 4 * (i % 13)
        lines = [body[j:j + width] for j in range(0, len(body), width)]
        newline = b'\r\n' if i % 2 else b'\n'
        text = (b'-----BEGIN CERTIFICATE-----' + newline + newline.join(lines) + newline
                + b'-----END CERTIFICATE-----' + newline)
        out.append(f'junk {i}\n'.encode() + b' ' * (i % 3) + text)
    assert len(set(out)) == count
    return out


def forged_copies(pem: bytes, count: int) -> list[bytes]:
    """`count` distinct certificates that read as a member's but whose authority signature does
    not hold (a byte of the signature changed): each a new DER, each a failed CA check."""
    der = bytearray(x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER))
    out = []
    for i in range(count):
        copy = bytearray(der)
        copy[-1 - i % 8] ^= 1 + i // 8
        out.append(x509.load_der_x509_certificate(bytes(copy))
                   .public_bytes(serialization.Encoding.PEM))
    assert len(set(out)) == count
    return out


def test_a_bad_certificate_written_many_ways_costs_one_check(fleet):
    """Finding 2a: failures were remembered by the PEM's digest, so the stranger's certificate
    with other text around it each time was checked each time and emptied the shared budget
    for new certificates: a new robot was then refused as busy."""
    root, members, stranger = fleet
    certs = keys.KnownCertificates((root / 'ca.pem').read_bytes(), new_per_s=0.001,
                                   new_burst=5, clock=Clock())
    for pem in variants(stranger.cert_pem(), 200):
        with pytest.raises(keys.CredentialsError, match='not issued'):
            certs.get(pem)
    assert certs.checked == 1 and certs.refused_busy == 0
    assert certs.get(members['robot3'].cert_pem()).name == 'robot3'   # the budget is whole


def test_pem_variants_of_a_member_do_not_evict_the_known_ones(fleet):
    """Finding 2b: every PEM text of a known certificate took a cache entry of its own, so the
    public certificate of one member, sent written 100 ways, evicted the others, which then
    needed the new-certificate budget again."""
    root, members, _ = fleet
    certs = keys.KnownCertificates((root / 'ca.pem').read_bytes(), size=4, new_per_s=0.001,
                                   new_burst=4, clock=Clock())
    four = [members[f'robot{i}'] for i in range(4)]
    assert [certs.get(m.cert_pem()).name for m in four] == [m.name for m in four]
    for pem in variants(members['robot0'].cert_pem(), 100):
        assert certs.get(pem).name == 'robot0'
    assert [certs.get(m.cert_pem()).name for m in four] == [m.name for m in four]
    assert certs.checked == 4 and certs.refused_busy == 0


def test_failures_are_kept_apart_and_bounded(fleet):
    """Distinct bad certificates (each a new DER: checked once, at the budget's rate) fill only
    the bounded failure memory, least recently used first; known good ones stay known."""
    root, members, _ = fleet
    clock = Clock()
    certs = keys.KnownCertificates((root / 'ca.pem').read_bytes(), size=2, bad_size=8,
                                   new_per_s=1000.0, new_burst=1000.0, clock=clock)
    assert certs.get(members['ops'].cert_pem()).name == 'ops'
    forged = forged_copies(members['ops'].cert_pem(), 40)
    for pem in forged:
        with pytest.raises(keys.CredentialsError, match='not issued'):
            certs.get(pem)
    assert certs.checked == 41
    for pem in forged[-8:]:                    # remembered: no new check
        with pytest.raises(keys.CredentialsError, match='not issued'):
            certs.get(pem)
    assert certs.checked == 41
    with pytest.raises(keys.CredentialsError, match='not issued'):
        certs.get(forged[0])                   # forgotten: the memory holds 8
    assert certs.checked == 42
    assert certs.get(members['ops'].cert_pem()).name == 'ops' and certs.checked == 42


def test_the_keys_folders_members_never_wait_for_the_new_certificate_budget(fleet, tmp_path):
    """Preloaded from the keys folder: a stranger's flood of new certificates spends the budget
    for checking new ones, and every member still passes (and is never evicted)."""
    root, members, stranger = fleet
    certs = keys.KnownCertificates((root / 'ca.pem').read_bytes(), size=1, new_per_s=0.001,
                                   new_burst=2, clock=Clock())
    (root / 'junk').mkdir(exist_ok=True)
    (root / 'junk' / 'cert.pem').write_bytes(b'not a certificate')   # skipped
    assert certs.preload(root) == len(members)
    assert certs.preload(tmp_path / 'none') == 0
    for pem in [stranger.cert_pem()] + forged_copies(members['ops'].cert_pem(), 5):
        with pytest.raises(keys.CredentialsError, match='not issued|busy'):
            certs.get(pem)
    assert certs.refused_busy == 4 and certs.checked == 2
    for name, member in members.items():
        for pem in [member.cert_pem()] + variants(member.cert_pem(), 3):
            assert certs.get(pem).name == name
    assert certs.checked == 2 and certs.refused_busy == 4


def test_hostile_pem_is_unreadable_before_any_check(fleet):
    root, members, _ = fleet
    certs = keys.KnownCertificates((root / 'ca.pem').read_bytes(), clock=Clock())
    pem = members['ops'].cert_pem()
    headers = pem.replace(b'-----\n', b'-----\nProc-Type: 4,ENCRYPTED\n\n', 1)
    for bad in (b'', 'text', b'x' * (keys.MAX_CERT_BYTES + 1), pem[:-30], headers,
                b'-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n',
                b'-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n'):
        with pytest.raises(keys.CredentialsError):
            certs.get(bad)
        with pytest.raises(keys.CredentialsError):
            keys.identity_of(bad, (root / 'ca.pem').read_bytes())
    assert certs.checked == 0


def test_many_threads_get_the_right_answers(fleet):
    """Finding 3: the cache had no lock and the cloud tier calls it from Zenoh's callback
    threads: concurrent lookups and evictions raised KeyError, and a valid request was refused
    as `internal`. Eight threads, members, PEM variants, forged copies and a stranger, maps
    small enough to evict all the time: every answer right, no other exception."""
    root, members, stranger = fleet
    certs = keys.KnownCertificates((root / 'ca.pem').read_bytes(), size=3, bad_size=3,
                                   new_per_s=1e9, new_burst=1e9, clock=Clock())
    good = [(pem, name) for name, m in members.items()
            for pem in [m.cert_pem()] + variants(m.cert_pem(), 2)]
    bad = [(pem, None) for pem in forged_copies(members['ops'].cert_pem(), 12)
           + variants(stranger.cert_pem(), 4)]
    signature = keys.sign(members['ops'], b'stop')
    wrong: list = []
    start = threading.Barrier(8)

    def hammer(seed: int) -> None:
        pick = random.Random(seed)
        start.wait()
        for _ in range(1500):
            pem, name = pick.choice(good + bad)
            try:
                if name == 'ops' and pick.random() < 0.3:
                    got = certs.verify(pem, b'stop', signature).name
                else:
                    got = certs.get(pem).name
            except keys.CredentialsError as exc:
                if name is not None or 'not issued' not in str(exc):
                    wrong.append((name, repr(exc)))
                continue
            except Exception as exc:   # noqa: BLE001  (what the finding saw: KeyError)
                wrong.append((name, repr(exc)))
                continue
            if got != name:
                wrong.append((name, got))

    run_threads(hammer, 8)
    assert wrong == []
    assert len(certs._known) <= 3 and len(certs._bad) <= 3
