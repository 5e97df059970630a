"""Fleet credentials (loom_ros/security/keys.py): a real authority and identities on disk; a
signature checks out only for this fleet's certificate and the exact bytes signed."""
from __future__ import annotations

import datetime
import os

import pytest

from loom_ros.bridge.zenoh_router import router_access_control
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


def test_only_routers_and_identities_issued_to_serve_are_tls_servers(fleet):
    """Zenoh's TLS client refuses a server certificate without serverAuth, so that usage (and
    the host names a server is reached at) goes only where a TLS server is meant to be: every
    router, and an identity issued with `serve` (a peer that listens)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID as EKU

    def usage_and_names(identity):
        cert = x509.load_pem_x509_certificate(identity.cert_pem())
        eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return eku, {str(n.value) for n in san}

    for name, role in (('robot1', 'robot'), ('cloud', 'cloud'), ('alice', 'operator')):
        identity = keys.issue(fleet, name, role, hosts=('10.0.0.9',))
        assert usage_and_names(identity) == ({EKU.CLIENT_AUTH}, {name})
        assert not keys.can_serve(identity)
    router = keys.issue(fleet, 'router', 'router', hosts=('10.0.0.2', 'gw.example'))
    assert usage_and_names(router) == ({EKU.SERVER_AUTH, EKU.CLIENT_AUTH},
                                       {'router', '10.0.0.2', 'gw.example'})
    peer = keys.issue(fleet, 'robot2', 'robot', serve=True)
    assert usage_and_names(peer) == ({EKU.SERVER_AUTH, EKU.CLIENT_AUTH},
                                     {'robot2', 'localhost', '127.0.0.1'})
    assert keys.can_serve(peer) and keys.can_serve(router)
    # An identity kept from before cannot be asked to serve without reissuing it.
    with pytest.raises(keys.CredentialsError, match='without the right to serve'):
        keys.issue(fleet, 'robot1', 'robot', serve=True)
    assert keys.can_serve(keys.issue(fleet, 'robot1', 'robot', serve=True, force=True))
    # Not serving stays the default for a kept identity asked for again.
    assert keys.issue(fleet, 'robot2', 'robot') == peer
    # What the router warns about at start: serving identities that are not routers.
    assert keys.serving_non_routers(fleet) == ['robot1', 'robot2']
    assert keys.serving_non_routers(fleet.parent / 'no_such_folder') == []
    # The router reads the folder once and hands its identities to both uses.
    signed = keys.signed_identities(fleet)
    assert keys.non_routers_serving(signed) == ['robot1', 'robot2']


def test_keys_list_shows_what_the_fleet_trusts_and_says_why_the_rest_is_not(fleet, tmp_path):
    """`loom keys list` and the routers' rules read one list: a certificate of another
    authority, one moved into another robot's folder, garbage, and a hostile folder name are
    each shown as invalid with the reason, and only the sound identity is trusted."""
    import shutil

    from harness import run_loom
    keys.issue(fleet, 'robot1', 'robot')
    keys.issue(fleet, 'robot2', 'robot')
    keys.init_ca(tmp_path / 'other')
    stranger = keys.issue(tmp_path / 'other', 'robot3', 'robot')
    shutil.copytree(stranger.cert.parent, fleet / 'robot3')           # another authority's
    (fleet / 'robot2' / 'cert.pem').write_bytes(
        (fleet / 'robot1' / 'cert.pem').read_bytes())                    # robot1's, moved
    (fleet / 'junk').mkdir()
    (fleet / 'junk' / 'cert.pem').write_bytes(b'-----BEGIN CERTIFICATE-----\nAAAA')
    hostile = '\x1b[2Jx'
    (fleet / hostile).mkdir()
    (fleet / hostile / 'cert.pem').write_bytes(b'x')
    (fleet / 'fifo').mkdir()
    os.mkfifo(fleet / 'fifo' / 'cert.pem')          # a plain read would block for good
    (fleet / 'zero').mkdir()
    os.symlink('/dev/zero', fleet / 'zero' / 'cert.pem')   # would never end
    listed = {e.folder: e for e in keys.list_identities(fleet)}
    assert listed['robot1'].identity is not None and listed['robot1'].problem == ''
    assert 'not issued' in listed['robot3'].problem or 'signature' in listed['robot3'].problem
    assert "names 'robot1'" in listed['robot2'].problem and listed['robot2'].identity is None
    assert listed['junk'].identity is None and listed['junk'].problem
    assert [i.name for i in keys.signed_identities(fleet)] == ['robot1']
    run = run_loom('keys', 'list', '--keys-dir', str(fleet))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [ln.split('\t')[:2] for ln in lines if '\tinvalid' not in ln] == [['robot1', 'robot']]
    assert sum('\tinvalid (' in ln for ln in lines) == 6
    assert 'not a regular file' in listed['fifo'].problem
    assert 'not a regular file' in listed['zero'].problem
    assert '\x1b' not in run.stdout   # the hostile name is quoted, not written to the terminal


def test_router_rules_from_identities_read_once_are_the_folders_rules(fleet):
    """zenoh_router reads the keys folder once at start for its rules and its warning."""
    keys.issue(fleet, 'robot1', 'robot')
    signed = keys.signed_identities(fleet)
    assert signed and router_access_control(fleet, identities=signed) == \
        router_access_control(fleet)


def test_reissued_keys_are_the_owners_only_and_never_written_through_a_link(fleet, tmp_path):
    """`--force` kept an older key file's mode (O_TRUNC keeps it: 0644 stayed 0644) and wrote
    the new private key through a symlink at its path, wherever that pointed."""
    robot = keys.issue(fleet, 'robot9', 'robot')
    os.chmod(robot.key, 0o644)
    keys.issue(fleet, 'robot9', 'robot', force=True)
    assert os.stat(robot.key).st_mode & 0o777 == 0o600
    os.chmod(fleet / 'ca.key', 0o644)   # issuing now refuses an authority key others can read
    keys.init_ca(fleet, force=True)
    assert os.stat(fleet / 'ca.key').st_mode & 0o777 == 0o600
    target = tmp_path / 'elsewhere.pem'
    target.write_text('not a key')
    robot.key.unlink()
    robot.key.symlink_to(target)
    reissued = keys.issue(fleet, 'robot9', 'robot', force=True)
    assert target.read_text() == 'not a key'
    assert not reissued.key.is_symlink() and os.stat(reissued.key).st_mode & 0o777 == 0o600
    assert keys.verify(reissued.cert_pem(), (fleet / 'ca.pem').read_bytes(), b'x',
                       keys.sign(keys.load(fleet, 'robot9'), b'x')) == ('robot9', 'robot')
    assert not [p for p in (fleet / 'robot9').iterdir() if p.name.endswith('.tmp')]


def test_known_certificates_check_each_new_one_once_and_at_a_bounded_rate(fleet, tmp_path):
    """Review finding: receivers checked every certificate a message carried against the CA
    (a parse and a signature each), keyed by its PEM text, and never remembered a failure: a
    stranger's flood of certificates cost a CA check per message. Known ones cost a hash; a
    failure is remembered; the same certificate written differently is found by its DER; new
    ones are checked at a bounded rate (injected clock) and past it refused as busy."""
    now = [datetime.datetime.now(datetime.timezone.utc).timestamp()]
    ops = keys.issue(fleet, 'ops', 'operator')
    certs = keys.KnownCertificates(ops.ca.read_bytes(), new_per_s=1.0, new_burst=2.0,
                                   size=4, clock=lambda: now[0])
    pem = ops.cert_pem()
    signature = keys.sign(ops, b'stop')
    assert certs.verify(pem, b'stop', signature).name == 'ops'
    for _ in range(100):
        certs.verify(pem, b'stop', signature)
    variant = pem.replace(b'\n', b'\r\n')               # the same certificate, other bytes
    assert certs.get(variant).name == 'ops' and certs.checked == 1
    with pytest.raises(keys.CredentialsError, match='bad signature'):
        certs.verify(pem, b'stop!', signature)
    keys.init_ca(tmp_path / 'other')
    stranger = keys.issue(tmp_path / 'other', 'ops', 'operator').cert_pem()
    for _ in range(50):                                  # checked once, then remembered
        with pytest.raises(keys.CredentialsError, match='not issued'):
            certs.get(stranger)
    assert certs.checked == 2
    for bad in (b'', b'x' * (keys.MAX_CERT_BYTES + 1), b'-----BEGIN CERTIFICATE-----\nAA==\n'):
        with pytest.raises(keys.CredentialsError):
            certs.get(bad)
    # the budget (burst 2) is spent: a new member's certificate waits; known ones pass
    robot = keys.issue(fleet, 'robot7', 'robot').cert_pem()
    with pytest.raises(keys.CredentialsError, match='busy'):
        certs.get(robot)
    assert certs.refused_busy == 1 and certs.get(pem).name == 'ops'
    now[0] += 1.0                                        # one more check a second
    assert certs.get(robot).name == 'robot7' and certs.checked == 3
    # validity is read against the clock on every use
    now[0] += 3 * 365 * 86400
    with pytest.raises(keys.CredentialsError, match='expired'):
        certs.get(pem)
