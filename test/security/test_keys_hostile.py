"""Fleet credentials against the attack review (loom_ros/security/keys.py, `loom keys`): a
replaced or revoked certificate is refused by the cloud tier's real gate (and leaves the
router's rules), half an authority or half an identity is never replaced without --force, a
keys folder another user could write to is refused, certificates are never written through a
link, and hostile key files and validity periods get a clean error, never a hang or a
traceback. Real authorities in temporary folders; never ~/.loom."""
from __future__ import annotations

import json
import os
import shutil
import stat
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from harness import run_loom
from loom_ros.bridge.zenoh_router import keys_fingerprint, router_access_control
from loom_ros.cloud.protocol import Signer
from loom_ros.cloud.server import Rejected, build_service
from loom_ros.security import keys

OTHER_UID = 1002   # a user who is not this one (only root can make files theirs)


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _gate(root, clock=time.time):
    """The cloud tier's gate as `loom cloud serve` builds it (build_service: the verifier, the
    members preloaded from the keys folder); no models behind it."""
    service = build_service({'limits': {'rate_per_s': 1000, 'burst': 1000}},
                            keys.load(root, 'cloud'), instance='cloud-a', server=object(),
                            clock=clock)
    return service.gate


def _ask(gate, identity: keys.Identity, ident: str):
    request = Signer(identity).request('intent', {'text': 'hi'}, ident, int(time.time() * 1000))
    return gate.admit('intent', request)


def _stolen_copy(root, name: str, where) -> keys.Identity:
    """What a thief (or a decommissioned robot) keeps: the identity's files as they are now."""
    where.mkdir(mode=0o700)
    shutil.copytree(root / name, where / name)
    shutil.copy(root / 'ca.pem', where / 'ca.pem')
    return keys.Identity(name, 'robot', where / name / 'cert.pem', where / name / 'key.pem',
                         where / 'ca.pem')


def test_a_reissued_certificate_is_refused_by_the_cloud_gate_and_the_new_one_admitted(tmp_path):
    """Review finding 1: after `loom keys issue robot1 --force`, the old robot1 certificate and
    key still got a signed request admitted by the cloud gate as robot1 (any certificate the
    CA signed and unexpired passed). Re-issuing now revokes the certificate it replaces."""
    root = tmp_path / 'keys'
    keys.ensure_local(root, {'cloud': 'cloud', 'robot1': 'robot'})
    old = _stolen_copy(root, 'robot1', tmp_path / 'stolen')
    run = run_loom('keys', 'issue', 'robot1', '--role', 'robot', '--force',
                   '--keys-dir', str(root))
    assert run.returncode == 0, run.stderr
    gate = _gate(root)
    with pytest.raises(Rejected, match='revoked'):
        _ask(gate, old, 'old-1')
    assert 'revoked the certificate it replaced' in run.stdout
    assert keys.fingerprint(old.cert_pem()) in run.stdout
    assert 'router' in run.stdout and 'copy it next to ca.pem' in run.stdout
    assert _mode(root / keys.REVOKED_FILE) == 0o600
    new = keys.load(root, 'robot1')
    new_pem = new.cert_pem()
    assert new_pem != old.cert_pem()
    admitted = _ask(gate, new, 'new-1')
    assert (admitted.client, admitted.role) == ('robot1', 'robot')
    # once more, the newest is revoked in turn and the one before stays so
    keys.issue(root, 'robot1', 'robot', force=True)
    assert set(keys.read_revocations(root)) == {keys.fingerprint(old.cert_pem()),
                                                keys.fingerprint(new_pem)}


def test_revoke_reaches_a_running_cloud_gate_the_router_rules_and_the_keys_folder(tmp_path):
    """`loom keys revoke NAME` revokes the current certificate: a running gate refuses it at its
    next look at revoked.json, a restarted one too (the preload skips it), the router's rules
    drop the name (and their fingerprint changes, so a running router reloads), and `load` and
    `list` say it is revoked; `issue --force` gives the name a certificate that is admitted."""
    root = tmp_path / 'keys'
    keys.ensure_local(root, {'cloud': 'cloud', 'robot1': 'robot', 'robot2': 'robot'})
    now = [time.time()]
    gate = _gate(root, clock=lambda: now[0])
    robot1, robot2 = keys.load(root, 'robot1'), keys.load(root, 'robot2')
    assert _ask(gate, robot1, 'a').client == 'robot1'
    rules_before = keys_fingerprint(root)
    run = run_loom('keys', 'revoke', 'robot1', '--keys-dir', str(root))
    assert run.returncode == 0, run.stderr
    assert 'revoked: robot1 (robot)' in run.stdout and keys.fingerprint(robot1.cert_pem()) in \
        run.stdout
    assert 'cloud' in run.stdout and '--watch-s' in run.stdout
    # the list is looked at again once REVOCATION_CHECK_S passed on the gate's clock, or at
    # once when that clock went back
    now[0] -= 0.5
    with pytest.raises(Rejected, match='revoked'):
        _ask(gate, robot1, 'b')
    keys.issue(root, 'robot3', 'robot')
    robot3 = keys.load(root, 'robot3')
    assert _ask(gate, robot3, 'b3').client == 'robot3'
    run = run_loom('keys', 'revoke', 'robot3', '--keys-dir', str(root))
    assert run.returncode == 0, run.stderr
    assert _ask(gate, robot3, 'b4').client == 'robot3'      # not looked at again yet
    now[0] += keys.REVOCATION_CHECK_S
    with pytest.raises(Rejected, match='revoked'):
        _ask(gate, robot3, 'b5')
    assert _ask(gate, robot2, 'c').client == 'robot2'
    with pytest.raises(Rejected, match='revoked'):
        _ask(_gate(root), robot1, 'd')
    with pytest.raises(keys.CredentialsError, match='revoked'):
        keys.load(root, 'robot1')
    listed = {e.folder: e for e in keys.list_identities(root)}
    assert listed['robot1'].identity is None and 'revoked' in listed['robot1'].problem
    assert 'robot1' not in router_access_control(root)[1]
    assert 'robot2' in router_access_control(root)[1]
    assert keys_fingerprint(root) != rules_before
    listing = run_loom('keys', 'list', '--keys-dir', str(root))
    assert "'robot1'\tinvalid (revoked" in listing.stdout
    # a revoked identity is not quietly kept: its name needs --force to get a new certificate
    with pytest.raises(keys.CredentialsError, match='revoked'):
        keys.issue(root, 'robot1', 'robot')
    renewed = keys.issue(root, 'robot1', 'robot', force=True)
    assert _ask(gate, renewed, 'e').client == 'robot1'
    assert 'robot1' in router_access_control(root)[1]


def test_a_deleted_identitys_kept_certificate_can_be_revoked(tmp_path):
    """Deleting keys/robot1 revokes nothing (the cloud accepts any certificate of the authority
    it never saw): `loom keys revoke --cert FILE` revokes a copy kept of it. Another authority's
    certificate, or a name that is not the certificate's, is refused."""
    root = tmp_path / 'keys'
    keys.ensure_local(root, {'cloud': 'cloud', 'robot1': 'robot'})
    old = _stolen_copy(root, 'robot1', tmp_path / 'kept')
    shutil.rmtree(root / 'robot1')
    gate = _gate(root)
    gate.verifier.certs.revocation_check_s = 0.0
    assert _ask(gate, old, 'a').client == 'robot1'
    missing = run_loom('keys', 'revoke', 'robot1', '--keys-dir', str(root))
    assert missing.returncode == 1 and '--cert' in missing.stderr
    run = run_loom('keys', 'revoke', '--cert', str(old.cert), '--keys-dir', str(root))
    assert run.returncode == 0, run.stderr
    with pytest.raises(Rejected, match='revoked'):
        _ask(gate, old, 'b')
    other = keys.ensure_local(tmp_path / 'other', {'robot1': 'robot'})['robot1']
    with pytest.raises(keys.CredentialsError, match='not issued'):
        keys.revoke(root, cert_pem=other.cert_pem())
    keys.issue(root, 'robot3', 'robot')
    with pytest.raises(keys.CredentialsError, match="names 'robot3'"):
        keys.revoke(root, 'robot1', cert_pem=(root / 'robot3' / 'cert.pem').read_bytes())


def test_an_unreadable_revocation_list_trusts_no_one(tmp_path):
    """A revocation list that cannot be read is not taken as empty: the cloud tier will not
    start on it, a running checker refuses every certificate until it is sound again, and the
    keys folder lists no identity as trusted (so the router's rules hold none)."""
    root = tmp_path / 'keys'
    made = keys.ensure_local(root, {'cloud': 'cloud', 'robot1': 'robot'})
    gate = _gate(root)
    gate.verifier.certs.revocation_check_s = 0.0
    assert _ask(gate, made['robot1'], 'a').client == 'robot1'
    (root / keys.REVOKED_FILE).write_text('{"revoked": [{"sha256": "not hex"}]}')
    with pytest.raises(Rejected, match='revocation list unreadable'):
        _ask(gate, made['robot1'], 'b')
    with pytest.raises(keys.CredentialsError, match='sha256'):
        _gate(root)
    assert keys.signed_identities(root) == []
    (root / keys.REVOKED_FILE).write_text(json.dumps({'version': 1, 'revoked': []}))
    assert _ask(gate, made['robot1'], 'c').client == 'robot1'


def test_a_robot_folder_with_ca_pem_only_never_gets_an_authority(tmp_path):
    """Review finding 2: a robot holding ca.pem without ca.key (as advised) ran `loom keys init`
    (rc 0) or `loom bringup` (keys.ensure_local) and got a NEW authority in place of ca.pem and
    a ca.key. Half an authority is now kept as it is and named; an empty folder still gets
    local credentials on first run."""
    ws = tmp_path / 'workstation'
    keys.ensure_local(ws, {'robot1': 'robot'})
    robot = tmp_path / 'robot'
    robot.mkdir(mode=0o700)
    shutil.copy(ws / 'ca.pem', robot / 'ca.pem')
    shutil.copytree(ws / 'robot1', robot / 'robot1')
    ca_before = (robot / 'ca.pem').read_bytes()
    run = run_loom('keys', 'init', '--keys-dir', str(robot))
    assert run.returncode == 1 and 'without ca.key' in run.stderr and 'Traceback' not in run.stderr
    with pytest.raises(keys.CredentialsError, match='without ca.key'):
        keys.init_ca(robot)
    assert keys.ensure_local(robot, {'robot1': 'robot'})['robot1'] == keys.load(robot, 'robot1')
    with pytest.raises(keys.CredentialsError, match='missing: router, cloud'):
        keys.ensure_local(robot, {'router': 'router', 'robot1': 'robot', 'cloud': 'cloud'})
    assert (robot / 'ca.pem').read_bytes() == ca_before
    assert sorted(p.name for p in robot.iterdir()) == ['ca.pem', 'robot1']
    # ca.key without ca.pem (ca.pem lost): nothing replaced, ca.pem named
    key_before = (ws / 'ca.key').read_bytes()
    (ws / 'ca.pem').unlink()
    for attempt in (lambda: keys.init_ca(ws), lambda: keys.ensure_local(ws, {'r': 'robot'})):
        with pytest.raises(keys.CredentialsError, match='without ca.pem'):
            attempt()
    assert (ws / 'ca.key').read_bytes() == key_before and not (ws / 'ca.pem').exists()
    # --force is the way to a new authority
    keys.init_ca(ws, force=True)
    assert (ws / 'ca.key').read_bytes() != key_before
    # first run: an empty folder (made by hand or not there at all) gets everything
    empty = tmp_path / 'empty'
    empty.mkdir(mode=0o700)
    assert set(keys.ensure_local(empty, {'router': 'router', 'robot1': 'robot'})) == \
        {'router', 'robot1'}
    assert set(keys.ensure_local(tmp_path / 'absent', {'cloud': 'cloud'})) == {'cloud'}


def test_issue_never_replaces_half_an_identity_without_force(tmp_path):
    """Review finding 2: with cert.pem removed, `issue` replaced key.pem. Either half alone is
    now kept and the other named; --force re-issues."""
    root = tmp_path / 'keys'
    made = keys.ensure_local(root, {'robot1': 'robot'})['robot1']
    key_before = made.key.read_bytes()
    made.cert.unlink()
    run = run_loom('keys', 'issue', 'robot1', '--role', 'robot', '--keys-dir', str(root))
    assert run.returncode == 1 and 'without cert.pem' in run.stderr
    assert made.key.read_bytes() == key_before and not made.cert.exists()
    with pytest.raises(keys.CredentialsError, match='without cert.pem'):
        keys.ensure_local(root, {'robot1': 'robot'})
    keys.issue(root, 'robot2', 'robot').key.unlink()
    cert_before = (root / 'robot2' / 'cert.pem').read_bytes()
    with pytest.raises(keys.CredentialsError, match='without key.pem'):
        keys.issue(root, 'robot2', 'robot')
    assert (root / 'robot2' / 'cert.pem').read_bytes() == cert_before
    renewed = keys.issue(root, 'robot1', 'robot', force=True)
    assert renewed.key.read_bytes() != key_before and keys.load(root, 'robot1') == renewed


def test_keys_folders_others_can_write_or_own_are_refused(tmp_path):
    """Review finding 3: under umask 000 the folders above the keys folder were made 0777, and
    a keys folder (or identity folder) another user owned or could write to was used: a swapped
    in authority issued robot2. Made folders are now 0700 whatever the umask; such folders,
    and private keys others can read, are refused with what to do."""
    old_umask = os.umask(0)
    try:
        root = tmp_path / 'home' / '.loom' / 'keys'
        keys.init_ca(root)
        robot = keys.issue(root, 'robot1', 'robot')
    finally:
        os.umask(old_umask)
    for folder in (tmp_path / 'home', tmp_path / 'home' / '.loom', root, root / 'robot1'):
        assert _mode(folder) == 0o700, folder
    assert _mode(root / 'ca.key') == 0o600 and _mode(robot.key) == 0o600
    assert _mode(root / 'ca.pem') == 0o644 and _mode(robot.cert) == 0o644
    on_robot1 = (lambda: keys.issue(root, 'robot1', 'robot', force=True),
                 lambda: keys.load(root, 'robot1'), lambda: keys.revoke(root, 'robot1'))
    for folder, attempts in ((root, (lambda: keys.init_ca(root),
                                     lambda: keys.issue(root, 'robot2', 'robot'),
                                     lambda: keys.ensure_local(root, {'robot2': 'robot'}),
                                     *on_robot1)),
                             (root / 'robot1', on_robot1)):
        os.chmod(folder, 0o777)
        for attempt in attempts:
            with pytest.raises(keys.CredentialsError, match='chmod 700'):
                attempt()
        os.chmod(folder, 0o700)
    assert keys.read_revocations(root) == {}
    run = run_loom('keys', 'issue', 'robot3', '--role', 'robot', '--keys-dir', str(root))
    assert run.returncode == 0, run.stderr
    os.chmod(root / 'ca.key', 0o640)
    with pytest.raises(keys.CredentialsError, match='chmod 600'):
        keys.issue(root, 'robot2', 'robot')
    os.chmod(root / 'ca.key', 0o600)
    os.chmod(robot.key, 0o644)
    with pytest.raises(keys.CredentialsError, match='chmod 600'):
        keys.sign(robot, b'x')
    os.chmod(robot.key, 0o600)
    assert keys.verify(robot.cert_pem(), (root / 'ca.pem').read_bytes(), b'x',
                       keys.sign(robot, b'x')) == ('robot1', 'robot')
    assert not (root / 'robot2').exists()


@pytest.mark.skipif(os.geteuid() != 0, reason='only root can give a folder to another user')
def test_a_keys_folder_another_user_owns_is_refused(tmp_path):
    """The review's attack: another user moved the victim's keys folder away and put their own
    (their CA, mode 0755) in its place; `keys init` kept it and `issue robot2` signed with it.
    A folder, identity folder or authority key of another user is now refused."""
    attacker = tmp_path / 'attacker'
    keys.init_ca(attacker)
    victim = tmp_path / 'victim_keys'
    victim.mkdir(mode=0o755)
    for name in ('ca.pem', 'ca.key'):
        shutil.copy(attacker / name, victim / name)
    for path in (victim, victim / 'ca.pem', victim / 'ca.key'):
        os.chown(path, OTHER_UID, OTHER_UID)
    for attempt in ('init',), ('issue', 'robot2', '--role', 'robot'), ('revoke', 'robot2'):
        run = run_loom('keys', *attempt, '--keys-dir', str(victim))
        assert run.returncode == 1, (attempt, run.stdout)
        assert f'belongs to uid {OTHER_UID}' in run.stderr
    assert not (victim / 'robot2').exists()
    mine = tmp_path / 'mine'
    keys.init_ca(mine)
    os.chown(mine / 'ca.key', OTHER_UID, OTHER_UID)
    with pytest.raises(keys.CredentialsError, match=f'belongs to uid {OTHER_UID}'):
        keys.issue(mine, 'robot1', 'robot')
    os.chown(mine / 'ca.key', 0, 0)
    keys.issue(mine, 'robot1', 'robot')
    os.chown(mine / 'robot1', OTHER_UID, OTHER_UID)
    with pytest.raises(keys.CredentialsError, match=f'belongs to uid {OTHER_UID}'):
        keys.issue(mine, 'robot1', 'robot', force=True)


def test_certificates_are_never_written_through_a_link(tmp_path):
    """Review finding 3: ca.pem and <name>/cert.pem were written with write_bytes, which
    follows a link: a link planted there made init/issue overwrite whatever it named. They are
    now written to a new file and renamed over the link; a link is never read as a key or
    certificate either."""
    root = tmp_path / 'keys'
    keys.ensure_local(root, {'robot1': 'robot'})
    victim = tmp_path / 'victims_file'
    victim.write_text('precious')
    (root / 'ca.pem').unlink()
    (root / 'ca.pem').symlink_to(victim)
    with pytest.raises(keys.CredentialsError, match='is a link'):
        keys.init_ca(root)   # kept as found: refused, not followed
    keys.init_ca(root, force=True)
    assert victim.read_text() == 'precious' and not (root / 'ca.pem').is_symlink()
    (root / 'robot1' / 'cert.pem').unlink()
    (root / 'robot1' / 'cert.pem').symlink_to(victim)
    keys.issue(root, 'robot1', 'robot', force=True)
    assert victim.read_text() == 'precious' and not (root / 'robot1' / 'cert.pem').is_symlink()
    assert keys.load(root, 'robot1').name == 'robot1'
    assert not [p for p in root.rglob('*.tmp')]


def _write(path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, 'wb') as out:
        out.write(data)


def test_hostile_key_files_and_validity_get_a_clean_error(tmp_path):
    """Review finding 7: a FIFO at ca.key hung `loom keys issue`; a passphrase-protected or
    Ed25519 ca.key gave a traceback; `--days -1` or 99999999 a traceback; a 300 MB ca.key was
    read whole. Each is now a one-line error, at once."""
    root = tmp_path / 'keys'
    keys.init_ca(root)
    good = (root / 'ca.key').read_bytes()
    (root / 'ca.key').unlink()
    os.mkfifo(root / 'ca.key', 0o600)
    started = time.monotonic()
    run = run_loom('keys', 'issue', 'r1', '--role', 'robot', '--keys-dir', str(root), timeout=60)
    assert run.returncode == 1 and 'not a regular file' in run.stderr
    assert time.monotonic() - started < 30
    (root / 'ca.key').unlink()
    ec_key = serialization.load_pem_private_key(good, password=None)
    cases = {
        'encrypted': ec_key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.BestAvailableEncryption(b'x')),
        'not an ECDSA key': ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()),
        'is not the key of': ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()),
        'not a readable': b'',
    }
    for why, data in cases.items():
        _write(root / 'ca.key', data)
        run = run_loom('keys', 'issue', 'r1', '--role', 'robot', '--keys-dir', str(root))
        assert run.returncode == 1 and why in run.stderr, (why, run.stderr[-500:])
        assert 'Traceback' not in run.stderr
    (root / 'ca.key').unlink()
    with open(root / 'ca.key', 'wb') as big:   # sparse: 300 MB that costs no disk
        big.truncate(300_000_000)
    os.chmod(root / 'ca.key', 0o600)
    with pytest.raises(keys.CredentialsError, match='too large'):
        keys.issue(root, 'r1', 'robot')
    (root / 'ca.key').unlink()
    (root / 'ca.key').mkdir(mode=0o700)
    with pytest.raises(keys.CredentialsError, match='not a regular file'):
        keys.issue(root, 'r1', 'robot')
    (root / 'ca.key').rmdir()
    _write(root / 'ca.key', good)
    for days in ('-1', '0', '99999999', 'ten'):
        run = run_loom('keys', 'issue', 'r1', '--role', 'robot', '--days', days,
                       '--keys-dir', str(root))
        assert run.returncode == 2 and '--days' in run.stderr, (days, run.stderr[-500:])
        assert 'Traceback' not in run.stderr
    for days in (0, -1, 3651, 99999999):
        with pytest.raises(keys.CredentialsError, match='1 to 3650'):
            keys.issue(root, 'r1', 'robot', days=days)
    assert not (root / 'r1').exists()
    ident = keys.issue(root, 'r1', 'robot', days=3650)
    # an identity's key file that is a FIFO is refused by load (zenoh would open it by path)
    ident.key.unlink()
    os.mkfifo(ident.key, 0o600)
    with pytest.raises(keys.CredentialsError, match='not a regular file'):
        keys.load(root, 'r1')


def test_bringup_asks_a_robot_folder_only_for_the_identities_it_starts(tmp_path):
    """Review finding: `loom bringup` asked every keys folder for the router's, the robot's and
    the cloud's identities, keys included, so a fleet robot (ca.pem, its own identity, the
    cloud's certificate) could only bring up by holding the cloud's private key, which opens
    what every robot seals for the cloud. It now asks for what it starts."""
    from argparse import Namespace
    from loom_ros.cli.bringup import local_credentials
    ws = tmp_path / 'workstation'
    keys.ensure_local(ws, {'robot1': 'robot', 'cloud': 'cloud'})
    robot = tmp_path / 'robot'
    robot.mkdir(mode=0o700)
    shutil.copy(ws / 'ca.pem', robot / 'ca.pem')
    shutil.copytree(ws / 'robot1', robot / 'robot1')
    (robot / 'cloud').mkdir(mode=0o700)
    shutil.copy(ws / 'cloud' / 'cert.pem', robot / 'cloud' / 'cert.pem')   # to seal to, no key

    fleet = Namespace(keys_dir=str(robot), zenoh_connect='tls/fleet-router:7447', cloud=False)
    assert set(local_credentials(fleet, 'robot1')) == {'robot1'}
    for started in (dict(zenoh_connect='', cloud=False), dict(zenoh_connect='tcp/r:1', cloud=True)):
        with pytest.raises(keys.CredentialsError, match='missing: router|cloud/key.pem is missing'):
            local_credentials(Namespace(keys_dir=str(robot), **started), 'robot1')
    assert sorted(p.name for p in robot.iterdir()) == ['ca.pem', 'cloud', 'robot1']
    assert not (robot / 'cloud' / 'key.pem').exists()
    # a first run on an empty folder still makes what a loopback bring-up starts
    fresh = Namespace(keys_dir=str(tmp_path / 'fresh'), zenoh_connect='', cloud=True)
    assert set(local_credentials(fresh, 'robot1')) == {'robot1', 'router', 'cloud'}
