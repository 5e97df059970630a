"""Issue 13, fault 7: an event's episode and the state it produced commit in one transaction.
Before, sqlite-utils committed each episode on its own, so a SIGKILLed agent left episodes past
its committed state (face.db had 9). A real child process handles events with the reference
agent, acknowledging each once handle_one returns (per-event persistence: committed); it is
SIGKILLed while the next event's handler runs, after its episode is written."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent('''
    import sys, threading, time
    from loom_ros.agents.config import AgentConfig
    from loom_ros.agents.runtime import Agent
    from loom_ros.bus.event import Event

    state_dir, acked = sys.argv[1], int(sys.argv[2])
    agent = Agent(AgentConfig(id='face', behavior='counter', subscriptions=['t'],
                              settings={'hang_on': 'hang'}), state_dir, lambda *a: None)
    agent.configure()
    agent.activate()
    for i in range(acked):
        agent.offer(Event(type='tick', id=f'e{i}'))
        agent.handle_one()                 # handled and committed (persist: per_event)
        print(f'ack e{i}', flush=True)
    agent.offer(Event(type='hang', id='unacked'))
    threading.Thread(target=agent.handle_one, daemon=True).start()
    while agent.state.get('last_id') != 'unacked':   # the handler runs: its episode is written
        time.sleep(0.001)
    print('in handler', flush=True)
    threading.Event().wait()               # until SIGKILL
''')


@pytest.mark.parametrize('acked', [1, 9])
def test_sigkill_mid_event_leaves_episodes_and_state_in_agreement(tmp_path, acked):
    child = subprocess.Popen([sys.executable, '-c', CHILD, str(tmp_path), str(acked)],
                             stdout=subprocess.PIPE, text=True)
    try:
        lines = [child.stdout.readline().strip() for _ in range(acked + 1)]
        assert lines == [f'ack e{i}' for i in range(acked)] + ['in handler']
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
    db = sqlite3.connect(tmp_path / 'face.db')
    assert db.execute('pragma integrity_check').fetchone()[0] == 'ok'
    events, last = db.execute("select events, last_event_id from agent_state "
                              "where agent_id = 'face'").fetchone()
    episodes = [r[0] for r in db.execute("select event_id from episodes where agent_id = 'face' "
                                         'order by rowid')]
    db.close()
    assert (events, last) == (acked, f'e{acked - 1}')            # nothing acknowledged lost
    assert episodes == [f'e{i}' for i in range(acked)]            # no episode past the state


def test_a_state_file_that_is_not_a_database_refuses_configure_naming_it(tmp_path):
    """Opened through the storage layer's opener: a damaged file is a StateError (one of the
    errors that refuse configure with a reason), and it is left as is for inspection."""
    from loom_ros.agents.config import AgentConfig
    from loom_ros.agents.runtime import CONFIGURE_ERRORS, Agent
    from loom_ros.agents.state import StateError
    garbage = b'this is no SQLite file' * 100
    (tmp_path / 'face.db').write_bytes(garbage)
    agent = Agent(AgentConfig(id='face', behavior='counter', subscriptions=['t']),
                  str(tmp_path), lambda *a: None)
    with pytest.raises(CONFIGURE_ERRORS) as err:
        agent.configure()
    assert isinstance(err.value, StateError)
    assert str(tmp_path / 'face.db') in str(err.value) and 'not a database' in str(err.value)
    assert (tmp_path / 'face.db').read_bytes() == garbage
