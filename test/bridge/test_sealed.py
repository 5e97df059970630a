"""Sealed payloads: only the recipient identity reads them; any change or truncation is refused."""
from __future__ import annotations

import pytest

from loom_ros.security import keys, sealed
from loom_ros.security.keys import CredentialsError


@pytest.fixture(scope='module')
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp('keys')
    keys.init_ca(root)
    return root, keys.issue(root, 'cloud', 'cloud'), keys.issue(root, 'robot2', 'robot')


def test_round_trip_with_aad_and_empty(fleet):
    root, cloud, _ = fleet
    for text in (b'', b'transcript: my PIN is 4321', bytes(range(256)) * 100):
        box = sealed.seal(cloud.cert_pem(), text, b'loom/robot1/speech', ca_pem=cloud.ca.read_bytes())
        assert text not in box or not text
        assert sealed.is_sealed(box) and len(box) == len(text) + sealed.OVERHEAD
        assert sealed.unseal(cloud, box, b'loom/robot1/speech') == text
    # fresh ephemeral key and nonce each time: the same plaintext never seals the same
    assert sealed.seal(cloud.cert_pem(), b'x') != sealed.seal(cloud.cert_pem(), b'x')


def test_wrong_recipient_refused(fleet):
    _, cloud, robot2 = fleet
    box = sealed.seal(cloud.cert_pem(), b'secret')
    with pytest.raises(CredentialsError):
        sealed.unseal(robot2, box)


def test_tampered_bytes_and_aad_refused(fleet):
    _, cloud, _ = fleet
    box = sealed.seal(cloud.cert_pem(), b'secret payload', b'aad')
    with pytest.raises(CredentialsError):
        sealed.unseal(cloud, box, b'other aad')
    for i in range(len(box)):
        changed = bytearray(box)
        changed[i] ^= 0x01
        with pytest.raises(CredentialsError):
            sealed.unseal(cloud, bytes(changed), b'aad')
    with pytest.raises(CredentialsError):
        sealed.unseal(cloud, box + b'\x00', b'aad')


def test_truncation_at_every_length_refused(fleet):
    _, cloud, _ = fleet
    box = sealed.seal(cloud.cert_pem(), b'twelve bytes')
    for length in range(len(box)):
        with pytest.raises(CredentialsError):
            sealed.unseal(cloud, box[:length])


def test_bounds_and_stranger_certificates(fleet, tmp_path):
    _, cloud, _ = fleet
    with pytest.raises(CredentialsError):
        sealed.unseal(cloud, b'\x00' * (sealed.MAX_SEALED_BYTES + 1))
    with pytest.raises(CredentialsError):
        sealed.seal(cloud.cert_pem(), b'x', b'a' * (sealed.MAX_AAD_BYTES + 1))
    with pytest.raises(CredentialsError):
        sealed.seal(b'not a certificate', b'x')
    with pytest.raises(CredentialsError):
        sealed.seal(b'A' * (keys.MAX_CERT_BYTES + 1), b'x')
    keys.init_ca(tmp_path / 'other')
    stranger = keys.issue(tmp_path / 'other', 'cloud', 'cloud')   # same name, another authority
    with pytest.raises(CredentialsError):
        sealed.seal(stranger.cert_pem(), b'x', ca_pem=cloud.ca.read_bytes())
