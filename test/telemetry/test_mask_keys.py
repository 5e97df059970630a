"""Key material is masked in logs, audit records and stored episodes (attack review finding 6):
AuditLog.append(note=<ca.key PEM>, text='rotate with <master key base64>') had stored both.
PEM private-key blocks and raw 256-bit keys in base64 are masked now, in linear time, and the
ids a log is full of (UUIDs, sha256 hex, event ids, names) are not."""
from __future__ import annotations

import base64
import hashlib
import json
import random
import subprocess
import time
import uuid

import pytest

from loom_ros.bus.event import new_event_id
from loom_ros.security.audit import AuditLog
from loom_ros.security.keyring import MasterKey, parse_master_keys
from loom_ros.telemetry import logs


def pem(kind: str) -> str:
    """A real private key of `kind` as openssl writes it."""
    commands = {
        'PKCS8': ['openssl', 'genpkey', '-algorithm', 'ec', '-pkeyopt',
                  'ec_paramgen_curve:P-256'],
        'EC': ['openssl', 'ecparam', '-name', 'prime256v1', '-genkey', '-noout'],
        'RSA': ['openssl', 'genrsa', '-traditional', '1024'],
        'ENCRYPTED': ['openssl', 'genpkey', '-algorithm', 'ed25519', '-aes-256-cbc', '-pass',
                      'pass:x'],
    }
    done = subprocess.run(commands[kind], capture_output=True, text=True, timeout=30)
    if done.returncode != 0 or 'PRIVATE KEY' not in done.stdout:
        pytest.skip(f'openssl cannot make a {kind} key here: {done.stderr[-200:]}')
    return done.stdout


def body_lines(block: str) -> list[str]:
    return [line for line in block.splitlines() if line and not line.startswith('-----')]


@pytest.mark.parametrize('kind', ['PKCS8', 'EC', 'RSA', 'ENCRYPTED'])
def test_pem_private_keys_are_masked(kind):
    block = pem(kind)
    for text in (f'note: {block} end', block, json.dumps({'ca.key': block})[1:-1]):
        masked = logs.mask_text(text)
        assert logs.PRIVATE_KEY_MASK in masked, kind
        for line in body_lines(block):
            assert line not in masked, (kind, line)
        assert 'PRIVATE KEY' not in masked
    assert logs.mask_text(f'note: {block} end').endswith(' end')


def test_a_private_key_cut_before_its_end_is_masked_to_the_end():
    block = pem('PKCS8')
    cut = block[:len(block) // 2]
    masked = logs.mask_text(f'loaded {cut}')
    assert masked == f'loaded {logs.PRIVATE_KEY_MASK}'
    # a key longer than the bound: the cut comes first, then the mask
    long = '-----BEGIN RSA PRIVATE KEY-----\n' + ('QUJD' * 16 + '\n') * 200
    masked = logs.mask_text(long)
    assert 'QUJD' not in masked and logs.PRIVATE_KEY_MASK in masked


def test_public_pem_blocks_are_not_masked():
    cert = '-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----'
    public = '-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYI\n-----END PUBLIC KEY-----'
    assert logs.mask_text(cert) == cert and logs.mask_text(public) == public


def raw_keys(seed: int = 0) -> list[str]:
    """A 256-bit key in each form: as keyring writes it, unpadded, URL-safe, token_urlsafe.
    Seeded: an unpadded key is told from a name by how random it looks (logs._raw_key), which
    about 1 random key in 30,000 does not; fixed keys keep the test from ever flaking."""
    raw = random.Random(seed).randbytes(32)
    key = MasterKey(raw)
    assert parse_master_keys(key.encoded(), 'test')[0].id == key.id   # the format keyring reads
    return [key.encoded(), base64.b64encode(raw).decode().rstrip('='),
            base64.urlsafe_b64encode(raw).decode(),
            base64.urlsafe_b64encode(raw).decode().rstrip('=')]


def test_generated_master_keys_are_always_masked():
    for _ in range(200):   # padded, as `loom storage keygen` prints: no randomness test applies
        key = MasterKey.generate().encoded()
        assert logs.mask_text(f'rotate with {key}') == f'rotate with {logs.MASK}'


@pytest.mark.parametrize('seed', range(50))
def test_raw_256_bit_keys_in_base64_are_masked(seed):
    for key in raw_keys(seed):
        for text in (f'rotate with {key}', key, f'master_key={key}', f'"{key}"',
                     f'key:{key}.', json.dumps({'value': key}), f'({key})', f'a\n{key}\nb'):
            masked = logs.mask_text(text)
            assert key not in masked and key[:40] not in masked, (text, masked)
            assert logs.MASK in masked


def test_ids_and_ordinary_words_are_not_masked():
    sha = hashlib.sha256(b'x').hexdigest()
    kept = [
        uuid.uuid4().hex, str(uuid.uuid4()), uuid.uuid4().hex.upper(), sha, sha.upper(),
        sha[:43], sha[:44], new_event_id(), f'e-{uuid.uuid4().hex[:8]}',
        hashlib.sha1(b'x').hexdigest(), 'agent_host_0_camera_adapter_face_detections',
        'loom_ros.storage.ros2.node.StorageNode.on_configure_x', 'a' * 43, 'A' * 44,
        '/usr/lib/python3/dist-packages/loom_ros/storage/x.py', 'MiniLM-L6-v2-sentence-embed',
        base64.b64encode(b'x' * 33).decode(), base64.b64encode(b'x' * 31).decode(),
        'x' * 43 + '==', '0123456789' * 5, '{"seq": 12, "accel": [0.1, 0.2, 9.8]}',
        'camera_adapter published 1234 frames in 60.0 s (20.5 Hz)',
        'LoomAgentHostNodeCameraAdapterFaceDetector2',
        *(f'CANARY{who}{uuid.uuid4().hex}' for who in ('alice', 'agent', 'Robot7') for _ in
          range(50)),   # test canaries: a name and a UUID, 43 characters
        *(f'Robot{i:02d}{uuid.uuid4().hex.upper()}Abcw' for i in range(20)),
    ]
    for text in kept:
        assert logs.mask_text(text) == text, text
        assert logs.mask_text(f'id {text} done') == f'id {text} done', text


def test_a_key_inside_a_longer_run_is_no_key():
    """Only a whole run is a key: 43 characters inside a longer token (a JWT segment is masked
    by its own pattern; a long hash is an id)."""
    key = MasterKey.generate().encoded()
    assert logs.mask_text('x' + key[:-1] + 'x') == 'x' + key[:-1] + 'x'


def test_both_masking_paths_agree_on_key_material():
    """The trigger pre-check skips the patterns on texts without a trigger word; a raw key has
    none, so key material is masked on both paths (test_mask_precheck's rule)."""
    lower_padded = 'abcdefghijklmnopqrstuvwxyz0123456789abcdefg='   # no upper case: the '='
    for text in [*raw_keys(), f'rotate with {raw_keys()[0]}', pem('PKCS8'), 'plain text',
                 lower_padded, f'x {lower_padded} y', 'a' * 43, 'key ' + 'A' * 43]:
        assert logs._mask_patterns(text) == logs._mask_all_patterns(text), text
    assert logs.mask_text(f'x {lower_padded} y') == f'x {logs.MASK} y'


def test_the_audit_log_keeps_neither_key(tmp_path):
    """The reviewer's reproduction: a CA key in a note, a master key in a text."""
    block, master = pem('EC'), MasterKey.generate().encoded()
    audit = AuditLog(tmp_path / 'audit.db')
    try:
        audit.append('cli', 'key_rotation', note=block, text=f'rotate with {master}')
        record = audit.query(kind='key_rotation')[0]['fields']
    finally:
        audit.close()
    stored = (tmp_path / 'audit.db').read_bytes() + b''.join(
        p.read_bytes() for p in tmp_path.glob('audit.db-*'))
    assert master.encode() not in stored and master[:40].encode() not in stored
    for line in body_lines(block):
        assert line.encode() not in stored, line
    assert record['text'] == f'rotate with {logs.MASK}'
    assert logs.PRIVATE_KEY_MASK in record['note']


SIZE = 200_000
WORST_CASES = {
    'base64 run': 'A' * SIZE,
    'runs one short of a key': ('Ab1' * 14 + ' ') * (SIZE // 43),
    'runs of a key and a half': ('Ab1' * 22 + ' ') * (SIZE // 67),
    'PEM headers without end': '-----BEGIN PRIVATE KEY-----' * (SIZE // 27),
    'PEM header words': '-----BEGIN RSA RSA RSA RSA ' * (SIZE // 27),
    'PEM body of dashes': '-----BEGIN PRIVATE KEY-----' + '----x' * (SIZE // 5),
    'dashes': '-' * SIZE,
    'padding': ('A' * 43 + '=') * (SIZE // 44),
}


@pytest.mark.parametrize('text', WORST_CASES.values(), ids=WORST_CASES.keys())
def test_key_masking_is_linear_on_worst_case_shapes(text):
    # No bound here, as in test_logs_hostile: 200,000 characters in well under a second when
    # linear (a quadratic pattern would take minutes).
    started = time.perf_counter()
    logs._mask_patterns(text)
    assert time.perf_counter() - started < 5.0
