"""The audit log's hash chain: every record's `hash` is SHA-256(previous record's hash || the
record's canonical bytes), so editing, deleting or reordering a record breaks the chain at that
record, and a published head (id, hash) shows whether records were cut from the end. Pure Python
(hashlib, json); the store (stores.AuditStore) links rows inside the transaction that inserts
them, `verify` walks the rows in id order.

Why plain SHA-256 and not an HMAC: every process that audits (plugin host, agents, bridge, Zenoh
router, sandboxes) would need the key, so it would sit beside the database with the same rights
and stop nobody who can edit the file; without a key anyone (an auditor, another machine) can
verify. What makes a rewrite evident is the head kept elsewhere (`loom audit head`, published
for notarization): a chain recomputed after an edit no longer ends in a head that was noted.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

GENESIS = '0' * 64        # the "previous hash" of the first record of a chain
SQL_FUNCTION = 'loom_audit_link'   # registered on each connection that inserts audit rows
MAX_HEAD_CHARS = 200      # a published head given to verify: bounded before it is parsed
_CANONICAL = json.JSONEncoder(ensure_ascii=True, separators=(',', ':'))   # stateless, reused


def canonical(row_id: int, ts_ms: int, plugin: str, kind: str, fields: str) -> bytes:
    """The bytes a record's hash covers: its id (so a moved record breaks the chain), time,
    plugin, kind and stored fields text, as compact ASCII JSON (types kept: 1000 != '1000')."""
    return _CANONICAL.encode([row_id, ts_ms, plugin, kind, fields]).encode('ascii')


def link(prev_hash: str | None, row_id, ts_ms, plugin, kind, fields) -> str:
    """hash = SHA-256(prev_hash || canonical(row)) as hex; no previous hash: GENESIS."""
    prev = (prev_hash or GENESIS).encode('ascii', 'replace')
    return hashlib.sha256(prev + canonical(row_id, ts_ms, plugin, kind, fields)).hexdigest()


class HeadError(ValueError):
    """A published head that cannot be read; says what was expected."""


@dataclass(frozen=True)
class Head:
    """The last record of the chain: its id and hash (what a notary keeps)."""

    id: int
    hash: str

    def __str__(self) -> str:
        return f'{self.id}:{self.hash}'

    @classmethod
    def parse(cls, text: str) -> 'Head':
        """'ID:HASH' (what `loom audit head` prints first), or HeadError."""
        text = str(text).strip()
        if len(text) > MAX_HEAD_CHARS:
            raise HeadError(f'a chain head is ID:HASH, got {len(text)} characters')
        row_id, _, digest = text.partition(':')
        if not row_id.isdigit() or len(digest) != 64 or \
                any(c not in '0123456789abcdef' for c in digest):
            raise HeadError(f'a chain head is ID:HASH (a record id and 64 hex digits), got '
                            f'{text[:80]!r}')
        return cls(int(row_id), digest)


@dataclass(frozen=True)
class Verdict:
    """What `verify` found: ok, or the first bad record and why."""

    ok: bool
    checked: int = 0            # records in the chain that were checked
    before_chain: int = 0       # records older than the chain (a file upgraded to it)
    chain_start: int = 0        # first id the chain covers
    head: Head | None = None    # the last record (None: no record in the chain)
    bad_id: int | None = None   # the first record that breaks the chain
    reason: str = ''

    def describe(self) -> str:
        if not self.ok:
            return f'audit chain BROKEN at record {self.bad_id}: {self.reason}'
        text = f'audit chain ok: {self.checked} records from id {self.chain_start}'
        if self.head is not None:
            text += f', head {self.head}'
        if self.before_chain:
            text += (f'; {self.before_chain} older records (before the chain started at id '
                     f'{self.chain_start}, when this file was upgraded) are not covered')
        return text


def verify(rows: Iterable[Mapping], chain_start: int | None,
           published: Head | None = None, pre_chain: int | None = None) -> Verdict:
    """Walk `rows` (id, ts_ms, plugin, kind, fields, hash; in id order) and check every link.

    Rows before `chain_start` (written before the file had a chain) must have no hash and an id
    SQLite gives (1 on: with a chain from id 1 there are none), and be no more than `pre_chain`
    (audit_meta: how many there were when the chain started; None: not noted) - any other was
    planted where no hash covers it. From it on every row must have the hash its predecessor and
    its content give. With `published`, that record must still be there with that hash (a cut
    tail, or a chain rewritten after it was noted, fails)."""
    if chain_start is None:
        return Verdict(False, bad_id=0, reason='the file has no chain start (audit_meta); it was '
                       'never opened by a Loom with the chain, or its meta row was removed')
    prev, prev_id, checked, before, published_seen = None, None, 0, 0, False
    first_before = None
    for row in rows:
        row_id = row['id']
        if row_id < chain_start:
            if row['hash'] is not None:
                return Verdict(False, checked, before, chain_start, bad_id=row_id, reason=(
                    f'it has a chain hash but lies before the chain start ({chain_start}): the '
                    'chain start was moved'))
            if row_id < 1:
                return Verdict(False, checked, before, chain_start, bad_id=row_id, reason=(
                    f'it lies before the chain start ({chain_start}) with an id SQLite never '
                    'gives a record: it was added there, outside the chain'))
            before += 1
            first_before = row_id if first_before is None else first_before
            continue
        if pre_chain is not None and before > pre_chain:
            return _planted(checked, before, chain_start, pre_chain, first_before)
        if row['hash'] is None:
            return Verdict(False, checked, before, chain_start, bad_id=row_id, reason=(
                'it has no chain hash (written without the chain, or its hash was removed)'))
        try:
            expected = link(prev, row_id, row['ts_ms'], row['plugin'], row['kind'],
                            row['fields'])
        except (TypeError, ValueError):   # a value of a type Loom never writes (a blob, ...)
            expected = None
        if expected != row['hash']:
            first = chain_start if prev_id is None else prev_id + 1
            if row_id > first:   # ids are consecutive when written (a failed write aside)
                gap = f'{first}' if row_id - 1 == first else f'{first}..{row_id - 1}'
                reason = (f'record(s) {gap} before it are missing (deleted), or it was edited')
            else:
                reason = ('its content does not match its hash: the record was edited, or '
                          'records were reordered or replaced')
            return Verdict(False, checked, before, chain_start, bad_id=row_id, reason=reason)
        if published is not None and row_id == published.id:
            if row['hash'] != published.hash:
                return Verdict(False, checked, before, chain_start, bad_id=row_id, reason=(
                    f'the published head {published} names this record with another hash: '
                    'the chain was rewritten after the head was noted'))
            published_seen = True
        prev, prev_id = row['hash'], row_id
        checked += 1
    if pre_chain is not None and before > pre_chain:
        return _planted(checked, before, chain_start, pre_chain, first_before)
    head = Head(prev_id, prev) if prev_id is not None else None
    if published is not None and not published_seen:
        last = 'no record in the chain' if head is None else f'the last is {head.id}'
        return Verdict(False, checked, before, chain_start, head, bad_id=published.id, reason=(
            f'the published head {published} is not in the log ({last}): records were cut '
            'from the end'))
    return Verdict(True, checked, before, chain_start, head)


def _planted(checked: int, before: int, chain_start: int, pre_chain: int,
             first: int) -> Verdict:
    """More records before the chain start than when it started: one was added there."""
    return Verdict(False, checked, before, chain_start, bad_id=first, reason=(
        f'{before} records lie before the chain start ({chain_start}), {pre_chain} did when the '
        f'chain started: {before - pre_chain} were added there, outside the chain (records '
        f'{first}..{chain_start - 1} are not covered: compare them with a copy)'))
