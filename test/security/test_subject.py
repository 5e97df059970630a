"""The data-subject metadata key: what a valid subject id is, and that hostile values (huge,
path tricks, control characters, look-alike letters, wrong types) are refused without echoing
them whole, while anonymous events stay anonymous."""
import pytest
from hypothesis import given, strategies as st

from loom_ros.bus.event import Event
from loom_ros.bus.privacy import (MAX_SUBJECT_CHARS, SOMEONE, SUBJECT_METADATA_KEY, SubjectError,
                                  check_subject, event_subject, named_subject,
                                  subject_or_someone)


@pytest.mark.parametrize('subject', ['alice', 'face:1234', 'alice@home.example', 'A', '7',
                                     'speaker_2-b+c', 'x' * MAX_SUBJECT_CHARS])
def test_valid_subjects(subject):
    assert check_subject(subject) == subject
    assert event_subject(Event(type='t', metadata={SUBJECT_METADATA_KEY: subject})) == subject


@pytest.mark.parametrize('value, rule', [
    ('', '1-128 characters'),
    ('x' * (MAX_SUBJECT_CHARS + 1), '1-128 characters'),
    ('y' * 4096, '1-128 characters'),                 # as long as metadata allows
    ('../../etc/passwd', 'ASCII letters'),
    ('a/b', 'ASCII letters'), ('a\\b', 'ASCII letters'), ('a..b', 'no ".."'),
    ('alice\n', 'ASCII letters'), ('alice\x00bob', 'ASCII letters'), ('al ice', 'ASCII letters'),
    ('\u0430lice', 'ASCII letters'),                  # Cyrillic a: looks like "alice"
    ('alice\u200b', 'ASCII letters'),                 # zero-width space
    ('-alice', 'ASCII letters'), ('.hidden', 'ASCII letters'), ("a'; drop table", 'ASCII'),
    ('%2e%2e', 'ASCII letters'), ('alice\udc80', 'ASCII letters'),
    (None, 'must be a string'), (42, 'must be a string'), (b'alice', 'must be a string'),
    (['alice'], 'must be a string'), ({'a': 1}, 'must be a string'),
])
def test_hostile_subjects_are_refused(value, rule):
    with pytest.raises(SubjectError, match=rule) as info:
        check_subject(value)
    assert len(str(info.value)) < 200          # never the whole value back
    if isinstance(value, str) and len(value) > 1:   # nor any of it: an invalid id may be a name
        assert value[:2] not in str(info.value).split(':')[0].replace('a data subject', '')


def test_events_without_the_key_are_anonymous_and_a_bad_value_is_an_error():
    assert event_subject(Event(type='t')) == ''
    assert event_subject(Event(type='t', metadata={'subject': 'alice'})) == ''   # not our key
    with pytest.raises(SubjectError):
        event_subject(Event(type='t', metadata={SUBJECT_METADATA_KEY: ''}))
    with pytest.raises(SubjectError):
        event_subject(Event(type='t', metadata={SUBJECT_METADATA_KEY: 'a' * 4000}))


def test_what_is_carried_onto_derived_data_is_never_anonymous_when_a_subject_was_named():
    """named_subject (agents and plugins carry it onto what they derive) keeps an invalid id
    as written, for the consent rule to refuse, bounded; subject_or_someone (recorder, export)
    makes it SOMEONE. Both are '' only when the event names no one."""
    def named(value):
        return Event(type='t', metadata={SUBJECT_METADATA_KEY: value})
    assert named_subject(Event(type='t')) == subject_or_someone(Event(type='t')) == ''
    assert named_subject(named('alice')) == subject_or_someone(named('alice')) == 'alice'
    assert named_subject(named('')) == subject_or_someone(named('')) == SOMEONE
    assert named_subject(named('Bob Smith')) == 'Bob Smith'      # judged, refused, later
    assert subject_or_someone(named('Bob Smith')) == SOMEONE
    assert len(named_subject(named('y' * 4096))) == 1024
    with pytest.raises(SubjectError):
        check_subject(named_subject(named('')))    # SOMEONE is no id: no consent for it


@given(st.text(max_size=300))
def test_anything_accepted_is_short_safe_ascii(text):
    try:
        subject = check_subject(text)
    except SubjectError:
        return
    assert 1 <= len(subject) <= MAX_SUBJECT_CHARS and subject.isascii() and subject.isprintable()
    assert not set(subject) & set('/\\ \t\n\r\x00\'"%') and '..' not in subject
