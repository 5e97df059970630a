"""Fault 4 (issue 13) at the gate: it decides from what the event is, never from a flag any
publisher can set, and privacy stated in metadata is never ignored (the strictest wins)."""
import numpy

from bridge_doubles import Recorder
from loom_ros.bridge.core import Bridge, BridgeConfig
from loom_ros.bridge.gate import BridgeRules, DirectionRules, PrivacyGate, is_embedding
from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.privacy import effective_privacy
from loom_ros.bus.qos import QosLevel

PIN = b'my pin is 4242'


def make_bridge():
    audit = []
    transport = Recorder()
    rules = BridgeRules(out=DirectionRules.parse(['agent.*.intent', 'mic.primary.speech']))
    bridge = Bridge(BridgeConfig('r1', rules), transport, lambda topic: QosLevel.BATCHED,
                    audit=audit.append)
    return bridge, transport, audit


def test_forged_upload_flag_does_not_make_raw_data_an_embedding():
    bridge, transport, audit = make_bridge()
    forged = [Event(type='speech.utterance', payload=PIN, privacy=p,
                    metadata={'loom.upload': 'embedding'})
              for p in (Privacy.SENSITIVE, Privacy.PRIVATE, Privacy.LOCAL_ONLY)]
    # Even dressed as an embedding: the text read as float32 is not unit vectors.
    forged.append(Event(type='text.embedding', payload=PIN[:12], privacy=Privacy.SENSITIVE,
                        metadata={'loom.upload': 'embedding', 'dim': '3', 'count': '1'}))
    verdicts = [bridge.send(e, 'mic.primary.speech') for e in forged]
    assert verdicts == ['refused_sensitive_raw', 'refused_private', 'refused_local_only',
                        'refused_sensitive_raw']
    assert transport.puts == [] and len(audit) == 4
    assert bridge.stats['refused_sensitive_raw'] == 2


def test_privacy_in_metadata_is_never_ignored():
    bridge, transport, audit = make_bridge()
    stated = {'privacy': 'local_only', 'loom.privacy': 'Private'}
    for key, value in stated.items():
        event = Event(type='intent', payload=PIN, privacy=Privacy.PUBLIC, metadata={key: value})
        assert effective_privacy(event) is Privacy[value.upper()]
        assert bridge.send(event, 'agent.voice.intent').startswith('refused_')
    # Metadata cannot lower the field; garbage (or an over-long value) stays home.
    assert effective_privacy(Event(type='t', privacy=Privacy.PRIVATE,
                                   metadata={'privacy': 'public'})) is Privacy.PRIVATE
    for junk in ('nope', 'x' * 100_000, '9', '3' + ' ' * 40):
        event = Event(type='t', payload=PIN, metadata={'privacy': junk})
        assert effective_privacy(event) is Privacy.LOCAL_ONLY
        assert bridge.send(event, 'agent.voice.intent') == 'refused_local_only'
    assert effective_privacy(Event(type='t', metadata={'privacy': '1'})) is Privacy.SENSITIVE
    assert transport.puts == []
    assert bridge.stats['refused_local_only'] == 5 and bridge.stats['refused_private'] == 1


def test_a_real_embedding_still_crosses_and_a_policy_of_none_keeps_it():
    vectors = numpy.random.default_rng(1).normal(size=(2, 384))
    vectors /= numpy.linalg.norm(vectors, axis=1, keepdims=True)
    event = Event(type='text.embedding', payload=vectors.astype('<f4').tobytes(),
                  privacy=Privacy.SENSITIVE,
                  metadata={'dim': '384', 'count': '2', 'dtype': 'float32'})
    assert is_embedding(event) and PrivacyGate().refusal(event) is None
    # Wrong shape, a NaN, or not unit length: not what the embedder makes.
    for bad in ({'count': '3'}, {'dim': '385'}, {'dim': '-1'}, {'dtype': 'float64'}):
        assert not is_embedding(Event(type=event.type, payload=event.payload,
                                      metadata={**event.metadata, **bad}))
    scaled = (vectors * 2).astype('<f4').tobytes()
    assert not is_embedding(Event(type=event.type, payload=scaled, metadata=event.metadata))
    nan = vectors.astype('<f4')
    nan[0, 0] = numpy.nan
    assert not is_embedding(Event(type=event.type, payload=nan.tobytes(),
                                  metadata=event.metadata))
