"""Fault 4 (issue 13) across real processes: a Zenoh router, the bridge with the default
out_allow, the voice agent in its own process, this process as the robot's other nodes (and an
outside publisher on the same DDS domain) and as a listener on Zenoh. Nothing of a LocalOnly
utterance, nor of a Sensitive/Private event with a forged `loom.upload: embedding`, reaches Zenoh;
each refusal is counted by the bridge."""
import yaml

from loom_ros.bus.event import Event, Privacy
from loom_ros.security.audit import AuditLog

PIN = 'my pin is 4242'
# What a leak of the PIN looks like on Zenoh (its payload crosses as raw bytes). Not '4242'
# alone: the public sentinels the tests send while they wait cross with random ids, timestamps
# and sequence numbers, where those four digits can turn up by chance (a fresh-clone run failed
# on '4242' somewhere under loom/priv2/**; which sample held it was not recorded).
LEAK = 'pin is 4242'
AGENTS = {'agents': [{'id': 'voice', 'behavior': 'voice', 'subscriptions': ['mic.primary.speech'],
                      'settings': {'zenoh_connect': []}}]}


class Listener:
    """Every Zenoh sample under loom/<robot>/**, raw bytes kept."""

    def __init__(self, session, robot):
        self.samples = []
        self.sub = session.declare_subscriber(f'loom/{robot}/**', self._on)

    def _on(self, sample):
        self.samples.append((str(sample.key_expr), sample.payload.to_bytes()))

    def seen(self, text: str) -> bool:
        return any(text.encode() in data for _, data in list(self.samples))


def partial(text, **fields):
    return Event.with_json('speech.partial', {'text': text}, **fields)


def test_local_only_speech_never_leaves_through_the_voice_agent(
        ros, port, zenoh_router, zsession, bridge, robot_bus, spawn, tmp_path):
    zenoh_router(port)
    listener = Listener(zsession(port), 'priv1')
    proc, status, audit = bridge('/priv1', port)   # out_allow as shipped: agent.*.action etc.
    agents = tmp_path / 'agents.yaml'
    agents.write_text(yaml.safe_dump(AGENTS))
    params = tmp_path / 'agent_params.yaml'
    params.write_text(yaml.safe_dump({'/**': {'ros__parameters': {
        'agent_id': 'voice', 'agents_file': str(agents), 'storage': {'root': str(tmp_path / 'state')},
        'autostart': True, 'bus': {'discovery_period_s': 0.1}}}}))
    agent = spawn('-m', 'loom_ros.agents.agent_node', '--ros-args', '-r', '__ns:=/priv1',
                  '--params-file', str(params))
    bus = robot_bus('/priv1')
    alive = [proc, agent]
    # The pipeline works: a public partial becomes a ui_update action that crosses.
    ros.wait_for(lambda: listener.seen('public hello'), 'a public action on Zenoh',
                 spin=lambda: bus.publish('mic.primary.speech', partial('public hello')),
                 alive=alive)
    # The LocalOnly utterance (and one whose privacy is stated only in metadata), then a public
    # sentinel: once the sentinel crossed and the refusals are counted, anything let through
    # would have been seen.
    def send():
        bus.publish('mic.primary.speech', partial(PIN, privacy=Privacy.LOCAL_ONLY))
        bus.publish('mic.primary.speech', partial(PIN + ' again', metadata={
            'privacy': 'local_only'}))
        bus.publish('mic.primary.speech', partial('public sentinel'))
    ros.wait_for(lambda: listener.seen('public sentinel') and
                 status.get('refused_local_only') >= 2, 'the refusals and the sentinel',
                 spin=send, alive=alive)
    assert not listener.seen(LEAK), [k for k, d in listener.samples if LEAK.encode() in d]
    log = AuditLog(audit.with_suffix('.db'))   # privacy refusals are rows of the audit_db
    assert [r['fields']['reason'] for r in log.query(kind='privacy_refused')].count(
        'local_only') >= 2
    log.close()


def test_a_forged_upload_flag_from_an_outside_publisher_does_not_cross(
        ros, port, zenoh_router, zsession, bridge, robot_bus):
    zenoh_router(port)
    listener = Listener(zsession(port), 'priv2')
    proc, status, audit = bridge('/priv2', port)
    outside = robot_bus('/priv2')   # another process on the robot's DDS domain
    forged = {'loom.upload': 'embedding'}

    def send():
        for privacy in (Privacy.SENSITIVE, Privacy.PRIVATE):
            outside.publish('mic.primary.speech', Event(
                type='speech.utterance', payload=PIN.encode(), privacy=privacy,
                metadata=forged))
        outside.publish('mic.primary.speech', Event(type='speech.utterance',
                                                    payload=b'public sentinel'))
    # Until the sentinel crossed and the forged Sensitive event was either refused or let out.
    ros.wait_for(lambda: listener.seen('public sentinel') and status.get('refused_private') >= 1
                 and (status.get('refused_sensitive_raw') >= 1 or listener.seen(LEAK)),
                 'the refusals and the sentinel', spin=send, alive=[proc])
    assert not listener.seen(LEAK), [k for k, d in listener.samples if LEAK.encode() in d]
    assert status.get('refused_sensitive_raw') >= 1
