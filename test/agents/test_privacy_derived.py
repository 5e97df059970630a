"""Fault 4 (issue 13) in the pure core: what a behavior emits while handling an event carries at
least that event's privacy (from the dispatcher's worker and from threads the behavior starts);
only a declassify rule declared in the agents file lowers it, and every use is audited (fail
closed when the audit log cannot take it)."""
import threading
import time

import pytest

from loom_ros.agents.config import AgentConfig, AgentConfigError, load_agents
from loom_ros.agents.runtime import Agent, Dispatcher, derived_privacy
from loom_ros.bus.event import Event, Privacy
from loom_ros.security.audit import AuditLog
from loom_ros.storage.storage import Storage, StorageConfig

PIN = {'text': 'my pin is 4242'}


class EchoBehavior:
    """Emits the event's text as an intent, asking for `ask` privacy, from the worker, and an
    action from a thread it starts and joins (during the handling: held to the strictest of
    the agent's recent events, as any thread but the worker is; see the next test)."""

    def __init__(self, ask=None):
        self.ask = ask

    def setup(self, settings):
        pass

    def handle(self, event, ctx):
        ctx.intent('echo', event.json(), privacy=self.ask)
        side = threading.Thread(target=ctx.action, args=('ui_update', event.json()))
        side.start()
        side.join()


def wait_until(condition, what, limit=60.0):
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f'timed out waiting for {what}')
        time.sleep(0.001)


@pytest.fixture
def run(tmp_path):
    """run(events, behavior, audit=None, **config) -> (agent, [(kind, type, data, privacy)])."""
    made = []
    storage = Storage(StorageConfig(str(tmp_path), unit='host'))

    def start(events, behavior, audit=None, **config):
        emitted = []
        agent = Agent(AgentConfig(id='echo', behavior='counter', subscriptions=['t'], **config),
                      storage, lambda _id, kind, type, data, privacy:
                      emitted.append((kind, type, data, privacy)), audit=audit)
        agent.configure()
        agent.behavior = behavior   # a test behavior in place of the loaded one
        agent.activate()
        dispatcher = Dispatcher(1)
        made.append((agent, dispatcher))
        for event in events:
            dispatcher.deliver(agent, event)
        wait_until(lambda: agent.stats['handled'] + agent.stats['behavior_errors'] == len(events),
                   'the events handled')
        return agent, emitted
    yield start
    for agent, dispatcher in made:
        dispatcher.close()
        agent.cleanup()
    storage.close()


def test_derived_events_carry_the_strictest_privacy_of_their_input(run):
    events = [Event.with_json('speech.partial', PIN, privacy=Privacy.LOCAL_ONLY),
              Event.with_json('speech.partial', PIN, privacy=Privacy.PRIVATE),
              Event.with_json('speech.partial', PIN, metadata={'privacy': 'local_only'}),
              Event.with_json('speech.partial', {'text': 'hello'})]
    agent, emitted = run(events, EchoBehavior())
    # The worker's intents: each event's own privacy. The side thread's actions: the strictest
    # of the recent events (the first was LocalOnly), since a thread of the behavior's cannot be
    # told from one an earlier handler left running.
    assert [(kind, p) for kind, _, _, p in emitted] == [
        ('intent', Privacy.LOCAL_ONLY), ('action', Privacy.LOCAL_ONLY),
        ('intent', Privacy.PRIVATE), ('action', Privacy.LOCAL_ONLY),
        ('intent', Privacy.LOCAL_ONLY), ('action', Privacy.LOCAL_ONLY),
        ('intent', Privacy.PUBLIC), ('action', Privacy.LOCAL_ONLY)]
    assert agent.stats['privacy_raised'] == 0 and agent.stats['privacy_lowered'] == 0


def test_a_behavior_cannot_lower_privacy_by_asking(run):
    agent, emitted = run([Event.with_json('speech.partial', PIN, privacy=Privacy.LOCAL_ONLY)],
                         EchoBehavior(ask=Privacy.PUBLIC))
    assert emitted[0][3] is Privacy.LOCAL_ONLY and agent.stats['privacy_raised'] == 1
    # Asking for more than the input had is always allowed.
    agent, emitted = run([Event.with_json('t', PIN)], EchoBehavior(ask=Privacy.PRIVATE))
    assert emitted[0][3] is Privacy.PRIVATE


def test_a_declared_rule_lowers_it_and_every_use_is_audited(run, tmp_path):
    audit = AuditLog(tmp_path / 'audit.db')
    rule = {'kind': 'intent', 'type': 'echo', 'to': 'public', 'reason': 'test: echo is vetted'}
    agent, emitted = run([Event.with_json('t', PIN, privacy=Privacy.PRIVATE, id='e-private')],
                         EchoBehavior(), audit=audit, declassify=[rule])
    # The rule names the intent only: the action keeps the input's privacy.
    assert [(kind, p) for kind, _, _, p in emitted] == [('intent', Privacy.PUBLIC),
                                                        ('action', Privacy.PRIVATE)]
    rows = audit.query(plugin='agent/echo', kind='privacy_lowered')
    assert len(rows) == 1 and agent.stats['privacy_lowered'] == 1
    assert rows[0]['fields'] == {'emit': 'intent', 'type': 'echo', 'from': 'PRIVATE',
                                 'to': 'PUBLIC', 'reason': 'test: echo is vetted',
                                 'event_id': 'e-private', 'derived_from': 'the handled event'}
    # An audit log that cannot take the record: nothing is lowered (fail closed), and counted.
    audit.close()
    agent, emitted = run([Event.with_json('t', PIN, privacy=Privacy.PRIVATE)], EchoBehavior(),
                         audit=audit, declassify=[rule])
    assert emitted[0][3] is Privacy.PRIVATE and agent.stats['privacy_audit_failed'] == 1
    # No audit log at all: the same.
    agent, emitted = run([Event.with_json('t', PIN, privacy=Privacy.PRIVATE)], EchoBehavior(),
                         declassify=[rule])
    assert emitted[0][3] is Privacy.PRIVATE and agent.stats['privacy_audit_failed'] == 1


def test_derived_privacy_rule_table():
    P = Privacy
    assert derived_privacy(P.PRIVATE, None, None) is P.PRIVATE
    assert derived_privacy(P.PRIVATE, P.PUBLIC, None) is P.PRIVATE
    assert derived_privacy(P.PUBLIC, P.SENSITIVE, None) is P.SENSITIVE
    rule = AgentConfig(id='a', behavior='b', subscriptions=['t'], declassify=[
        {'kind': 'intent', 'type': 'x', 'to': 'sensitive', 'reason': 'r'}]).declassify[0]
    assert derived_privacy(P.LOCAL_ONLY, None, rule) is P.SENSITIVE
    assert derived_privacy(P.PUBLIC, None, rule) is P.PUBLIC        # a rule never raises
    assert derived_privacy(P.LOCAL_ONLY, P.PRIVATE, rule) is P.PRIVATE


def test_declassify_rules_are_validated_in_the_agents_file(tmp_path):
    path = tmp_path / 'agents.yaml'
    path.write_text('agents:\n  - {id: a, behavior: counter, subscriptions: [t], declassify: '
                    '[{kind: intent, type: x, to: public, reason: vetted}]}\n')
    assert load_agents(path)['a'].declassify[0].to == 'public'
    for bad in ('{kind: intent, type: x, to: public}',              # no reason: not audited
                '{kind: intent, type: x, to: local_only, reason: r}',  # not a lowering
                '{kind: intent, type: x, to: public, reason: r, via: y}'):
        path.write_text('agents:\n  - {id: a, behavior: counter, subscriptions: [t], '
                        f'declassify: [{bad}]}}\n')
        with pytest.raises(AgentConfigError, match='declassify'):
            load_agents(path)


class TamperBehavior:
    """Lowers the privacy of the event it is handed, drops its subject and rewrites its data and
    tags (what a buggy or hostile behavior could do), then emits."""

    def setup(self, settings):
        pass

    def handle(self, event, ctx):
        ctx.intent('seen', {'privacy': int(event.privacy), 'tags': list(event.tags),
                            'subject': event.metadata.get('loom.subject', '')})
        event.privacy = Privacy.PUBLIC
        event.metadata.pop('loom.subject', None)
        event.metadata['privacy'] = 'public'
        event.tags.append('tampered')
        event.payload = b'{"text": "rewritten"}'


def test_agents_on_one_topic_get_their_own_copy_of_an_event(tmp_path):
    """Agents following one topic share one delivery, and in a process the bus hands every
    subscriber the publisher's object: what the first agent's behavior changes in its event
    reaches neither the agents after it (their emits keep the privacy and subject the event
    arrived with) nor the publisher's object, nor the episodes the others store."""
    from loom_ros.storage.consent import ConsentRegistry, SubjectRefs
    audit = AuditLog(tmp_path / 'audit.db')
    consent = ConsentRegistry(tmp_path / 'consent.db', audit=audit,
                              refs=SubjectRefs.at(tmp_path / 'keys'))
    consent.grant('alice', 'store', 'test:nurse')   # so her episodes are kept
    storage = Storage(StorageConfig(str(tmp_path), unit='host'), consent=consent)
    emitted = []
    agents = []
    for i in range(3):
        agent = Agent(AgentConfig(id=f'tamper{i}', behavior='counter', subscriptions=['t']),
                      storage, lambda _id, kind, type, data, privacy, subject='':
                      emitted.append((_id, data, privacy, subject)))
        agent.configure()
        agent.behavior = TamperBehavior()
        agent.activate()
        agents.append(agent)
    dispatcher = Dispatcher(1)
    try:
        event = Event.with_json('speech.final', PIN, privacy=Privacy.PRIVATE, tags=['voice'],
                                metadata={'loom.subject': 'alice'})
        dispatcher.deliver_all(agents, event)
        wait_until(lambda: all(a.stats['handled'] == 1 for a in agents), 'three handlings')
        assert sorted(emitted) == [
            (f'tamper{i}', {'privacy': int(Privacy.PRIVATE), 'tags': ['voice'],
                            'subject': 'alice'}, Privacy.PRIVATE, 'alice') for i in range(3)]
        assert (event.privacy, event.metadata, event.tags, event.json()) == (
            Privacy.PRIVATE, {'loom.subject': 'alice'}, ['voice'], PIN)
        for agent in agents:   # each stored its own copy as it arrived (it changed it after)
            stored = storage.episodes.query(agent.id, 0, 2**63 - 1, '', '', '', 10)
            assert [(r['event_id'], r['tags']) for r in stored] == [(event.id, ['voice'])]
    finally:
        dispatcher.close()
        for agent in agents:
            agent.cleanup()
        storage.close()
        consent.close()


class LateEmitter:
    """Starts a thread that emits once `go` is set, after its handler returned; the handler
    first lowers its event's privacy and clears its working memory."""

    def __init__(self, go):
        self.go, self.threads = go, []

    def setup(self, settings):
        pass

    def handle(self, event, ctx):
        event.privacy = Privacy.PUBLIC
        ctx.working_memory.clear()
        thread = threading.Thread(target=lambda: (self.go.wait(60), ctx.intent('late', {})))
        thread.start()
        self.threads.append(thread)


def test_an_emit_after_the_handler_returned_keeps_the_privacy_the_event_arrived_with(run):
    """Outside a handling (a thread the behavior left running), what it emits is held to the
    strictest privacy of its recent events as they arrived, which the behavior cannot change
    (neither by changing its event nor by clearing its working memory)."""
    go = threading.Event()
    behavior = LateEmitter(go)
    agent, emitted = run([Event.with_json('speech.final', PIN, privacy=Privacy.PRIVATE)],
                         behavior)
    assert emitted == [] and agent.stats['behavior_errors'] == 0
    go.set()
    for thread in behavior.threads:
        thread.join(60)
    assert [(kind, type, p) for kind, type, _, p in emitted] == [
        ('intent', 'late', Privacy.PRIVATE)]


def started(agent_id: str, storage, behavior, emit, **kw):
    """(an active agent running `behavior` in place of the loaded one, a one-worker
    Dispatcher) for tests that need their own emit function or ports."""
    agent = Agent(AgentConfig(id=agent_id, behavior='counter', subscriptions=['t']), storage,
                  emit, **kw)
    agent.configure()
    agent.behavior = behavior
    agent.activate()
    return agent, Dispatcher(1)


class PortTamper:
    """Changes its event (privacy Public, the subject dropped or replaced) and then asks the
    ports about it: the router, the cloud's subject reference, a plugin."""

    def __init__(self):
        self.answers = []

    def setup(self, settings):
        pass

    def handle(self, event, ctx):
        event.privacy = Privacy.PUBLIC
        if event.type == 'speech.final':
            event.metadata['loom.subject'] = 'bob'
        else:
            event.metadata.pop('loom.subject')
        self.answers.append((ctx.route(event, 'intent', confidence=0.1),
                             ctx.subject_ref(event), ctx.call('recorder', event)))


def test_a_behavior_cannot_take_a_changed_event_past_its_ports(tmp_path):
    """What a behavior passes to the router, the cloud's subject reference or a plugin is held
    to the event as it arrived: its privacy, and its subject (a replaced one becomes '..', which
    no consent accepts; a dropped one comes back)."""
    from harness import REPO
    from loom_ros.agents.behavior import InProcessPlugins, Ports
    from loom_ros.plugins.host import PluginHost, parse_specs
    from loom_ros.router.history import RouterHistory
    from loom_ros.router.local import LocalRouter
    from loom_ros.storage.consent import SubjectRefs
    refs = SubjectRefs.at(tmp_path / 'keys')
    router = LocalRouter.from_file(REPO / 'config' / 'policy.yaml',
                                   RouterHistory(tmp_path / 'router.db', 86400))
    host = PluginHost(parse_specs([{'name': 'recorder',
                                    'plugin': 'plugins.overstep_plugin:RecorderPlugin'}]),
                      data_dir=tmp_path / 'data')
    host.start()
    storage = Storage(StorageConfig(str(tmp_path), unit='host'))
    behavior = PortTamper()
    agent, dispatcher = started('ports', storage, behavior, lambda *a, **k: None,
                                ports=Ports(router, InProcessPlugins(host.handles),
                                            subject_refs=refs.ref))
    try:
        dispatcher.deliver(agent, Event.with_json('speech.final', PIN, privacy=Privacy.PRIVATE,
                                                  metadata={'loom.subject': 'alice'}))
        dispatcher.deliver(agent, Event.with_json('speech.partial', PIN,
                                                  metadata={'loom.subject': 'alice'}))
        wait_until(lambda: len(behavior.answers) == 2, 'both events handled')
        (replaced, ref1, _), (dropped, ref2, _) = behavior.answers
        assert (replaced.route, replaced.rule) == ('local', 'privacy')
        assert ref1 == ''   # '..': no subject's reference
        assert ref2 == refs.ref('alice')
        seen = host.slots['recorder'].plugin.seen
        assert [(e.privacy, e.metadata.get('loom.subject')) for e in seen] == [
            (Privacy.PRIVATE, '..'), (Privacy.PUBLIC, 'alice')]
        assert agent.stats['behavior_errors'] == 0
    finally:
        dispatcher.close()
        agent.cleanup()
        storage.close()
        host.stop()


class CrossEmitter:
    """On its first event, starts a thread that emits once `go` is set; its second event's
    handler sets `go` and waits until that thread has emitted, so the emit from the first
    event's thread lands while the second is being handled."""

    def __init__(self):
        self.go, self.emitted, self.thread = threading.Event(), threading.Event(), None

    def setup(self, settings):
        pass

    def handle(self, event, ctx):
        if self.thread is None:
            def late():
                assert self.go.wait(60)
                ctx.intent('late', {})
                self.emitted.set()
            self.thread = threading.Thread(target=late)
            self.thread.start()
            return
        self.go.set()
        assert self.emitted.wait(60)
        ctx.intent('own', {})


def test_a_thread_left_running_from_one_event_is_not_given_the_next_events_privacy(tmp_path):
    """Found in review: a thread the handler of alice's Private event left running emitted
    while bob's Public event was handled, and its emit went out Public under bob, out of
    alice's erasure. Only the worker running a handler gets that handler's event; any other
    thread gets the strictest of the recent events, the handled one included, and '..' for
    their two subjects (no consent accepts it). The handler's own emit is still bob's."""
    storage = Storage(StorageConfig(str(tmp_path), unit='host'))
    emitted = []
    behavior = CrossEmitter()
    agent, dispatcher = started('cross', storage, behavior,
                                lambda _id, kind, type, data, privacy, subject='':
                                emitted.append((type, privacy, subject)))
    try:
        dispatcher.deliver(agent, Event.with_json('speech.final', PIN, privacy=Privacy.PRIVATE,
                                                  metadata={'loom.subject': 'alice'}))
        dispatcher.deliver(agent, Event.with_json('speech.final', PIN,
                                                  metadata={'loom.subject': 'bob'}))
        wait_until(lambda: agent.stats['handled'] == 2, 'both events handled')
        behavior.thread.join(60)
        assert emitted == [('late', Privacy.PRIVATE, '..'), ('own', Privacy.PUBLIC, 'bob')]
        assert agent.stats['behavior_errors'] == 0
    finally:
        dispatcher.close()
        agent.cleanup()
        storage.close()


class Quiet:
    def setup(self, settings):
        pass

    def handle(self, event, ctx):
        event.metadata.clear()   # its copy: what the agent holds is as it arrived


def test_outside_a_handling_the_agent_holds_its_recent_events_privacy_and_subject(run):
    """What a thread the behavior left running emits names the subject of the recent events,
    or '..' (no consent accepts it) when they named more than one; an anonymous event does not
    make a named one's derived data anonymous."""
    def named(who, privacy=Privacy.PUBLIC):
        return Event.with_json('speech.final', PIN, privacy=privacy,
                               metadata={'loom.subject': who} if who else {})
    agent, _ = run([named('alice', Privacy.SENSITIVE), named('')], Quiet())
    assert agent.held() == (Privacy.SENSITIVE, 'alice')
    agent, _ = run([named('alice'), named('bob')], Quiet())
    assert agent.held() == (Privacy.PUBLIC, '..')
    agent, _ = run([named('')], Quiet())
    assert agent.held() == (Privacy.PUBLIC, '')


def test_mail_put_without_a_note_is_read_on_handling(run):
    """A mailbox entry put without its arrival note (not the bus's path) is still handled, its
    privacy read when it is taken."""
    agent, emitted = run([], EchoBehavior())
    agent.mailbox.put(Event.with_json('speech.partial', PIN, privacy=Privacy.PRIVATE))
    assert agent.handle_one() is False
    assert agent.stats['behavior_errors'] == 0
    assert {p for _, _, _, p in emitted} == {Privacy.PRIVATE}
