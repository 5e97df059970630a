"""Fleet credentials (loom_ros/security/keys.py): a real authority and identities on disk; a
signature checks out only for this fleet's certificate and the exact bytes signed."""
from __future__ import annotations

import datetime
import os

import pytest

from loom_ros.security import keys


@pytest.fixture
def fleet(tmp_path):
    keys.init_ca(tmp_path / 'keys')
    return tmp_path / 'keys'


def test_identities_sign_and_verify_within_one_fleet_only(fleet, tmp_path):
    robot = keys.issue(fleet, 'robot1', 'robot')
    cloud = keys.issue(fleet, 'cloud', 'cloud')
    ca = robot.ca.read_bytes()
    assert keys.identity_of(robot.cert_pem(), ca) == ('robot1', 'robot')
    assert keys.verify(cloud.cert_pem(), ca, b'reply', keys.sign(cloud, b'reply')) == \
        ('cloud', 'cloud')
    with pytest.raises(keys.CredentialsError, match='bad signature'):
        keys.verify(cloud.cert_pem(), ca, b'reply!', keys.sign(cloud, b'reply'))
    with pytest.raises(keys.CredentialsError, match='bad signature'):   # robot's key, cloud's cert
        keys.verify(cloud.cert_pem(), ca, b'reply', keys.sign(robot, b'reply'))
    keys.init_ca(tmp_path / 'other')
    stranger = keys.issue(tmp_path / 'other', 'cloud', 'cloud')   # same name, another authority
    with pytest.raises(keys.CredentialsError, match='not issued'):
        keys.verify(stranger.cert_pem(), ca, b'reply', keys.sign(stranger, b'reply'))
    assert os.stat(robot.key).st_mode & 0o077 == 0   # private keys are the owner's only


def test_hostile_certificates_and_names_are_refused(fleet):
    robot = keys.issue(fleet, 'robot1', 'robot')
    ca = robot.ca.read_bytes()
    for bad in (b'', b'x' * (keys.MAX_CERT_BYTES + 1), b'-----BEGIN CERTIFICATE-----\nAAAA',
                'text'):
        with pytest.raises(keys.CredentialsError):
            keys.identity_of(bad, ca)
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=900)
    with pytest.raises(keys.CredentialsError, match='expired'):
        keys.identity_of(robot.cert_pem(), ca, now=later)
    for name in ('', 'a/b', '*', 'x' * 65, '../ca'):
        with pytest.raises(keys.CredentialsError):
            keys.issue(fleet, name, 'robot')
    with pytest.raises(keys.CredentialsError, match='role'):
        keys.issue(fleet, 'r2', 'admin')
    with pytest.raises(keys.CredentialsError, match='exists with role'):
        keys.issue(fleet, 'robot1', 'cloud')


def test_missing_credentials_say_what_to_run(tmp_path):
    with pytest.raises(keys.CredentialsError, match='loom keys init'):
        keys.load(tmp_path / 'none', 'robot1')
    with pytest.raises(keys.CredentialsError, match='loom keys init'):
        keys.issue(tmp_path / 'none', 'robot1', 'robot')
    made = keys.ensure_local(tmp_path / 'k', {'router': 'router', 'robot1': 'robot'})
    assert keys.load(tmp_path / 'k', 'robot1') == made['robot1']
