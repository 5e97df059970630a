"""Consent at the recorder and in training (issue 17), with real MCAP files and a real consent
registry: `loom record` leaves out the payload of an event naming a data subject without
`recording` consent (its metadata kept and the payload marked), a change holds from the next
event, and `loom router train` leaves out the rows of subjects without `learning` consent,
counts them and says so."""
from __future__ import annotations

import json
import os
import signal

import pytest
from mcap.reader import make_reader
from rclpy.serialization import deserialize_message, serialize_message

from harness import LinePeer, loom_cli
from mcap_files import T0
from loom_ros.cli.record import STRIPPED_KEY, McapRecorder, consent_hook

NONE = {'store': False, 'cloud': False, 'recording': False, 'fleet': False, 'learning': False}


@pytest.fixture
def registry(tmp_path):
    from loom_ros.security.audit import AuditLog
    from loom_ros.storage.consent import ConsentRegistry, SubjectRefs, consent_path
    audit = AuditLog(tmp_path / 'root' / 'audit.db')
    reg = ConsentRegistry(consent_path(tmp_path / 'root'), NONE, audit=audit,
                          refs=SubjectRefs.at(tmp_path / 'root' / 'keys'))
    yield reg
    reg.close()
    audit.close()


def _event(id, payload=b'words', subjects=()):
    from loom_msgs.msg import Event, KeyValue
    return Event(id=id, type='speech.utterance', payload=payload, source='asr',
                 metadata=[KeyValue(key='loom.subject', value=s) for s in subjects] +
                 [KeyValue(key='lang', value='en')])


def _events(path) -> dict:
    from loom_msgs.msg import Event, EventBatch
    found = {}
    with open(path, 'rb') as stream:
        for _, channel, m in make_reader(stream).iter_messages():
            batch = channel.topic.endswith('batch')
            msg = deserialize_message(m.data, EventBatch if batch else Event)
            for e in (msg.events if batch else [msg]):
                found[e.id] = (bytes(e.payload), [(kv.key, kv.value) for kv in e.metadata])
    return found


def test_payloads_of_subjects_without_recording_consent_are_left_out(tmp_path, registry):
    from loom_msgs.msg import EventBatch
    registry.grant('alice', 'recording', 'test')
    registry.grant('bob', 'recording', 'test')
    registry.withdraw('bob', 'recording', 'test')
    registry.grant('carol', 'learning', 'test')   # another purpose: not recording
    recorder = McapRecorder(tmp_path / 'rec.mcap', privacy=consent_hook(registry.lookup))
    recorder.add_topic('/e', 'loom_msgs/msg/Event')
    recorder.add_topic('/batch', 'loom_msgs/msg/EventBatch')
    for id, subjects in (('anon', ()), ('alice', ('alice',)), ('bob', ('bob',)),
                         ('carol', ('carol',)), ('never', ('dave',)), ('bad', ('no spaces',)),
                         ('empty', ('',)), ('two', ('alice', 'bob'))):
        recorder.write('/e', serialize_message(_event(id, subjects=subjects)))
    recorder.write('/batch', serialize_message(EventBatch(events=[
        _event('b-alice', subjects=('alice',)), _event('b-bob', subjects=('bob',))])))
    # A change holds from the next event, in this process and without reopening anything.
    registry.withdraw('alice', 'recording', 'test')
    registry.grant('dave', 'recording', 'test')
    recorder.write('/e', serialize_message(_event('alice-later', subjects=('alice',))))
    recorder.write('/e', serialize_message(_event('dave-later', subjects=('dave',))))
    recorder.close()
    events = _events(tmp_path / 'rec.mcap')
    kept = {'anon', 'alice', 'b-alice', 'dave-later'}
    assert set(events) == kept | {'bob', 'carol', 'never', 'bad', 'empty', 'two', 'b-bob',
                                  'alice-later'}   # every event is in the file
    for id, (payload, metadata) in events.items():
        if id in kept:
            assert payload == b'words' and (STRIPPED_KEY, 'consent') not in metadata, id
        else:   # the payload left out and marked; the metadata (who, language) kept
            assert payload == b'' and (STRIPPED_KEY, 'consent') in metadata, id
            assert ('lang', 'en') in metadata and any(k == 'loom.subject' for k, _ in metadata)
    assert recorder.stripped() == recorder.stripped_consent() == 8


def test_a_registry_that_cannot_answer_strips(tmp_path):
    def broken(subject, purpose):
        raise OSError('disk gone')
    recorder = McapRecorder(tmp_path / 'rec.mcap', privacy=consent_hook(broken))
    recorder.add_topic('/e', 'loom_msgs/msg/Event')
    recorder.write('/e', serialize_message(_event('anon')))
    recorder.write('/e', serialize_message(_event('alice', subjects=('alice',))))
    recorder.close()
    events = _events(tmp_path / 'rec.mcap')
    assert events['anon'][0] == b'words' and events['alice'][0] == b''


def test_loom_record_asks_the_roots_registry(ros, tmp_path, registry):
    """The real `loom record` on a real topic, with --root naming the registry above."""
    from loom_msgs.msg import EventBatch
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    registry.grant('alice', 'recording', 'test')
    topic = '/consent_rec/batch'
    pub = ros.node.create_publisher(EventBatch, topic,
                                    QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    recorder = LinePeer('loom record', [*loom_cli(
        'record', '--output', str(tmp_path / 'rec.mcap'), '--topics', topic,
        '--root', str(tmp_path / 'root'))], os.environ.copy(), terminate_on_close=True)
    try:
        # Both ends of the match: the recorder's reader (its `matched` line) and our writer;
        # one batch, so its first_message line says all three events are in the file.
        recorder.wait_line(lambda line: '"matched"' in line and topic in line,
                           'the match with the test publisher')
        ros.wait_for(lambda: pub.get_subscription_count() >= 1, 'the recorder as subscriber')
        pub.publish(EventBatch(events=[_event(id, subjects=subjects) for id, subjects in (
            ('anon', ()), ('alice', ('alice',)), ('bob', ('bob',)))]))
        recorder.wait_line(lambda line: '"first_message"' in line, 'the batch written')
        recorder.popen.send_signal(signal.SIGINT)
        summary = json.loads(recorder.wait_line(lambda line: '"messages"' in line,
                                                'the summary'))
    finally:
        recorder.close()
        ros.node.destroy_publisher(pub)
    assert summary['messages'][topic] == 1, summary
    assert summary['stripped'] == summary['stripped_consent'] == 1, summary
    events = _events(tmp_path / 'rec.mcap')
    assert events['anon'][0] == events['alice'][0] == b'words' and events['bob'][0] == b''


def _training_run(path, groups: dict[str, tuple], t0=T0):
    """Decisions, outcomes with verdicts and the utterances they routed, per subject group:
    {name: (subjects on the event, record the event?, outcome says names_subject, rows[,
    the decision's own subject])}."""
    from builtin_interfaces.msg import Time
    from loom_msgs.msg import RouteOutcome

    from loom_ros.bus.event import Privacy
    from loom_ros.router.decision import Decision, Route
    from loom_ros.router.local import RouteAnswer, RouteQuery
    from loom_ros.router.messages import decision_msg
    recorder = McapRecorder(path)   # keeps every payload: training reads the metadata
    for topic, full_type in (('/r/router/decisions', 'loom_msgs/msg/RouteDecision'),
                             ('/r/router/outcomes', 'loom_msgs/msg/RouteOutcome'),
                             ('/r/loom/mic/primary/speech', 'loom_msgs/msg/Event')):
        recorder.add_topic(topic, full_type)
    t = t0
    for name, (subjects, record_event, names, n, *decided) in groups.items():
        for i in range(n):
            t += 1000
            event_id = f'{name}-{i}'
            if record_event:
                recorder.write('/r/loom/mic/primary/speech',
                               serialize_message(_event(event_id, subjects=subjects)), t)
            conf = (i % 10) / 10
            query = RouteQuery(event_id=event_id, event_type='speech.utterance',
                               privacy=Privacy.PUBLIC, local_confidence=conf,
                               subject=decided[0] if decided else '')
            answer = RouteAnswer.of(f'd-{event_id}', Decision(Route.LOCAL, conf, 'threshold',
                                                              'r'))
            recorder.write('/r/router/decisions',
                           serialize_message(decision_msg(query, answer, Time())), t + 1)
            recorder.write('/r/router/outcomes', serialize_message(RouteOutcome(
                decision_id=f'd-{event_id}', event_type='speech.utterance', backend='local',
                latency_ms=5.0, success=True, confidence=conf, has_local_verdict=True,
                local_good_enough=conf >= 0.5, names_subject=names)), t + 2)
    recorder.close()


def test_training_leaves_out_subjects_without_learning_consent(tmp_path, registry, capsys):
    from loom_ros.cli import main
    from loom_ros.router.train_recorded import load
    registry.grant('alice', 'learning', 'test')
    registry.grant('bob', 'learning', 'test')
    registry.withdraw('bob', 'learning', 'test')
    registry.grant('carol', 'recording', 'test')   # not learning
    groups = {'anon': ((), True, False, 20), 'anon_unrecorded': ((), False, False, 20),
              'alice': (('alice',), True, True, 20), 'bob': (('bob',), True, True, 10),
              'carol': (('carol',), True, True, 10), 'dave': (('dave',), True, False, 10),
              'lost': (('alice',), False, True, 10), 'bad': (('no spaces',), True, True, 10),
              'two': (('alice', 'bob'), True, True, 10)}
    for f in range(2):
        _training_run(tmp_path / 'rec' / f'run{f}.mcap', groups, T0 + f * 10**12)
    dataset = load([str(tmp_path / 'rec')], consent=registry.lookup)
    used = {r['decision_id'].rsplit('-', 1)[0][2:] for r in dataset.rows}
    assert used == {'anon', 'anon_unrecorded', 'alice'}
    assert len(dataset.rows) == 2 * 60
    counts = dataset.counts
    # bob withdrew, carol and dave (named only on the event) never gave learning consent
    assert counts['no_learning_consent'] == 2 * (10 + 10 + 10)
    assert counts['subject_not_recorded'] == 2 * 10   # 'lost': who it was is not in the file
    assert counts['invalid_subject'] == 2 * (10 + 10)   # 'bad', and 'two' (two subjects)
    # Without a registry no subject's row is used.
    blind = load([str(tmp_path / 'rec')])
    assert {r['decision_id'].rsplit('-', 1)[0][2:] for r in blind.rows} == \
        {'anon', 'anon_unrecorded'}
    assert blind.counts['no_consent_registry'] == 2 * 70
    # The command says how many rows consent left out.
    assert main(['router', 'train', '--from', str(tmp_path / 'rec'), '--root',
                 str(tmp_path / 'root')]) == 0
    out = capsys.readouterr().out
    assert 'rows left out for consent: 120 (no_learning_consent 60, subject_not_recorded 20, ' \
        'invalid_subject 40)' in out, out


def test_a_decision_that_names_its_subject_is_held_to_that_subjects_consent(tmp_path, registry):
    """RouteDecision.subject (what an agent host's in-process router publishes): a decision about
    bob is no anonymous training row even when neither its event nor its outcome says so."""
    from loom_ros.router.train_recorded import load
    registry.grant('alice', 'learning', 'test')
    registry.grant('bob', 'learning', 'test')
    registry.withdraw('bob', 'learning', 'test')
    groups = {'anon': ((), False, False, 10), 'bob': ((), False, False, 10, 'bob'),
              'alice': ((), False, False, 10, 'alice'),
              'both': (('alice',), True, True, 10, 'bob')}
    _training_run(tmp_path / 'rec' / 'run.mcap', groups)
    dataset = load([str(tmp_path / 'rec')], consent=registry.lookup)
    assert {r['decision_id'].rsplit('-', 1)[0][2:] for r in dataset.rows} == {'anon', 'alice'}
    assert dataset.counts['no_learning_consent'] == 10
    assert dataset.counts['invalid_subject'] == 10    # the event says alice, the decision bob
    blind = load([str(tmp_path / 'rec')])
    assert {r['decision_id'].rsplit('-', 1)[0][2:] for r in blind.rows} == {'anon'}
