"""A heartbeat reads an agent's dispatch samples while its worker appends to them
(Agent.recent_dispatch_us, which the agent host's heartbeat asks): a launch run logged 'deque mutated during iteration' from the heartbeat
timer 28 times in 80 s. The race is forced here: the deque changes between making the iterator
and reading it, as when the GIL passes to the worker at that point."""
from collections import deque
from types import SimpleNamespace

from loom_ros.agents.runtime import Agent


def _recent(samples: deque, n: int) -> list:
    """The Agent method on `samples` as its dispatch_us (the rest of an Agent is not read)."""
    return Agent.recent_dispatch_us(SimpleNamespace(dispatch_us=samples), n)


class RacingSamples(deque):
    """A real deque whose reversed iterator is followed by an append, `races` times."""

    def __init__(self, values, races: int):
        super().__init__(values, maxlen=10000)
        self.races = races

    def __reversed__(self):
        iterator = super().__reversed__()
        if self.races:
            self.races -= 1
            self.append(-1)   # what the worker does meanwhile
        return iterator


def test_the_race_is_real():
    samples = RacingSamples(range(10), races=1)
    try:
        list(reversed(samples))
    except RuntimeError as exc:
        assert 'mutated' in str(exc)
    else:
        raise AssertionError('the forced race did not make the deque iterator raise')


def test_a_heartbeat_reads_again_after_a_race():
    samples = RacingSamples(range(300), races=2)
    recent = _recent(samples, 256)
    assert recent[0] == -1 and recent[1] == -1 and recent[2] == 299
    assert len(recent) == 256


def test_every_read_raced_takes_a_copy():
    samples = RacingSamples(range(300), races=10)
    recent = _recent(samples, 5)
    assert recent == [-1, -1, -1, 299, 298]   # the three races' appends, then the samples


def test_no_race_newest_first():
    assert _recent(deque(range(10), maxlen=10000), 3) == [9, 8, 7]
    assert _recent(deque(maxlen=10000), 3) == []
