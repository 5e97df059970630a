"""bus.executor.HeapHolds: the collector's freeze and thresholds are process-wide, so with several
hosts in one process (the launch file composes the agents into the manager's) one host letting
go must not give the others' heap back or restart the full passes they hold; the last one
restores CPython's own."""
import gc

import pytest

from loom_ros.bus.executor import CPYTHON_GC_THRESHOLDS, NO_AUTOMATIC_FULL_PASS, HeapHolds


@pytest.fixture
def heap():
    gc.unfreeze()
    gc.set_threshold(*CPYTHON_GC_THRESHOLDS)
    yield HeapHolds()
    gc.unfreeze()
    gc.set_threshold(*CPYTHON_GC_THRESHOLDS)


def test_the_last_holder_to_go_gives_the_heap_back(heap):
    young, middle = CPYTHON_GC_THRESHOLDS[:2]
    heap.settle('face')                      # settled, full passes left to CPython
    assert gc.get_freeze_count() > 0 and gc.get_threshold() == CPYTHON_GC_THRESHOLDS
    heap.hold_full_passes('face', 50_000)
    heap.settle('voice')
    heap.hold_full_passes('voice', 20_000, 30)
    # the largest each asks, full passes held while any holds them
    assert gc.get_threshold() == (50_000, 30, NO_AUTOMATIC_FULL_PASS)
    heap.unsettle('face')                    # voice is still active: its hold stays
    assert gc.get_threshold() == (20_000, 30, NO_AUTOMATIC_FULL_PASS)
    assert gc.get_freeze_count() > 0 and heap.holders() == 1
    heap.unsettle('face')                    # twice (deactivate, then cleanup): no change
    assert heap.holders() == 1
    heap.settle('face')                      # back without holding full passes
    assert gc.get_threshold() == (20_000, 30, NO_AUTOMATIC_FULL_PASS)
    heap.unsettle('voice')
    assert gc.get_threshold() == CPYTHON_GC_THRESHOLDS and gc.get_freeze_count() > 0
    heap.unsettle('face')
    assert gc.get_freeze_count() == 0 and heap.holders() == 0
    heap.hold_full_passes('core')            # 0 asks: CPython's young and middle
    assert gc.get_threshold() == (young, middle, NO_AUTOMATIC_FULL_PASS)
    heap.unsettle('core')
    assert gc.get_threshold() == CPYTHON_GC_THRESHOLDS and gc.get_freeze_count() == 0
