"""The consent registry on real files: changes per subject and purpose with time and source,
defaults for subjects never asked (the shipped file and bad ones), every change an audit record
naming the subject only by its keyed hash (the chain still verifies), nothing changed when the
audit log cannot take it, erasure that leaves no byte of the subject in the files, and
`loom consent` as a user runs it (real processes)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from harness import REPO, WAIT_LIMIT_S
from loom_ros.bus.privacy import SubjectError
from loom_ros.security.audit import AuditError, AuditLog, verify_file
from loom_ros.storage.consent import (PURPOSES, SUBJECT_KEY_FILE, ConsentError,
                                      ConsentRegistry, SubjectRefs, consent_path, load_defaults,
                                      parse_defaults)

NONE = dict.fromkeys(PURPOSES, False)


class Clock:
    def __init__(self, ms: int = 1_700_000_000_000):
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def parts(tmp_path):
    """(registry, audit log, refs, clock) under one storage root."""
    audit = AuditLog(tmp_path / 'audit.db')
    refs = SubjectRefs.at(tmp_path / 'keys')
    clock = Clock()
    registry = ConsentRegistry(consent_path(tmp_path), NONE, audit=audit, refs=refs, clock=clock)
    yield registry, audit, refs, clock
    registry.close()
    audit.close()


def test_changes_per_subject_and_purpose_with_time_and_source(parts, tmp_path):
    registry, audit, refs, clock = parts
    never = registry.lookup('alice', 'cloud')
    assert (never.granted, never.asked) == (False, False)
    assert 'default for subjects never asked' in never.describe()
    registry.grant('alice', 'cloud', 'app:concierge')
    clock.ms += 60_000
    registry.withdraw('alice', 'cloud', 'cli:bob')
    registry.grant('alice', 'store', 'cli:bob')
    state = registry.lookup('alice', 'cloud')
    assert (state.granted, state.asked, state.source, state.changed_ms) == \
        (False, True, 'cli:bob', clock.ms)
    assert registry.allows('alice', 'store') and not registry.allows('bob', 'store')
    assert [(c.purpose, c.granted, c.source) for c in registry.history('alice')] == [
        ('cloud', True, 'app:concierge'), ('cloud', False, 'cli:bob'), ('store', True, 'cli:bob')]
    assert {p: s.granted for p, s in registry.show('alice').items()} == {**NONE, 'store': True}
    again = ConsentRegistry(consent_path(tmp_path), NONE, read_only=True)   # another reader
    assert again.allows('alice', 'store') and not again.allows('alice', 'cloud')
    again.close()


def test_every_change_is_an_audit_record_without_the_subject_id(parts, tmp_path):
    registry, audit, refs, clock = parts
    registry.grant('alice', 'cloud', 'app')
    registry.withdraw('alice', 'cloud', 'app')
    registry.grant('bob', 'fleet', 'app')
    rows = audit.query(plugin='consent')
    assert [(r['kind'], r['fields']['purpose']) for r in rows] == [
        ('consent_granted', 'cloud'), ('consent_withdrawn', 'cloud'), ('consent_granted', 'fleet')]
    assert rows[0]['fields']['subject_ref'] == refs.ref('alice') == rows[1]['fields']['subject_ref']
    assert rows[2]['fields']['subject_ref'] == refs.ref('bob') != refs.ref('alice')
    assert b'alice' not in (tmp_path / 'audit.db').read_bytes() + \
        (tmp_path / 'audit.db-wal').read_bytes()
    assert verify_file(tmp_path / 'audit.db').ok


def test_no_change_when_the_audit_log_cannot_take_it(parts):
    registry, audit, refs, clock = parts
    audit.close()
    with pytest.raises(AuditError, match='cannot write'):
        registry.grant('alice', 'cloud', 'app')
    assert registry.history('alice') == [] and not registry.allows('alice', 'cloud')


@pytest.mark.parametrize('call, error', [
    (lambda r: r.grant('../x', 'cloud', 'app'), SubjectError),
    (lambda r: r.grant('alice', 'telemetry', 'app'), ConsentError),
    (lambda r: r.grant('alice', 'cloud', 'me; rm -rf'), ConsentError),
    (lambda r: r.grant('alice', 'cloud', 'x' * 65), ConsentError),
    (lambda r: r.set('alice', 'cloud', 'yes', 'app'), ConsentError),
    (lambda r: r.lookup('a' * 129, 'cloud'), SubjectError),
    (lambda r: r.lookup('alice', None), ConsentError),
])
def test_bad_changes_are_refused_and_not_audited(parts, call, error):
    registry, audit, refs, clock = parts
    with pytest.raises(error):
        call(registry)
    assert audit.count() == 0


def test_defaults_from_the_shipped_file_and_bad_files(tmp_path):
    assert load_defaults(REPO / 'config' / 'consent.yaml') == NONE   # secure by default
    assert parse_defaults({'defaults': {'store': True}}) == {**NONE, 'store': True}
    for data, message in [({'defaults': {'telemetry': True}}, 'defaults.telemetry: not a purpose'),
                          ({'defaults': {'cloud': 'yes'}}, 'defaults.cloud: true or false'),
                          ({'default': {}}, 'one key, defaults'), ([1], 'one key, defaults'),
                          ({'defaults': [1]}, 'must map purposes')]:
        with pytest.raises(ConsentError, match=message):
            parse_defaults(data, 'c.yaml')
    bad = tmp_path / 'c.yaml'
    bad.write_text('defaults: {cloud: [}\n')
    with pytest.raises(ConsentError, match='not valid YAML'):
        load_defaults(bad)
    registry = ConsentRegistry(tmp_path / 'consent.db', {'cloud': True}, read_only=True)
    assert registry.lookup('never-asked', 'cloud').granted         # the configured default
    assert not registry.lookup('never-asked', 'fleet').granted
    assert not (tmp_path / 'consent.db').exists()                   # looking creates nothing
    registry.close()


def test_a_read_only_registry_sees_a_file_made_after_it_opened(tmp_path):
    reader = ConsentRegistry(consent_path(tmp_path), NONE, read_only=True)
    assert not reader.allows('alice', 'cloud')
    audit = AuditLog(tmp_path / 'audit.db')
    writer = ConsentRegistry(consent_path(tmp_path), NONE, audit=audit,
                             refs=SubjectRefs.at(tmp_path / 'keys'))
    writer.grant('alice', 'cloud', 'app')
    assert reader.allows('alice', 'cloud')
    for thing in (reader, writer, audit):
        thing.close()


def test_subject_refs_are_keyed_stable_and_private(tmp_path):
    keys = tmp_path / 'keys'
    first, second = SubjectRefs.at(keys), SubjectRefs.at(keys)
    assert first.ref('alice') == second.ref('alice') != first.ref('alicf')
    assert first.ref('alice') != SubjectRefs.at(tmp_path / 'other').ref('alice')   # other key
    assert stat.S_IMODE(os.stat(keys / SUBJECT_KEY_FILE).st_mode) == 0o600
    (keys / SUBJECT_KEY_FILE).write_bytes(b'short')
    with pytest.raises(ConsentError, match='not a 32-byte key'):
        SubjectRefs.at(keys)
    with pytest.raises(SubjectError):
        first.ref('no/slashes')


def test_erasure_leaves_no_byte_of_the_subject(parts, tmp_path):
    registry, audit, refs, clock = parts
    canary = 'canary-7f3e9a'
    for purpose in PURPOSES:
        registry.grant(canary, purpose, 'app')
    registry.grant('other-subject', 'cloud', 'app')
    assert registry.erase(canary) == len(PURPOSES)
    assert registry.history(canary) == [] and not registry.allows(canary, 'cloud')
    assert registry.allows('other-subject', 'cloud')
    held = b''.join(p.read_bytes() for p in tmp_path.glob('consent.db*'))
    assert canary.encode() not in held and b'other-subject' in held
    assert len(audit.query(plugin='consent')) == len(PURPOSES) + 1   # the audit keeps its refs


def consent_cli(root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'loom_ros.cli.consent', *args, '--root',
                           str(root)], capture_output=True, text=True, timeout=WAIT_LIMIT_S)


def test_the_cli_grants_withdraws_and_shows(tmp_path):
    grant = consent_cli(tmp_path, 'grant', 'alice', 'cloud', '--source', 'app:setup')
    assert grant.returncode == 0 and 'cloud consent granted at' in grant.stdout, grant.stderr
    shown = json.loads(consent_cli(tmp_path, 'show', 'alice', '--json').stdout)['consent']
    assert shown['cloud'] == {'granted': True, 'asked': True, 'source': 'app:setup',
                              'changed_ms': shown['cloud']['changed_ms']}
    assert shown['fleet'] == {'granted': False, 'asked': False, 'source': '', 'changed_ms': 0}
    withdraw = consent_cli(tmp_path, 'withdraw', 'alice')   # every purpose
    assert withdraw.returncode == 0 and withdraw.stdout.count('withdrawn at') == len(PURPOSES)
    history = consent_cli(tmp_path, 'show', 'alice', 'cloud', '--history')
    assert history.returncode == 0 and 'granted\tby app:setup' in history.stdout and \
        'withdrawn\tby cli:' in history.stdout
    verdict = verify_file(tmp_path / 'audit.db')
    assert verdict.ok and verdict.checked == 1 + len(PURPOSES)
    bad = consent_cli(tmp_path, 'grant', '../../etc', 'cloud')
    assert bad.returncode == 1 and 'data subject' in bad.stderr
    assert consent_cli(tmp_path, 'grant', 'alice').returncode == 2   # grant names a purpose
    refused = consent_cli(tmp_path, 'grant', 'alice', 'store', '--audit-db', str(tmp_path))
    assert refused.returncode == 1 and 'cannot open' in refused.stderr
    store = json.loads(consent_cli(tmp_path, 'show', 'alice', 'store', '--json').stdout)
    assert store['consent']['store']['granted'] is False     # the refused grant changed nothing
