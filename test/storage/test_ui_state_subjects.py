"""A person's words on the robot's screen (the ui plugin's state on loom/ui/state) are theirs in
recordings too: the state says whose update set each field (`loom.subjects`), `loom record`
keeps a field only with its subject's recording consent, `loom forget` takes the subject's
fields out and `loom export` hands them over; what others put on the screen stays (review
finding: the words reached recordings past consent and stayed after forget)."""
from __future__ import annotations

import io
import json
import zipfile

from mcap.reader import make_reader
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import String

from loom_ros.bus.event import Event
from loom_ros.bus.privacy import (SUBJECT_METADATA_KEY, SUBJECTS_JSON_KEY, ConsentState,
                                  audit_withholds, json_subject_fields, subject_or_someone)
from loom_ros.cli.record import DEFAULT_TOPICS, McapRecorder, consent_hook
from loom_ros.plugins.actuators.ui import UiState
from loom_ros.storage.erasure import _recording_messages, export, forget
from loom_ros.storage.layout import StorageLayout

STATE = '/loom/ui/state'
ALICE, BOB = 'CANARY-alice-test-result', 'CANARY-bob-appointment'


def _update(state: UiState, update: dict, subject: str | None = None) -> str:
    event = Event.with_json('ui_update', update, source='voice',
                            metadata={SUBJECT_METADATA_KEY: subject} if subject is not None
                            else {})
    shown = state.apply(event.json(), event.source, event.timestamp_ms, audit_withholds(event),
                        subject_or_someone(event))
    return UiState.encode(shown).decode()


def _owners(text: str) -> dict | None:
    read = json_subject_fields(text)
    return None if read is None else read[1]


def _states(path) -> list[dict]:
    return [json.loads(deserialize_message(m.data, String).data)
            for _s, _sc, c, m in _recording_messages(path) if m is not None and c.topic == STATE]


def test_the_state_says_whose_each_field_is_until_it_is_replaced():
    state = UiState()
    assert _owners(_update(state, {'text': 'hello'})) is None            # anonymous: no map
    assert _owners(_update(state, {'text': ALICE}, 'alice')) == {'text': 'alice'}
    # an anonymous emoji beside alice's text: the text is still hers, the emoji no one's
    assert _owners(_update(state, {'emoji': ':)'})) == {'text': 'alice'}
    assert _owners(_update(state, {'label': 'x'}, '')) == {'text': 'alice', 'label': '..'}
    assert _owners(_update(state, {'text': 'y'}, 'not valid!')) == {'text': '..', 'label': '..'}
    assert _owners(_update(state, {'clear': True, 'emoji': ':|'})) is None


def test_recorder_keeps_only_consented_fields_and_forget_and_export_find_them(tmp_path):
    assert 'loom/ui/markers' not in DEFAULT_TOPICS   # rviz's copy says no one's: opt-in
    layout = StorageLayout.at(tmp_path)
    path = layout.recordings / 'run.mcap'
    granted = {'bob'}
    recorder = McapRecorder(path, privacy=consent_hook(
        lambda subject, purpose: ConsentState(purpose, granted=subject in granted)))
    recorder.add_topic(STATE, 'std_msgs/msg/String')
    state = UiState()
    for text in (_update(state, {'emoji': ':)', 'label': 'happy'}),
                 _update(state, {'text': ALICE}, 'alice'),
                 _update(state, {'label': BOB}, 'bob'),
                 _update(state, {'text': 'later'})):
        recorder.write(STATE, serialize_message(String(data=text)))
    recorder.close()
    assert recorder.stripped_consent() == 2      # alice's text, in two states
    states = _states(path)
    assert not any(ALICE in json.dumps(s) for s in states)
    assert states[1]['emoji'] == ':)' and 'text' not in states[1]          # the face stays
    assert states[1]['loom.stripped'] == {'text': 'consent'}
    assert states[2]['label'] == BOB and states[2][SUBJECTS_JSON_KEY] == {'label': 'bob'}
    assert states[3] == {**states[3], 'text': 'later', 'label': BOB}
    # bob's export: his label in the states that showed it, nothing of alice's or the face's
    export(layout, 'bob', tmp_path / 'bob.zip')
    with zipfile.ZipFile(tmp_path / 'bob.zip') as archive:
        recorded = archive.read('media/run.mcap')
    mine = [json.loads(deserialize_message(m.data, String).data)
            for _s, _c, m in make_reader(io.BytesIO(recorded)).iter_messages()]
    assert mine == [{'label': BOB, SUBJECTS_JSON_KEY: {'label': 'bob'}}] * 2
    # forget bob: his label goes from every state, what others showed stays
    receipt = forget(layout, 'bob')
    assert receipt.counts['recording_messages'] == 2
    after = _states(path)
    assert len(after) == 4 and not any(BOB in json.dumps(s) for s in after)
    assert after[2]['emoji'] == ':)' and after[2]['loom.stripped'] == {'text': 'consent',
                                                                      'label': 'erased'}
    assert after[3]['text'] == 'later' and SUBJECTS_JSON_KEY not in after[3]
    assert after[0] == states[0]


def test_a_forged_or_broken_map_strips_rather_than_keeps(tmp_path):
    """Anyone may publish on loom/ui/state: a map that is not {field: valid id} cannot make a
    field pass as consented."""
    recorder = McapRecorder(tmp_path / 'r.mcap', privacy=consent_hook(
        lambda subject, purpose: ConsentState(purpose, granted=True)))
    recorder.add_topic(STATE, 'std_msgs/msg/String')
    for forged in ({'text': 'words', SUBJECTS_JSON_KEY: ['alice']},
                   {'text': 'words', SUBJECTS_JSON_KEY: {'text': '../x'}}):
        recorder.write(STATE, serialize_message(String(data=json.dumps(forged))))
    recorder.close()
    assert [s.get('text') for s in _states(tmp_path / 'r.mcap')] == [None, None]
    assert recorder.stripped_consent() == 2


def test_masking_keeps_the_state_readable_and_its_ids_findable(tmp_path):
    """Second review: the recorder masked the state as one text, so an e-mail id became
    `<email>`, a state over 4,096 characters was cut mid-JSON and `password="x` lost its
    escape: forget and export then could not read the state or find the subject."""
    from loom_ros.bus.event import Event as BusEvent
    layout = StorageLayout.at(tmp_path)
    path = layout.recordings / 'run.mcap'
    who = 'alice@example.com'
    recorder = McapRecorder(path, privacy=consent_hook(
        lambda subject, purpose: ConsentState(purpose, granted=True)))
    recorder.add_topic(STATE, 'std_msgs/msg/String')
    recorder.add_topic('/loom/agent/voice/action', 'loom_msgs/msg/Event')
    state = UiState(max_text_chars=8000)
    words = f'{ALICE} my password="hunter2" ' + 'x' * 6000
    recorder.write(STATE, serialize_message(String(data=_update(
        state, {'text': words, 'count': 12}, who))))
    event = BusEvent.with_json('ui_update', {'text': ALICE}, metadata={SUBJECT_METADATA_KEY: who})
    recorder.write('/loom/agent/voice/action', serialize_message(event.to_msg()))
    recorder.close()
    [recorded] = _states(path)                        # valid JSON, not cut
    assert recorded[SUBJECTS_JSON_KEY] == {'text': who, 'count': who}
    assert ALICE in recorded['text'] and 'hunter2' not in recorded['text']   # still masked
    assert len(recorded['text']) > 4096 and recorded['count'] == 12
    receipt = forget(layout, who)
    assert receipt.counts['recording_messages'] == 2   # the state's fields and the event
    assert _states(path)[0].get('text') is None
    remaining = b''.join(m.data for _s, _sc, _c, m in _recording_messages(path) if m)
    assert ALICE.encode() not in remaining and who.encode() not in remaining


def test_a_state_that_cannot_be_read_or_names_too_many_is_not_kept(tmp_path):
    recorder = McapRecorder(tmp_path / 'r.mcap', privacy=consent_hook(
        lambda subject, purpose: ConsentState(purpose, granted=True)))
    recorder.add_topic(STATE, 'std_msgs/msg/String')
    many = {f'f{i}': 'words' for i in range(40)}
    many[SUBJECTS_JSON_KEY] = {f'f{i}': f'person{i}' for i in range(40)}   # 40 distinct ids
    for text in ('{"loom.subjects": {"text": "alice"}, "text": "cut sh',
                 json.dumps(many)):
        recorder.write(STATE, serialize_message(String(data=text)))
    recorder.close()
    first, second = _states(tmp_path / 'r.mcap')
    assert first == {'loom.stripped': 'unreadable'}
    assert not any(k.startswith('f') for k in second)        # every field someone's: none kept


def test_a_state_masked_as_json_hides_what_its_text_would_have(tmp_path):
    """Third review: masking field by field let compound secret names (`accesstoken`), secrets
    in field names, a forged map's keys and a sender's `loom.stripped` through in clear."""
    recorder = McapRecorder(tmp_path / 'r.mcap', privacy=consent_hook(
        lambda subject, purpose: ConsentState(purpose, granted=subject == 'alice')))
    recorder.add_topic(STATE, 'std_msgs/msg/String')
    state = {'accesstoken': 'tok-visible-1', 'cfg': {'dbpassword': 'pw-visible-2'},
             'bob@example.org': 'online', 'text': 'hello',
             'loom.stripped': 'password=hunter2 carol@example.com',
             SUBJECTS_JSON_KEY: {'text': 'alice', 'token=ghp_abcdefghijkl': 'alice'}}
    recorder.write(STATE, serialize_message(String(data=json.dumps(state))))
    recorder.close()
    [recorded] = _states(tmp_path / 'r.mcap')
    text = json.dumps(recorded)
    for secret in ('tok-visible-1', 'pw-visible-2', 'bob@example.org', 'hunter2',
                   'carol@example.com', 'ghp_abcdefghijkl'):
        assert secret not in text, secret
    assert recorded['text'] == 'hello' and recorded[SUBJECTS_JSON_KEY] == {'text': 'alice'}
    assert 'loom.stripped' not in recorded


def test_forget_drops_an_unreadable_state_only_for_a_whole_id(tmp_path):
    """Third review: forget matched the id as a substring of a state cut by the old recorder,
    so forgetting `u1` or `e` deleted other people's states."""
    from mcap.writer import Writer
    path = StorageLayout.at(tmp_path).recordings / 'old.mcap'
    path.parent.mkdir(parents=True)
    cut = '{"loom.subjects":{"text":"u12","label":"carol"},"text":"words of u12 and car'
    with open(path, 'wb') as out:
        writer = Writer(out)
        writer.start(profile='ros2')
        schema = writer.register_schema('std_msgs/msg/String', 'ros2msg', b'string data')
        channel = writer.register_channel(STATE, 'cdr', schema)
        writer.add_message(channel, 1, serialize_message(String(data=cut)), 1)
        writer.finish()
    for other in ('u1', 'car', 'e'):
        assert forget(StorageLayout.at(tmp_path), other).counts['recording_messages'] == 0
    assert len(_states_raw(path)) == 1
    assert forget(StorageLayout.at(tmp_path), 'u12').counts['recording_messages'] == 1
    assert _states_raw(path) == []


def _states_raw(path) -> list[str]:
    return [deserialize_message(m.data, String).data
            for _s, _sc, c, m in _recording_messages(path) if m is not None]


def test_a_long_event_payload_is_cut_back_to_a_space_not_through_a_secret(tmp_path):
    from loom_ros.bus.event import Event as BusEvent
    from loom_ros.cli.record import MAX_MASKED_PAYLOAD
    recorder = McapRecorder(tmp_path / 'e.mcap')
    recorder.add_topic('/t', 'loom_msgs/msg/Event')
    pad = 'x ' * ((MAX_MASKED_PAYLOAD - 10) // 2)
    payload = (pad + 'alice.smith@example.com more words').encode()
    recorder.write('/t', serialize_message(BusEvent(type='t', payload=payload).to_msg()))
    recorder.close()
    from loom_msgs.msg import Event as EventMsg
    [msg] = [deserialize_message(m.data, EventMsg)
             for _s, _sc, _c, m in _recording_messages(tmp_path / 'e.mcap') if m]
    kept = bytes(msg.payload).decode()
    assert 'alice' not in kept and 'smith' not in kept


def test_names_that_mask_alike_never_file_one_subjects_value_under_another(tmp_path):
    """Fourth review: two e-mail field names both mask to `<email>`; the value and the owner
    were kept from different fields, so bob's value went into alice's export."""
    layout = StorageLayout.at(tmp_path)
    path = layout.recordings / 'run.mcap'
    recorder = McapRecorder(path, privacy=consent_hook(
        lambda subject, purpose: ConsentState(purpose, granted=True)))
    recorder.add_topic(STATE, 'std_msgs/msg/String')
    state = UiState()
    _update(state, {'x@a.org': 'anonymous first'})
    _update(state, {'y@b.org': 'BOB-SECRET-VALUE'}, 'bob')
    text = _update(state, {'x@a.org': 'ALICE-VALUE', 'text': 'hi'}, 'alice')
    recorder.write(STATE, serialize_message(String(data=text)))
    recorder.close()
    [recorded] = _states(path)
    assert 'BOB-SECRET-VALUE' not in json.dumps(recorded)
    assert 'ALICE-VALUE' not in json.dumps(recorded)
    assert recorded['loom.stripped'] == {'<email>': 'privacy'}
    assert recorded[SUBJECTS_JSON_KEY] == {'text': 'alice'}


def test_compact_json_is_not_cut_through_an_e_mail(tmp_path):
    from loom_msgs.msg import Event as EventMsg

    from loom_ros.bus.event import Event as BusEvent
    from loom_ros.cli.record import MAX_MASKED_PAYLOAD
    recorder = McapRecorder(tmp_path / 'e.mcap')
    recorder.add_topic('/t', 'loom_msgs/msg/Event')
    for shift in range(0, 40, 7):
        event = BusEvent.with_json('t', {'pad': 'x' * (MAX_MASKED_PAYLOAD - 30 - shift),
                                         'who': 'alice.smith@example.com'})
        recorder.write('/t', serialize_message(event.to_msg()))
    recorder.close()
    kept = [bytes(deserialize_message(m.data, EventMsg).payload).decode()
            for _s, _sc, _c, m in _recording_messages(tmp_path / 'e.mcap') if m]
    assert len(kept) == 6
    for payload in kept:
        assert 'alice' not in payload and 'example' not in payload, payload[-80:]
        assert len(payload) <= MAX_MASKED_PAYLOAD + 64
