"""The lifecycle's clock (attack review: it aged rows by the publisher's own stamp and believed
any wall clock): ages run from when this store wrote a row; a round whose clock is not believable
(before the floor, behind what the store holds, stepped) ages nothing and is counted and
reported; a forward step shifts the rows written before it; a file of storage version 2 keeps
its rows and their ages; a total budget that what it may not delete already exceeds deletes
nothing for it. Real SQLite files written through the storage layer, real faiss and object
files; wall and monotonic clocks injected; no sleeps."""
from __future__ import annotations

import json
import sqlite3

import pytest
from harness import WAIT_LIMIT_S, MsClock, T0_MS

from loom_ros.bus.event import Event
from loom_ros.bus.privacy import ConsentState
from loom_ros.security.keyring import (EncryptionSettings, MasterKey, ShreddedError,
                                       write_key_file)
from loom_ros.storage import schema
from loom_ros.storage.backend.local import LocalObjectStore
from loom_ros.storage.budget import BudgetGate, Budgets
from loom_ros.storage.embedding import HashEmbedder
from loom_ros.storage.errors import StorageError, StorageFullError
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.lifecycle import (MAX_AGE_S, Lifecycle, LifecycleParams, PolicyRule,
                                        TierPolicy, clock_check)
from loom_ros.storage.schema import MAX_TIME_MS, bounded_ms, stored_stamp
from loom_ros.storage.storage import Storage, StorageConfig
from loom_ros.storage.stores import EpisodeStore
from loom_ros.telemetry.diagnostics import ERROR, OK, WARN

T0 = T0_MS
YEAR_MS = 365 * 86_400_000
HUGE = 2**63 - 1          # the largest stamp the bus lets a publisher send
PARAMS = LifecycleParams(default=TierPolicy(warm_s=60, cold_s=600, archive_s=6000), bucket_s=10)


class Mono:
    """An injected monotonic clock in seconds, moved by the test with the wall clock."""

    def __init__(self, s: float = 1000.0):
        self.s = s

    def __call__(self) -> float:
        return self.s


class GrantAll:
    """Every subject consents to storage (consent has its own tests)."""

    @staticmethod
    def lookup(subject: str, purpose: str) -> ConsentState:
        return ConsentState(purpose, True, True, 'test')


def event(name: str, ts: int, type_: str = 'chat.said') -> Event:
    return Event(type=type_, source='mic', id=name, timestamp_ms=ts,
                 payload=json.dumps({'text': f'said {name}'}).encode())


def write(root, clock, events, unit: str = 'u') -> None:
    """Events written by the store, each when the test's clock says (the store's clock)."""
    with Storage(StorageConfig(root=str(root), unit=unit), clock=clock) as storage:
        for agent, e in events:
            ticket = storage.episodes.record(agent, e)
        ticket.wait(WAIT_LIMIT_S)


def open_lc(root, clock, mono=None, params: LifecycleParams = PARAMS, unit: str = 'u',
            **kw) -> Lifecycle:
    layout = StorageLayout.at(root)
    return Lifecycle(layout, unit, kw.pop('objects', LocalObjectStore(layout.objects)),
                     HashEmbedder(), params, clock=clock, monotonic=mono, consent=GrantAll, **kw)


def tick(clock, mono, seconds: float) -> None:
    """Real time passes: both clocks move together."""
    clock.ms += int(seconds * 1000)
    mono.s += seconds


def moved(report) -> tuple:
    return (report.condensed, report.archived, report.deleted, report.archive_deleted,
            report.budget_deleted)


def counts(lc: Lifecycle) -> tuple:
    u = lc.usage()
    return u['warm']['rows'], u['cold']['rows'], u['archive']['files']


# -- 1. the event's own stamp ------------------------------------------------------------------
def test_events_stamped_1970_and_near_2_63_age_like_one_stamped_now(tmp_path):
    clock = MsClock(T0)
    with Storage(StorageConfig(root=str(tmp_path), unit='u'), clock=clock) as storage:
        for e in (event('now', T0), event('epoch', 1), event('far', HUGE)):
            ticket = storage.episodes.record('a', e)
        ticket.wait(WAIT_LIMIT_S)
        # a query by time sees the publisher's stamps as they were
        assert [r['event_id'] for r in storage.episodes.query('a', 0, 10)] == ['epoch']
        assert [r['time_ms'] for r in storage.episodes.query('a', 2**62)] == [HUGE]
        # an imported row from an old file may hold a negative time: aged by when it was written
        storage.writer.submit(((EpisodeStore.INSERT_STORED, (
            'a', 'before-1970', -86_400_000, 'chat.said', 'mic', '[]', '{"text":"old"}', 40,
            '', T0)),)).wait(WAIT_LIMIT_S)
    lc = open_lc(tmp_path, clock)
    try:
        clock.ms = T0 + 59_000          # written 59 s ago, whatever they say
        report = lc.run_once()
        assert moved(report) == (0, 0, 0, 0, 0) and counts(lc) == (4, 0, 0)
        clock.ms = T0 + 61_000
        assert lc.run_once().condensed == 4 and counts(lc)[0] == 0
        memories = lc.search('said', k=10, start_ms=-2**63)
        assert sorted(m['first_ms'] for m in memories) == [-86_400_000, 1, T0, HUGE]
        clock.ms = T0 + 599_000          # cold: 600 s from when the store wrote them
        assert lc.run_once().archived == 0
        clock.ms = T0 + 601_000
        assert lc.run_once().archived == len(memories) and counts(lc) == (0, 0, 1)
        clock.ms = T0 + 6_001_000
        assert lc.run_once().archive_deleted == 1 and counts(lc) == (0, 0, 0)
    finally:
        lc.close()


def test_stamps_out_of_range_are_bounded_before_arithmetic():
    assert bounded_ms(-5) == 0 and bounded_ms(2**70) == MAX_TIME_MS
    assert bounded_ms('soon') == 0 and bounded_ms(None) == 0 and bounded_ms(float('nan')) == 0
    assert bounded_ms(1.7e12) == 1_700_000_000_000 and bounded_ms(True) == 1
    # the store's own stamp: 0 (unknown) when its clock is not believable
    assert stored_stamp(T0) == T0 and stored_stamp(5_000) == 0 and stored_stamp(HUGE) == 0
    assert stored_stamp(float('inf')) == 0 and stored_stamp('x') == 0


def test_with_encryption_on_1970_and_2_63_stamps_are_stored_and_their_keys_outlive_them(
        tmp_path):
    """An anonymous payload is sealed under its day's key; the day of 2**63 ms is no date (the
    write failed) and the key of 1970-01-01 was shredded by retention at the next round while
    the row it sealed was still held."""
    clock = MsClock(T0)
    key = tmp_path / 'master.key'
    write_key_file(key, [MasterKey.generate()])
    with Storage(StorageConfig(root=str(tmp_path / 'root'), unit='u',
                               encryption=EncryptionSettings(True, str(key))),
                 clock=clock, env={}, consent=GrantAll) as storage:
        for e in (event('epoch', 1), event('far', HUGE)):
            storage.episodes.record('raw', e).wait(WAIT_LIMIT_S)
        assert {r['event_id']: r['payload'] for r in storage.episodes.query('raw')} == {
            'epoch': '{"text": "said epoch"}', 'far': '{"text": "said far"}'}
        raw = PolicyRule(agent='raw', policy=TierPolicy(warm_s=60, cold=False, archive_s=3600))
        params = LifecycleParams(default=TierPolicy(warm_s=60, archive_s=3600), rules=[raw])
        lc = open_lc(tmp_path / 'root', clock, params=params, objects=storage.objects)
        try:
            clock.ms = T0 + 30_000
            assert moved(lc.run_once()) == (0, 0, 0, 0, 0)
            assert len(storage.episodes.query('raw')) == 2    # both still readable
            clock.ms = T0 + 61_000
            assert lc.run_once().archived == 2
            keys = [k for (k,) in lc.conn.execute('select key from archive')]
            clock.ms = T0 + 3_599_000        # held less than archive_s: kept, keys and all
            assert lc.run_once().archive_deleted == 0
            assert sorted(r['payload'] for k in keys for r in lc.read_archive(k)) == [
                '{"text": "said epoch"}', '{"text": "said far"}']
            clock.ms = T0 + 3_700_000
            assert lc.run_once().archive_deleted == 2
        finally:
            lc.close()


# -- 2. the wall clock -------------------------------------------------------------------------
def test_a_jump_of_five_years_moves_nothing_young_and_is_counted_and_reported(tmp_path):
    clock, mono = MsClock(T0), Mono()
    write(tmp_path, clock, [('a', event(f'old{i}', T0 + i)) for i in range(5)])
    lc = open_lc(tmp_path, clock, mono)
    reported: dict = {}
    try:
        tick(clock, mono, 61)
        assert lc.run_once().condensed == 5            # held 61 s: cold now
        with Storage(StorageConfig(root=str(tmp_path), unit='u'), clock=clock) as storage:
            for i in range(5):
                ticket = storage.episodes.record('a', event(f'new{i}', clock.ms))
            ticket.wait(WAIT_LIMIT_S)
        tick(clock, mono, 10)
        assert moved(lc.run_once()) == (0, 0, 0, 0, 0) and counts(lc) == (5, 1, 0)
        clock.ms += 5 * YEAR_MS                        # NTP steps the wall clock; 10 s pass
        tick(clock, mono, 10)
        report = lc.run_once()
        assert report.clock_untrusted == 1 and moved(report) == (0, 0, 0, 0, 0)
        assert counts(lc) == (5, 1, 0)
        status = lc.clock_status
        assert not status.trusted and 'jumped 5.0 years ahead' in status.reason
        assert (status.episodes, status.skipped, lc.totals.clock_untrusted) == (1, 1, 1)
        check, lines = clock_check({'u': lc}, reported, lc.totals.clock_untrusted)
        assert check.level == WARN and 'jumped' in check.message and len(lines) == 1
        # the next rounds believe it: each row is as old as the real time it has been held
        tick(clock, mono, 10)
        report = lc.run_once()
        assert report.clock_untrusted == 0 and moved(report) == (0, 0, 0, 0, 0)
        assert counts(lc) == (5, 1, 0)                 # warm 30 s, cold 91 s: both young
        check, lines = clock_check({'u': lc}, reported, lc.totals.clock_untrusted)
        assert check.level == OK and lines == []       # the episode was reported once
        tick(clock, mono, 31)                          # the new rows held 61 s
        assert lc.run_once().condensed == 5 and counts(lc) == (0, 2, 0)
        tick(clock, mono, 600 - 122 - 1)
        assert lc.run_once().archived == 0             # the old memory held 599 s
        tick(clock, mono, 2)
        assert lc.run_once().archived == 1
    finally:
        lc.close()


def test_a_step_seen_only_after_it_ended_is_warned_once(tmp_path):
    clock, mono = MsClock(T0), Mono()
    write(tmp_path, clock, [('a', event('e', T0))])
    lc = open_lc(tmp_path, clock, mono)
    reported: dict = {}
    try:
        tick(clock, mono, 5)
        lc.run_once()
        clock.ms += 2 * 86_400_000
        tick(clock, mono, 5)
        assert lc.run_once().clock_untrusted == 1
        tick(clock, mono, 5)
        assert lc.run_once().clock_untrusted == 0 and counts(lc) == (1, 0, 0)
        check, lines = clock_check({'u': lc}, reported, lc.totals.clock_untrusted)
        assert check.level == WARN and check.values['rounds_skipped'] == '1'
        assert len(lines) == 1 and '2.0 days' in lines[0]
        assert clock_check({'u': lc}, reported)[0].level == OK
    finally:
        lc.close()


def test_a_clock_behind_what_the_store_holds_moves_nothing_until_it_caught_up(tmp_path):
    """A store restarted with a clock 12 h behind the newest row it wrote: the clock went back
    (or was ahead before); rows a clock 12 h behind would call old stay where they are."""
    clock = MsClock(T0)
    write(tmp_path, clock, [('a', event(f'old{i}', T0 + i)) for i in range(5)])
    clock.ms = T0 + 86_400_000
    write(tmp_path, clock, [('a', event(f'new{i}', clock.ms + i)) for i in range(3)])
    clock.ms = T0 + 43_200_000
    lc = open_lc(tmp_path, clock)
    try:
        for _ in range(3):
            report = lc.run_once()
            assert report.clock_untrusted == 1 and moved(report) == (0, 0, 0, 0, 0)
            assert 'behind what this store already holds' in lc.clock_status.reason
            clock.ms += 60_000
        assert counts(lc) == (8, 0, 0) and lc.clock_status.episodes == 1
        clock.ms = T0 + 86_400_000 - 50_000           # within the tolerance (60 s) of it
        report = lc.run_once()
        assert report.clock_untrusted == 0 and report.condensed == 5 and counts(lc)[0] == 3
        assert lc.totals.clock_untrusted == 3
    finally:
        lc.close()
    # the last believable round is kept across restarts: a clock behind it is refused too
    clock.ms = T0 + 3_600_000
    lc = open_lc(tmp_path, clock)
    try:
        assert lc.run_once().clock_untrusted == 1 and counts(lc)[0] == 3
    finally:
        lc.close()


def stamps_of(lc) -> list:
    return sorted(s for (s,) in lc.conn.execute('select stored_ms from episodes'))


def test_a_step_back_seen_against_the_monotonic_clock_keeps_every_row_s_real_age(tmp_path):
    """The rows the old clock stamped are shifted back by the step: their ages go on, and the
    next round believes the clock (it used to wait clock_settle_s, then restart every age)."""
    clock, mono = MsClock(T0), Mono()
    write(tmp_path, clock, [('a', event(f'e{i}', T0 + i)) for i in range(4)])
    params = LifecycleParams(default=PARAMS.default, bucket_s=10, clock_settle_s=3600)
    lc = open_lc(tmp_path, clock, mono, params)
    try:
        tick(clock, mono, 30)
        assert lc.run_once().clock_untrusted == 0
        clock.ms -= 86_400_000                          # stepped back a day
        tick(clock, mono, 10)
        report = lc.run_once()
        assert report.clock_untrusted == 1 and 'stepped back 1.0 days' in lc.clock_status.reason
        assert stamps_of(lc) == [T0 - 86_400_000] * 4
        tick(clock, mono, 19)                          # held 59 s
        report = lc.run_once()
        assert report.clock_untrusted == 0 and moved(report) == (0, 0, 0, 0, 0)
        tick(clock, mono, 2)
        assert lc.run_once().condensed == 4
        assert (lc.clock_status.episodes, lc.clock_status.skipped) == (1, 1)
    finally:
        lc.close()


def test_a_clock_behind_after_a_restart_is_believed_once_settled_and_rows_ahead_restart(
        tmp_path):
    """Without a monotonic reading of this boot (another boot, or none kept) a clock behind
    what the store holds cannot be measured: nothing ages until it settled, then the rows ahead
    of it restart their ages (later, never earlier)."""
    clock, mono = MsClock(T0), Mono()
    write(tmp_path, clock, [('a', event(f'e{i}', T0 + i)) for i in range(4)])
    params = LifecycleParams(default=PARAMS.default, bucket_s=10, clock_settle_s=3600)
    lc = open_lc(tmp_path, clock, mono, params, boot='boot-1')
    tick(clock, mono, 30)
    assert lc.run_once().clock_untrusted == 0
    lc.close()
    clock.ms -= 86_400_000                              # the robot restarts a day behind
    mono.s = 5.0
    lc = open_lc(tmp_path, clock, mono, params, boot='boot-2')
    try:
        report = lc.run_once()
        assert report.clock_untrusted == 1 and 'behind what this store' in \
            lc.clock_status.reason
        tick(clock, mono, 3000)                        # behind, and not settled yet
        assert lc.run_once().clock_untrusted == 1 and counts(lc)[0] == 4
        tick(clock, mono, 600)                         # settled: believed, that round skipped
        assert lc.run_once().clock_untrusted == 1 and 'believed from now on' in \
            lc.clock_status.reason
        assert stamps_of(lc) == [clock.ms] * 4         # their age restarts now, never earlier
        tick(clock, mono, 59)
        report = lc.run_once()
        assert report.clock_untrusted == 0 and report.condensed == 0
        tick(clock, mono, 2)
        assert lc.run_once().condensed == 4
        assert (lc.clock_status.episodes, lc.clock_status.skipped) == (1, 3)
    finally:
        lc.close()


def test_steps_back_and_their_corrections_again_and_again_keep_the_rows_ageing(tmp_path):
    """An hour back, then NTP puts it right, six times over: each back step shifted nothing
    and each correction shifted every row an hour younger, so nothing ever aged."""
    clock, mono = MsClock(T0), Mono()
    params = LifecycleParams(default=TierPolicy(warm_s=7200, cold_s=86_400), bucket_s=10)
    write(tmp_path, clock, [('a', event(f'e{i}', T0)) for i in range(3)])
    lc = open_lc(tmp_path, clock, mono, params)
    real = 0
    try:
        lc.run_once()                                  # the lifecycle runs from the start
        for _cycle in range(3):
            clock.ms -= 3_600_000
            for _ in range(20):                        # 20 min behind, a round a minute
                tick(clock, mono, 60)
                real += 60
                lc.run_once()
            clock.ms += 3_600_000
            for _ in range(20):
                tick(clock, mono, 60)
                real += 60
                lc.run_once()
        assert real == 7200 and counts(lc)[0] == 3     # held exactly warm_s: not yet
        assert stamps_of(lc) == [T0] * 3               # the shifts cancelled out
        tick(clock, mono, 60)
        assert lc.run_once().condensed == 3
        assert lc.clock_status.episodes == 6 and lc.clock_status.skipped == 6
    finally:
        lc.close()


def test_steps_under_the_tolerance_add_up_against_the_monotonic_clock(tmp_path):
    """59 s ahead at every 10 s round (tolerance 60 s): each was believed, compared with the
    previous check, and they added up to rows deleted after 100 s for a 600 s age."""
    clock, mono = MsClock(T0), Mono()
    params = LifecycleParams(default=TierPolicy(warm_s=600, cold=False, archive=False),
                             bucket_s=10)
    write(tmp_path, clock, [('a', event(f'e{i}', T0)) for i in range(3)])
    lc = open_lc(tmp_path, clock, mono, params)
    try:
        lc.run_once()                                  # the lifecycle runs from the start
        real = 0
        while real < 600 - 60:                        # never more than the tolerance early
            clock.ms += 59_000
            tick(clock, mono, 10)
            real += 10
            assert lc.run_once().deleted == 0, real
        assert counts(lc)[0] == 3 and lc.clock_status.episodes > 1
        while counts(lc)[0]:
            clock.ms += 59_000
            tick(clock, mono, 10)
            real += 10
            lc.run_once()
        assert real <= 600 + 60 + 10                   # and deleted in due time
    finally:
        lc.close()


@pytest.mark.parametrize('step_ms', [5 * YEAR_MS, -86_400_000])
def test_a_step_while_no_lifecycle_ran_on_the_same_boot_is_found_at_the_next_open(
        tmp_path, step_ms):
    """The mark in meta keeps the monotonic reading and the boot's id: a step between a close
    and the next open (a node restart, `loom storage compact`, the reopen after `loom forget`)
    is measured as one while it runs. A forward step aged every row 5 years at once."""
    clock, mono = MsClock(T0), Mono()
    write(tmp_path, clock, [('a', event(f'e{i}', T0 + i)) for i in range(5)])
    lc = open_lc(tmp_path, clock, mono, PARAMS, boot='boot-1')
    tick(clock, mono, 30)
    lc.run_once()
    lc.close()
    clock.ms += step_ms
    tick(clock, mono, 5)
    lc = open_lc(tmp_path, clock, mono, PARAMS, boot='boot-1')
    try:
        report = lc.run_once()
        assert report.clock_untrusted == 1 and moved(report) == (0, 0, 0, 0, 0)
        assert stamps_of(lc) == [T0 + step_ms] * 5     # real age 35 s, measured across it
        tick(clock, mono, 24)
        assert lc.run_once().condensed == 0            # held 59 s
        tick(clock, mono, 2)
        assert lc.run_once().condensed == 5
    finally:
        lc.close()
    # the shift and the mark of the new clock were one transaction: a restart shifts nothing
    tick(clock, mono, 5)
    lc = open_lc(tmp_path, clock, mono, PARAMS, boot='boot-1')
    try:
        assert lc.run_once().clock_untrusted == 0
        assert lc.search('said', k=5)[0]['count'] == 5
    finally:
        lc.close()
    # another boot: the monotonic reading kept says nothing; a forward step cannot be told
    # from time that passed (docs/storage.md), a step back waits to settle (test above)
    clock.ms += YEAR_MS
    mono.s = 1.0
    lc = open_lc(tmp_path, clock, mono, PARAMS, boot='boot-2')
    try:
        assert lc.run_once().clock_untrusted == 0
    finally:
        lc.close()


def test_a_robot_booted_at_1970_ages_what_it_wrote_from_its_first_believable_clock(tmp_path):
    """No real-time clock: the publishers and the store read 1970 until NTP sets the clock."""
    clock, mono = MsClock(5_000), Mono()
    write(tmp_path, clock, [('a', event(f'e{i}', 5_000 + i)) for i in range(6)])
    lc = open_lc(tmp_path, clock, mono)
    try:
        stamps = {s for (s,) in lc.conn.execute('select stored_ms from episodes')}
        assert stamps == {0}                           # the store did not believe it either
        tick(clock, mono, 30)
        report = lc.run_once()
        assert report.clock_untrusted == 1 and 'before 2023-01-01' in lc.clock_status.reason
        clock.ms = T0                                  # NTP: 53 years ahead, 10 s later
        tick(clock, mono, 10)
        report = lc.run_once()                         # the first believable reading: no
        assert report.clock_untrusted == 0 and report.condensed == 0   # step from 1970
        stamps = {s for (s,) in lc.conn.execute('select stored_ms from episodes')}
        assert stamps == {clock.ms}                    # their age starts now
        tick(clock, mono, 59)
        assert lc.run_once().condensed == 0
        tick(clock, mono, 2)
        assert lc.run_once().condensed == 6
    finally:
        lc.close()


# -- 3. the schema upgrade ---------------------------------------------------------------------
def downgrade_to_version_2(path) -> None:
    """The file as storage version 2 left it: no stored_ms anywhere."""
    import sqlite3
    conn = sqlite3.connect(path)
    for index in ('cold_stored', 'archive_stored'):
        conn.execute(f'drop index {index}')
    for table in ('episodes', 'cold', 'archive'):
        conn.execute(f'alter table {table} drop column stored_ms')
    conn.execute("update meta set value = '2' where key = 'version'")
    conn.execute(schema.EPISODE_INSERT_SUBJECT, ('a', 'epoch', 1, 'chat.said', 'mic', '[]',
                                                 '{"text":"epoch"}', 40, ''))
    conn.execute(schema.EPISODE_INSERT_SUBJECT, ('a', 'far', HUGE, 'chat.said', 'mic', '[]',
                                                 '{"text":"far"}', 40, ''))
    conn.commit()
    conn.close()


def test_a_file_of_version_2_keeps_its_rows_and_their_ages(tmp_path):
    clock = MsClock(T0)
    raw = PolicyRule(type='x.raw', policy=TierPolicy(warm_s=60, cold=False, archive_s=6000))
    params = LifecycleParams(default=PARAMS.default, rules=[raw], bucket_s=10)
    write(tmp_path, clock, [('a', event(f'c{i}', T0 + i)) for i in range(3)]
          + [('a', event(f'r{i}', T0 + i, 'x.raw')) for i in range(2)])
    lc = open_lc(tmp_path, clock, params=params)
    clock.ms = T0 + 61_000
    report = lc.run_once()
    assert (report.condensed, report.archived) == (3, 2)
    lc.close()
    write(tmp_path, clock, [('a', event(f'w{i}', clock.ms + i)) for i in range(4)])
    path = StorageLayout.at(tmp_path).database('u')
    downgrade_to_version_2(path)
    clock.ms = T0 + 100_000
    lc = open_lc(tmp_path, clock, params=params)
    try:
        c = lc.conn
        assert c.execute("select value from meta where key = 'version'").fetchone()[0] == \
            str(schema.VERSION)
        assert counts(lc) == (6, 1, 1)                 # every row kept
        stored = dict(c.execute('select event_id, stored_ms from episodes'))
        assert all(stored[f'w{i}'] == T0 + 61_000 + i for i in range(4))   # their time
        assert stored['epoch'] == stored['far'] == T0 + 100_000   # not believed: from now
        assert c.execute('select stored_ms = last_ms from cold').fetchone()[0] == 1
        assert c.execute('select stored_ms = last_ms from archive').fetchone()[0] == 1
        clock.ms = T0 + 61_000 + 3 + 60_001            # the w rows held 60 s
        assert lc.run_once().condensed == 4 and counts(lc)[0] == 2
        clock.ms = T0 + 160_001
        assert lc.run_once().condensed == 2 and counts(lc)[0] == 0
        clock.ms = T0 + 2 + 600_001                    # the first memory, from T0 + 2
        assert lc.run_once().archived == 1
        clock.ms = T0 + 1 + 6_000_001                  # the first archive file, from T0 + 1
        assert lc.run_once().archive_deleted == 1
    finally:
        lc.close()


# -- 4. a total budget below what it may not delete --------------------------------------------
def test_a_total_budget_below_what_it_may_not_delete_deletes_no_archive_or_cold_for_it(
        tmp_path):
    clock = MsClock(T0)
    layout = StorageLayout.at(tmp_path)
    with Storage(StorageConfig(root=str(tmp_path), unit='u'), clock=clock) as storage:
        storage.agent_state.commit('a', {'notes': 'n' * 300_000}, 1, 'e0').wait(WAIT_LIMIT_S)
        for i in range(200):
            clock.ms = T0 + i * 1000
            ticket = storage.episodes.record('a', Event(
                type='chat.said', source='mic', id=f'e{i}', timestamp_ms=clock.ms,
                payload=b'x' * 500 + b'%d' % i))
        ticket.wait(WAIT_LIMIT_S)
    params = LifecycleParams(default=TierPolicy(warm_s=60, cold_s=100, archive_s=0), bucket_s=1,
                             move_batch=50)
    lc = open_lc(tmp_path, clock, params=params)
    try:
        clock.ms = T0 + 230_000
        lc.run_once()
        lc.checkpoint()
        before = lc.usage()
        assert before['archive']['files'] > 0 and before['cold']['rows'] > 0
        kept = before['total']['bytes'] - before['archive']['bytes'] - before['cold']['bytes']
        assert kept > 300_000                          # the agent's state alone is 300 KB
        lc.budgets = Budgets(total_bytes=kept - 50_000)
        for _ in range(2):                             # every round: nothing deleted for it
            report = lc.enforce_budgets()
            assert report.budget_unreachable == 1 and moved(report) == (0, 0, 0, 0, 0)
        after = lc.usage()
        assert after['archive']['files'] == before['archive']['files']
        assert after['cold']['rows'] == before['cold']['rows']
        (floor,) = [c for c in lc.checks() if 'not the budget' in c.message]
        assert floor.level == ERROR and floor.values['budget_bytes'] == str(kept - 50_000)
        assert int(floor.values['state_bytes']) > 300_000
        assert f"{int(floor.values['state_bytes']):,}" in floor.message
        # the writers stop at the total, as for a full disk (BudgetGate, as before)
        with pytest.raises(StorageFullError, match='budget used'):
            BudgetGate(layout, total_bytes=kept - 50_000, background=False)()
        # the tier budgets still hold: past the cold budget, its oldest memories go
        lc.budgets = Budgets(total_bytes=kept - 50_000, cold_bytes=before['cold']['bytes'] // 2)
        report = lc.enforce_budgets()
        assert report.budget_deleted > 0 and report.archive_deleted == 0
        # a total the archive can meet is met from the archive, as before (no floor reported)
        lc.checkpoint()
        now = lc.usage()
        lc.budgets = Budgets(total_bytes=now['total']['bytes'] - 1024)
        report = lc.enforce_budgets()
        assert report.budget_unreachable == 0 and report.archive_deleted >= 1
        assert not [c for c in lc.checks() if 'not the budget' in c.message]
    finally:
        lc.close()


# -- 3. retention of day keys across the units of a root, ages past int64 ----------------------
def test_retention_keeps_the_day_keys_another_unit_still_seals_with(tmp_path):
    """One keyring per root, one lifecycle per unit: unit A's archive retention destroyed the
    day keys before its own oldest row, so unit B's late event (yesterday's key) was shredded
    while held. Now every unit database of the root is read; one that cannot be read shreds
    nothing that round. An anonymous blob past archive_s goes with its day key, as documented
    (docs/encryption.md: retention), wherever its row is."""
    key = tmp_path / 'master.key'
    write_key_file(key, [MasterKey.generate()])
    root, clock = tmp_path / 'root', MsClock(T0 - 2 * 86_400_000)

    def storage(unit):
        return Storage(StorageConfig(root=str(root), unit=unit,
                                     encryption=EncryptionSettings(True, str(key))),
                       clock=clock, env={}, consent=GrantAll)

    with storage('rec') as rec:
        blob = rec.blobs.put('recordings', 'r1.mcap', b'mcap bytes')
    clock.ms = T0
    with storage('b') as b:
        b.episodes.record('y', event('b-late', T0 - 86_400_000)).wait(WAIT_LIMIT_S)
    with storage('a') as a:
        a.episodes.record('x', event('a-now', T0)).wait(WAIT_LIMIT_S)
        keyring = a.objects.keyring
        keyring.day_key(T0 - 5 * 86_400_000)       # a day no row holds any more
        params = LifecycleParams(default=TierPolicy(warm_s=86_400, cold_s=864_000,
                                                    archive_s=3600))
        (root / 'db' / 'zz.db').write_bytes(b'not a database' * 100)
        lc = open_lc(root, clock, params=params, unit='a', objects=a.objects)
        try:
            clock.ms = T0 + 2 * 3_600_000          # the horizon is in T0's day
            lc.run_once()
            assert keyring.destroyed == 0 and lc.sealed_unreadable == 1
            (root / 'db' / 'zz.db').unlink()
            lc.run_once()
            # the day no row holds and the blob's (held by none of the tiers), not B's
            assert keyring.destroyed == 2 and lc.sealed_unreadable == 1
        finally:
            lc.close()
    with storage('b') as b:
        assert [r['payload'] for r in b.episodes.query('y')] == ['{"text": "said b-late"}']
    with storage('rec') as rec:
        with pytest.raises(ShreddedError):
            rec.blobs.get(blob.key)


@pytest.mark.parametrize('policy', [TierPolicy(warm_s=1e17), TierPolicy(warm_s=60, cold_s=1e17),
                                    TierPolicy(warm_s=60, cold_s=600, archive_s=1e17),
                                    TierPolicy(warm_s=60, cold_s=float('inf'))])
def test_an_age_past_int64_milliseconds_keeps_rows_and_the_round_runs(tmp_path, policy):
    """`cold_s: 1e17` ('for ever') made now - age*1000 an integer SQLite cannot take: every
    round raised OverflowError. An age is at most MAX_AGE_S (1,000 years)."""
    clock = MsClock(T0)
    write(tmp_path, clock, [('a', event('e', T0))])
    lc = open_lc(tmp_path, clock, params=LifecycleParams(default=policy, bucket_s=10))
    try:
        for _ in range(3):
            clock.ms += 700_000
            lc.run_once()
        assert sum(counts(lc)) == 1                 # held in the tier whose age is 'for ever'
        assert max(policy.warm_s, policy.cold_s, policy.archive_s) == MAX_AGE_S
    finally:
        lc.close()


def test_a_restamp_runs_in_chunks_and_one_cut_short_is_resumed_once(tmp_path):
    """A step's restamp was one transaction over every row (a million rows: 2 s of held
    writers, 218 MB of WAL). It runs SHIFT_ROWS rows a transaction, its plan and progress in
    meta; one cut short (here SQLite interrupts its second chunk) ages nothing and is resumed
    by the next open on its own, each row shifted once."""
    clock, mono = MsClock(T0), Mono()
    write(tmp_path, clock, [('a', event(f'e{i}', T0 + i)) for i in range(10)])
    lc = open_lc(tmp_path, clock, mono, PARAMS, boot='boot-1')
    lc.SHIFT_ROWS = 3
    lc.run_once()
    chunks = []

    def trace(sql: str) -> None:
        if sql.startswith('update episodes set stored_ms'):
            chunks.append(sql)
            if len(chunks) == 2:    # the second chunk: interrupted
                lc.conn.set_progress_handler(lambda: 1, 1)

    lc.conn.set_trace_callback(trace)
    clock.ms += 5 * YEAR_MS
    tick(clock, mono, 5)
    with pytest.raises(StorageError, match='restamping rows'):
        lc.run_once()
    lc.conn.set_progress_handler(None, 1)
    lc.conn.set_trace_callback(None)
    assert stamps_of(lc) == [T0] * 7 + [T0 + 5 * YEAR_MS] * 3      # one chunk of three
    tick(clock, mono, 50)                                          # held 55 s; a restart
    lc.close()
    lc = open_lc(tmp_path, clock, mono, PARAMS, boot='boot-1')
    try:
        report = lc.run_once()             # resumed first, then believed: no second shift
        assert report.clock_untrusted == 0 and moved(report) == (0, 0, 0, 0, 0)
        assert stamps_of(lc) == [T0 + 5 * YEAR_MS] * 10
        assert lc.conn.execute("select count(*) from meta where key = 'lifecycle_shift'"
                               ).fetchone()[0] == 0
        tick(clock, mono, 6)
        assert lc.run_once().condensed == 10                       # held 61 s
    finally:
        lc.close()


# -- 5. what an attack review of the clock found -----------------------------------------------
def commit_rows(root, stamps, prefix: str, subject: str = '', unit: str = 'u') -> list:
    """Another process's episode writer: each row committed in its own transaction, stamped
    by its clock then (as Storage's writer stamps in the committing transaction)."""
    path = StorageLayout.at(root).database(unit)
    if not path.exists():
        with Storage(StorageConfig(root=str(root), unit=unit), clock=MsClock(T0)):
            pass
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute('pragma busy_timeout=5000')
    ids = []
    try:
        for i, stamp in enumerate(stamps):
            conn.execute('BEGIN IMMEDIATE')
            ids.append(conn.execute(schema.EPISODE_INSERT_STORED, (
                'a', f'{prefix}{i}', stamp, 'chat.said', 'mic', '[]', '{"text":"x"}', 40,
                subject, stamp)).lastrowid)
            conn.execute('COMMIT')
    finally:
        conn.close()
    return ids


DROP = LifecycleParams(default=TierPolicy(warm_s=60, cold=False, archive=False))


@pytest.mark.parametrize('restart', [True, False])
def test_ids_given_again_after_a_drain_are_not_taken_for_rows_of_the_old_clock(tmp_path,
                                                                               restart):
    """Episode ids are rowids without AUTOINCREMENT: once the warm tier was drained, SQLite
    gives ids 1.. again, and a step back shifted those new-clock rows back a day (deleted
    after 2 s for a 60 s age) as if they were the old rows the previous check saw."""
    clock, mono = MsClock(T0), Mono()
    commit_rows(tmp_path, [T0] * 5, 'old')
    lc = open_lc(tmp_path, clock, mono, DROP, boot='b1')
    lc.run_once()
    tick(clock, mono, 61)
    assert lc.move_warm().deleted == 5                   # the check saw id 5, then drained
    if restart:
        lc.close()
    clock.ms -= 86_400_000
    assert commit_rows(tmp_path, [clock.ms] * 3, 'new') == [1, 2, 3]
    tick(clock, mono, 1)
    if restart:
        lc = open_lc(tmp_path, clock, mono, DROP, boot='b1')
    try:
        tick(clock, mono, 1)
        assert lc.run_once().clock_untrusted == 1       # the step is found
        assert stamps_of(lc) == [T0 - 86_400_000 + 61_000] * 3   # new rows: not shifted
        tick(clock, mono, 57)
        assert lc.run_once().deleted == 0                # held 59 s
        tick(clock, mono, 2)
        assert lc.run_once().deleted == 3                # held 61 s
    finally:
        lc.close()


def test_a_row_committed_after_the_move_read_its_clock_waits_for_the_next_move(tmp_path,
                                                                               monkeypatch):
    """move_warm read its clock, then looked for due rows with no bound: a row the writer
    committed between the two, stamped by a clock that had just stepped back a day, was
    compared with the old clock's reading and deleted at once (warm_s 3600)."""
    clock, mono = MsClock(T0), Mono()
    params = LifecycleParams(default=TierPolicy(warm_s=3600, cold=False, archive=False))
    commit_rows(tmp_path, [], 'none')
    lc = open_lc(tmp_path, clock, mono, params, boot='b1')
    try:
        lc.run_once()
        due_warm = lc._due_warm

        def writer_commits_first(now):   # the writer's commit falls between the two
            clock.ms -= 86_400_000
            commit_rows(tmp_path, [clock.ms] * 4, 'new')
            return due_warm(now)

        monkeypatch.setattr(lc, '_due_warm', writer_commits_first)
        tick(clock, mono, 10)
        report = lc.run_once()              # the round's next move finds the step back
        assert report.deleted == 0 and report.clock_untrusted == 1
        monkeypatch.setattr(lc, '_due_warm', due_warm)
        tick(clock, mono, 10)
        report = lc.run_once()
        assert report.clock_untrusted == 0 and counts(lc)[0] == 4
        tick(clock, mono, 3570)
        assert lc.run_once().deleted == 0 and counts(lc)[0] == 4
    finally:
        lc.close()


def test_a_clock_swinging_within_the_tolerance_ages_a_row_at_most_the_tolerance_early(
        tmp_path):
    """Stamped while the clock sat 59 s behind, aged while it sat 59 s ahead (neither seen:
    under the 60 s tolerance): the row looked 118 s older than it was."""
    clock, mono = MsClock(T0), Mono()
    params = LifecycleParams(default=TierPolicy(warm_s=600, cold=False, archive=False))
    commit_rows(tmp_path, [], 'none')
    lc = open_lc(tmp_path, clock, mono, params, boot='b1')
    try:
        lc.run_once()
        clock.ms -= 59_000
        tick(clock, mono, 5)
        lc.run_once()
        commit_rows(tmp_path, [clock.ms] * 3, 'e')
        clock.ms += 118_000
        held = 0
        while counts(lc)[0]:
            tick(clock, mono, 1)
            held += 1
            lc.run_once()
        assert lc.clock_status.episodes == 0 and 600 - 60 <= held <= 600
    finally:
        lc.close()


@pytest.mark.parametrize('plan', [
    [['episodes', 'ahead', [1000, MAX_TIME_MS, 0, T0], 0, 10**20]],     # past int64
    [['episodes', 'ahead', 5, 0, 100]],                                 # not arguments
    [['episodes', 'stored_ms + 1', [], 0, 100]],                        # SQL, not a kind
    [['episodes; drop table kv', 'back', [1, 2, 3], 0, 100]],
    '[' * 10_000, 'not json', [[1, 2, 3, 4, 5]] * 4])
def test_a_damaged_restamp_plan_is_refused_and_the_other_units_go_on(tmp_path, plan):
    """The plan in meta was trusted: SQL text from it was run, a `top` of 10**17 ran 5e12
    empty transactions (the round never returned), one past int64 or arguments that were not
    a list raised OverflowError/TypeError, which stopped every round at that unit."""
    from loom_ros.storage.service import Settings, StorageService
    clock = MsClock(T0)
    write(tmp_path, clock, [('x', event('a1', T0))], unit='a')
    write(tmp_path, clock, [('x', event('b1', T0))], unit='b')
    conn = sqlite3.connect(str(StorageLayout.at(tmp_path).database('a')), isolation_level=None)
    conn.execute("insert or replace into meta values ('lifecycle_shift', ?)",
                 (plan if isinstance(plan, str) else json.dumps(plan),))
    conn.close()
    service = StorageService(Settings(StorageLayout.at(tmp_path), lifecycle=DROP),
                             embedder=HashEmbedder(), clock=clock)
    try:
        clock.ms += 120_000
        service.run_round()
        assert 'meta lifecycle_shift (a clock restamp under way) is damaged (' in \
            service.error
        assert service.lifecycles['b'].usage()['warm']['rows'] == 0     # b went on
        assert service.lifecycles['a'].usage()['warm']['rows'] == 1     # a aged nothing
        assert service.lifecycles['a'].conn.execute('select count(*) from kv').fetchone()
    finally:
        service.close()


def test_forget_while_a_restamp_is_cut_short_bounds_it_to_the_rows_there(tmp_path):
    """A step back's restamp cut short keeps `id <= the newest id at the step` in its plan;
    `loom forget` deleted the newest rows, the writer was given their ids again for rows of
    the new clock, and the plan resumed shifted those back a day."""
    from loom_ros.storage.erasure import forget
    clock, mono = MsClock(T0), Mono()
    commit_rows(tmp_path, [T0] * 5, 'old')
    tick(clock, mono, 61)
    commit_rows(tmp_path, [clock.ms] * 3, 'bob', subject='bob')      # ids 6..8
    lc = open_lc(tmp_path, clock, mono, DROP, boot='b1')
    lc.SHIFT_ROWS = 2
    assert lc.run_once().deleted == 5
    lc.conn.set_trace_callback(lambda sql: sql.startswith('update episodes set stored_ms') and
                               lc.conn.set_progress_handler(lambda: 1, 1))
    clock.ms -= 86_400_000
    tick(clock, mono, 5)
    with pytest.raises(StorageError, match='restamping rows'):
        lc.run_once()
    lc.conn.set_progress_handler(None, 1)
    lc.conn.set_trace_callback(None)
    lc.close()
    assert forget(StorageLayout.at(tmp_path), 'bob').counts['episodes'] == 3
    assert commit_rows(tmp_path, [clock.ms] * 3, 'new') == [1, 2, 3]
    lc = open_lc(tmp_path, clock, mono, DROP, boot='b1')
    try:
        tick(clock, mono, 1)
        lc.run_once()
        assert stamps_of(lc) == [clock.ms - 1000] * 3              # new rows: not shifted
        tick(clock, mono, 58)
        assert lc.run_once().deleted == 0
    finally:
        lc.close()
