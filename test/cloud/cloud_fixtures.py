"""Fixtures and helpers the cloud tests share (import them by name: conftest.py files are not
importable once several folders have one): a fleet's credentials, `loom_cloud` processes signed
in with them, and a signed raw get that checks the answer the way the robot's client does."""
from __future__ import annotations

import json
import signal
import time
import uuid

import pytest

from loom_ros.cloud.protocol import (
    Signer, Verifier, digest, parse_reply, reply_signed_bytes, unpack,
)
from loom_ros.security import keys

FLEET = {'cloud': 'cloud', 'robot1': 'robot', 'robot2': 'robot', 'router': 'router'}


@pytest.fixture(scope='module')
def fleet(tmp_path_factory):
    """A fleet's keys folder: the authority, the cloud identity, two robots and a router."""
    root = tmp_path_factory.mktemp('fleet_keys')
    keys.ensure_local(root, FLEET)
    return root


@pytest.fixture(scope='module')
def stranger(tmp_path_factory):
    """Another authority's `cloud` identity: right name and role, wrong fleet."""
    root = tmp_path_factory.mktemp('stranger_keys')
    return keys.ensure_local(root, {'cloud': 'cloud'})['cloud']


class CloudNet:
    """A Zenoh router on loopback and `loom_cloud` servers on it, secure (mutual TLS with the
    fleet's keys, the router's access control) or, for attacks that must reach the cloud tier
    itself (a misconfigured or shared router: defence in depth), plain TCP with `--insecure`."""

    def __init__(self, spawn, port: int, fleet, tmp_path):
        self.spawn, self.port, self.fleet, self.tmp_path = spawn, port, fleet, tmp_path
        self.secure: bool | None = None
        self.sessions = []

    def _router(self, secure: bool) -> None:
        if self.secure is not None:
            assert self.secure == secure, 'one router per test'
            return
        self.secure = secure
        audit = str(self.tmp_path / 'router_audit.db')   # the router's refusals, not ~/.loom
        flags = ['--keys-dir', str(self.fleet), '--audit-db', audit] if secure \
            else ['--insecure']
        proc = self.spawn('-m', 'loom_ros.bridge.zenoh_router', '--listen',
                          f'tcp/127.0.0.1:{self.port}', *flags)
        line = proc.popen.stdout.readline()
        if not line or not json.loads(line).get('ready'):
            code, out, err = proc.finish()
            pytest.fail(f'zenoh router did not start (exit {code}):\n{line}{out}\n{err}')

    def router(self, secure: bool = True) -> None:
        """The router alone (a test serving loom/cloud itself)."""
        self._router(secure)

    def start(self, *flags, secure: bool = True):
        """A loom_cloud signing as the fleet's `cloud` (also its TLS identity when secure)."""
        self._router(secure)
        proc = self.spawn('-m', 'loom_ros.cloud.server', '--connect',
                          f'tcp/127.0.0.1:{self.port}', '--keys-dir', str(self.fleet),
                          *([] if secure else ['--insecure']), *flags)
        line = proc.popen.stdout.readline()
        if not line or not json.loads(line).get('ready'):
            code, out, err = proc.finish()
            pytest.fail(f'loom_cloud did not start (exit {code}):\n{line}{out}\n{err}')
        return proc

    def session(self, name: str | None = None):
        """A client session to the router: as fleet identity `name` (mutual TLS on a secure
        router), or with no credentials at all (name None; only an insecure router admits it)."""
        import zenoh
        from loom_ros.bridge.zenoh_link import session_config
        identity = keys.load(self.fleet, name) if name and self.secure else None
        session = zenoh.open(session_config('client', [f'tcp/127.0.0.1:{self.port}'],
                                            identity=identity))
        self.sessions.append(session)
        return session


@pytest.fixture
def net(spawn, port, fleet, monkeypatch, tmp_path):
    monkeypatch.delenv('LOOM_CLOUD_CHAT_URL', raising=False)  # chat unconfigured unless set
    made = CloudNet(spawn, port, fleet, tmp_path)
    yield made
    for session in made.sessions:
        session.close()


@pytest.fixture
def cloud(net):
    """start(*flags, secure=True) runs a loom_cloud (and the router on the first call)."""
    return net.start


def stop_stats(proc) -> dict:
    """SIGTERM a loom_cloud and return the counters of its last line."""
    proc.popen.send_signal(signal.SIGTERM)
    code, out, err = proc.finish()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])['stats']


def signed_get(session, identity, task: str, body: dict, *, timeout: float = 30.0,
               ident: str | None = None, payload: bytes | None = None):
    """One request signed by `identity` (or the raw `payload`), its replies checked like the
    client does: returns (ok, reply dict, signer name) of the one authentic reply."""
    import zenoh
    ident = ident or uuid.uuid4().hex
    if payload is None:
        payload = Signer(identity).request(task, body, ident, int(time.time() * 1000))
    verifier = Verifier(identity.ca.read_bytes(), ('cloud',))
    replies = list(session.get(f'loom/cloud/infer/{task}', payload=payload, timeout=timeout,
                               consolidation=zenoh.ConsolidationMode.NONE))
    assert len(replies) == 1, replies
    reply = replies[0]
    header, data = unpack((reply.ok or reply.err).payload.to_bytes())
    name, _ = verifier.verify(header, reply_signed_bytes(header['id'], digest(payload), data))
    return reply.ok is not None, parse_reply(data), name


def forging_queryable(forgers, count: int = 1, asked: list | None = None):
    """A fake cloud's `loom/cloud/erase` handler: for each (signer, subject_ref or None for the
    request's own) in `forgers`, an otherwise well-formed receipt signed by that signer (a
    robot, another authority's cloud, the real cloud for another subject), then an empty ok
    answer; each query asked is noted in `asked`."""
    from loom_ros.cloud.erasure import receipt_signed_bytes
    from loom_ros.cloud.protocol import digest, encode, unpack

    def forge(query):
        raw = query.payload.to_bytes()
        header, body = unpack(raw)
        request = json.loads(body)
        for signer, other_ref in forgers:
            receipt = {'request_id': header['id'],
                       'subject_ref': other_ref or request['subject_ref'],
                       'robot': request['robot'], 'requested_by': 'robot1', 'server': 'fake',
                       'cloud': 'cloud', 'at_ms': 0, 'counts': {'request_log': count},
                       'scrubbed': True, 'keeps': 'request_log'}
            answer = {'id': header['id'], 'ok': True, 'task': 'erase', 'cost': 0.0,
                      'result': {'receipt': receipt,
                                 'sig': signer.sign(receipt_signed_bytes(receipt))}}
            query.reply(query.key_expr, signer.reply(header['id'], digest(raw), answer))
        query.reply(query.key_expr, encode({'id': header['id'], 'ok': True, 'result': {}}))
        if asked is not None:
            asked.append(1)
    return forge
