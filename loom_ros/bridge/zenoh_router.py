"""A Zenoh router in a Python process: what tests (and developers without zenohd) run.

    python -m loom_ros.bridge.zenoh_router --listen tls/127.0.0.1:7447 [--keys-dir D] [--fleet F]

Secure by default: it listens only on TLS with mutual authentication, shows the `router`
identity from the keys folder (loom_ros.security.keys), and enforces access control
(loom_ros.security.acl) for every identity whose certificate is in that folder, plus the fleet
file's members and grants. `--insecure` (plain TCP, no rules) is the only way out, and it says
so on stderr. Production fleets run zenohd with the same config (`--print-config`).
It prints one JSON line `{"ready": true, "zid": ..., "listen": [...], "secure": ...}` when it
listens, then serves until SIGINT or SIGTERM.

What access control refuses is counted and audited (loom_ros.security.refusals): zenoh logs its
decisions only through Rust's tracing, to fd 1, so the secure router moves fd 1 onto a pipe a
thread reads (the ready line goes to the real stdout), counts each refusal by identity, action
and key, writes a bounded sample and periodic totals to the audit log (`--audit-db`), and keeps
the counts in `--stats-file` (JSON, rewritten every `--stats-period-s`). Every other zenoh log
line is passed on to stderr. Logging every decision costs throughput (this router moved about
half as many small messages a second with it, on a loaded 2-core machine):
`--no-refusal-count` turns it off, loudly.

A certificate issued after start (`loom keys issue`) or a changed fleet file takes effect without
a restart: the keys folder is checked every `--watch-s`, and when the rules change the router
session is reopened with them, same zid and endpoints; clients reconnect by themselves (about a
second with zenoh's default retry; the gap is printed on stderr and kept in the stats file).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

from loom_ros.bridge.zenoh_link import INSECURE_WARNING, secure_endpoint, session_config
from loom_ros.bringup.stop_signals import stop_event
from loom_ros.config.params import ConfigError, read_yaml
from loom_ros.security import acl, keys
from loom_ros.security.audit import AuditError, AuditLog, default_path
from loom_ros.security.refusals import LOG_DIRECTIVES, RefusalCounter, RefusalParser

MAX_MEMBERS = 10_000   # identities read from a keys folder (each is one certificate parse)
PIPE_BYTES = 1 << 20   # the log pipe's buffer: zenoh's threads block only when it is full
CLOSE_WAIT_S = 5.0     # the most a reload waits for the old session to close
FORWARD_RATE = 50.0    # other zenoh log lines passed on to stderr per second (burst 200)


def fleet_identities(keys_dir) -> list[tuple[str, str]]:
    """(name, role) of every identity in the keys folder that the folder's authority signed
    (keys.signed_identities: certificates only). Others are skipped."""
    return [(i.name, i.role) for i in keys.signed_identities(keys_dir, MAX_MEMBERS)]


def read_fleet(path: str) -> tuple[list[tuple[str, str]], dict]:
    """The fleet file: `members: {name: role}` (identities whose certificates are not in the
    keys folder) and `grants: {name: {put|subscribe|query|serve: [key expr]}}`."""
    if not path:
        return [], {}
    data = read_yaml(path) or {}
    if not isinstance(data, dict) or set(data) - {'members', 'grants'}:
        raise ConfigError(f'{path}: expected a mapping with members and grants')
    members = data.get('members') or {}
    grants = data.get('grants') or {}
    if not isinstance(members, dict) or not isinstance(grants, dict):
        raise ConfigError(f'{path}: members and grants are mappings by identity name')
    return [(str(n), str(r)) for n, r in members.items()], grants


def router_access_control(keys_dir, fleet_file: str = '',
                          identities: list | None = None) -> tuple[dict, list[str]]:
    """The access_control config and the member names it covers. `identities`: the keys
    folder's signed identities when the caller read them already (each is a certificate parse)."""
    extra, grants = read_fleet(fleet_file)
    signed = fleet_identities(keys_dir) if identities is None else \
        [(i.name, i.role) for i in identities]
    members = acl.fleet(signed + extra, grants)
    return acl.access_control(members), [m.name for m in members]


def keys_fingerprint(keys_dir, fleet_file: str = '') -> tuple:
    """What the rules are made from, cheaply compared: the path, size and modification time of
    the authority, of its revocation list (a revoked identity's name leaves the rules), of every
    certificate in the keys folder and of the fleet file."""
    root = keys.keys_path(keys_dir)
    paths = [root / 'ca.pem', root / keys.REVOKED_FILE,
             *sorted(root.glob('*/cert.pem'))[:MAX_MEMBERS]]
    if fleet_file:
        paths.append(Path(fleet_file))
    found = []
    for path in paths:
        try:
            stat = path.stat()
            found.append((str(path), stat.st_size, stat.st_mtime_ns))
        except OSError:
            found.append((str(path), -1, -1))
    return tuple(found)


class Forwarder:
    """Lines to stderr from a thread of its own, through a bounded queue: whoever says something
    never waits for stderr (a parent that does not drain it would otherwise stall the log reader,
    then zenoh's threads writing the log, then routing). What does not fit is counted."""

    def __init__(self, err=sys.stderr, limit: int = 1000):
        self._err = err
        self._queue: queue.Queue = queue.Queue(limit)
        self.dropped = 0
        threading.Thread(target=self._write, name='zenoh-router-stderr', daemon=True).start()

    def say(self, line: str) -> None:
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def _write(self) -> None:
        while True:
            line = self._queue.get()
            try:
                print(line, file=self._err, flush=True)
            except (OSError, ValueError):
                self.dropped += 1

    def drain(self, limit_s: float = 1.0) -> None:
        """Wait (bounded) until what was said is written: before the process exits."""
        deadline = time.monotonic() + limit_s
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)


class AuditWriter:
    """Audit rows written by a thread of its own through a bounded queue, so the log reader never
    waits on SQLite (a busy or slow audit file would otherwise stall it, then zenoh's logging
    threads, then routing). A full queue raises queue.Full: the counter counts it as an error."""

    def __init__(self, log: AuditLog, limit: int = 1000):
        self._log = log
        self._queue: queue.Queue = queue.Queue(limit)
        self.errors, self.last_error = 0, ''
        self._thread = threading.Thread(target=self._write, name='zenoh-router-audit',
                                        daemon=True)
        self._thread.start()

    def __call__(self, kind: str, fields: dict) -> None:
        self._queue.put_nowait((kind, fields))

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._log.append('zenoh_router', item[0], **item[1])
            except AuditError as exc:
                self.errors += 1
                self.last_error = str(exc)[:200]

    def close(self, limit_s: float = 5.0) -> None:
        """Write what is queued (bounded wait), then close the log."""
        try:
            self._queue.put((None), timeout=limit_s)
        except queue.Full:
            pass
        self._thread.join(limit_s)
        self._log.close()


class RefusalWatch:
    """The router's refusal accounting: zenoh's log bytes in (from the reader thread), counts,
    audit rows and other log lines (to `say`, rate-limited) out; snapshots for the stats file."""

    def __init__(self, parser: RefusalParser, counter: RefusalCounter, say=print,
                 clock=time.monotonic):
        self.parser, self.counter, self._say, self._clock = parser, counter, say, clock
        self._lock = threading.Lock()
        self._tokens, self._last = 200.0, clock()
        self.forward_dropped = 0
        self.errors, self.last_error = 0, ''   # chunks the accounting failed on

    def feed(self, chunk: bytes) -> None:
        with self._lock:
            refusals, other = self.parser.feed(chunk)
            for refusal in refusals:
                self.counter.add(refusal)
        for line in other:
            now = self._clock()
            self._tokens = min(200.0, self._tokens + (now - self._last) * FORWARD_RATE)
            self._last = now
            if self._tokens < 1.0:
                self.forward_dropped += 1
                continue
            self._tokens -= 1.0
            self._say(line)

    def tick(self, force: bool = False) -> dict | None:
        with self._lock:
            for refusal in self.parser.settle(force):   # held for their zid's name
                self.counter.add(refusal)
            return self.counter.tick(force)

    def snapshot(self) -> dict:
        with self._lock:
            return {**self.counter.snapshot(), 'log_lines': self.parser.lines,
                    'cut_lines': self.parser.cut_lines, 'acl_log_seen': self.parser.acl_seen,
                    'suspect_lines': self.parser.suspect_lines,
                    'held_for_name': self.parser.held,
                    'forward_dropped': self.forward_dropped, 'errors': self.errors,
                    'last_error': self.last_error}


def tap_zenoh_log(zenoh, watch: RefusalWatch):
    """Route zenoh's Rust log (tracing writes to fd 1) through a pipe into `watch`, with the
    access-control decisions and TLS accept errors switched on; returns the real stdout (a
    file) for the ready line and the reader thread. Must run before the first zenoh.open."""
    real_stdout = os.fdopen(os.dup(1), 'w', buffering=1)
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, getattr(fcntl, 'F_SETPIPE_SZ', 1031), PIPE_BYTES)
    except OSError:
        pass   # the default 64 KiB pipe only blocks zenoh's logging threads sooner
    sys.stdout.flush()
    os.dup2(write_end, 1)
    os.close(write_end)
    sys.stdout = real_stdout

    def read() -> None:
        # Never stops before EOF: a reader that stopped would let the pipe fill, and zenoh's
        # threads block on their next log line (routing with them).
        while True:
            try:
                chunk = os.read(read_end, 1 << 16)
            except InterruptedError:
                continue
            if not chunk:
                break
            try:
                watch.feed(chunk)
            except Exception as exc:   # a bug in the accounting: counted, reading goes on
                watch.errors += 1
                watch.last_error = f'{type(exc).__name__}: {exc}'[:200]
        os.close(read_end)
    reader = threading.Thread(target=read, name='zenoh-log', daemon=True)
    reader.start()
    os.environ['NO_COLOR'] = '1'   # plain lines (tracing-subscriber honours it)
    user = os.environ.get('RUST_LOG', '').strip()
    os.environ['RUST_LOG'] = f'{user or "error"},{LOG_DIRECTIVES}'
    zenoh.init_log_from_env_or('error')
    return real_stdout, reader


def untap_zenoh_log(reader: threading.Thread, limit_s: float = 2.0) -> None:
    """Close the log pipe's write end (fd 1 becomes /dev/null) and let the reader drain it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    reader.join(limit_s)


def write_stats(path: str, stats: dict) -> None:
    """The stats file, replaced whole (a reader never sees half of it)."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w', encoding='utf-8') as out:
        json.dump(stats, out, sort_keys=True)
    os.replace(tmp, path)


def link_names(holder: dict):
    """zid -> the certificate name zenoh authenticated on that link (the router's own table)."""
    def name(zid: str) -> str | None:
        session = holder.get('session')
        if session is None:
            return None
        for link in session.info.links():
            if str(link.zid) == zid:
                return link.auth_identifier or None
        return None
    return name


def reopen(zenoh, old, make_config, stop: threading.Event, say=print) \
        -> tuple[object | None, float]:
    """Close `old` (in a thread: a close was seen hanging) and open a session from
    make_config(), retrying until it opens or `stop`; returns it (None if stopped) and the
    seconds the router was down."""
    start = time.monotonic()
    closer = threading.Thread(target=old.close, name='zenoh-close', daemon=True)
    closer.start()
    closer.join(CLOSE_WAIT_S)
    while not stop.is_set():
        try:
            return zenoh.open(make_config()), time.monotonic() - start
        except zenoh.ZError as exc:
            say(f'zenoh_router: reopening: {exc}; retrying')
            stop.wait(0.5)
    return None, time.monotonic() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='zenoh_router', description=__doc__.splitlines()[0])
    parser.add_argument('--listen', action='append', default=[],
                        help='endpoint to listen on (repeatable; default tls/127.0.0.1:7447, '
                        'tcp/127.0.0.1:7447 with --insecure; tcp/ means tls/ when secure)')
    parser.add_argument('--connect', action='append', default=[],
                        help='another router to connect to (repeatable)')
    parser.add_argument('--multicast-scouting', action='store_true',
                        help='let peers find this router by multicast')
    parser.add_argument('--keys-dir', default=keys.DEFAULT_KEYS_DIR,
                        help=f'credentials folder (default {keys.DEFAULT_KEYS_DIR})')
    parser.add_argument('--identity', default='router', help="this router's identity name")
    parser.add_argument('--fleet', default='', help='fleet YAML: extra members and grants')
    parser.add_argument('--insecure', action='store_true',
                        help='plain TCP without authentication or access control (say why)')
    parser.add_argument('--print-config', action='store_true',
                        help='print the access_control JSON (for zenohd) and exit')
    parser.add_argument('--audit-db', default=default_path(),
                        help='audit log for refusals and reloads (default ~/.loom/audit.db; '
                        '"" for none: counted only)')
    parser.add_argument('--stats-file', default='',
                        help='JSON file with the refusal counts, rewritten every '
                        '--stats-period-s (default: none; totals still go to stderr)')
    parser.add_argument('--stats-period-s', type=float, default=5.0,
                        help='how often the stats file is rewritten (default 5)')
    parser.add_argument('--watch-s', type=float, default=2.0,
                        help='how often the keys folder and fleet file are checked for new '
                        'identities or grants (default 2; 0: never)')
    parser.add_argument('--no-refusal-count', action='store_true',
                        help='do not log, count or audit refused messages (faster; say why)')
    args = parser.parse_args(argv)
    if args.stats_period_s <= 0 or args.watch_s < 0:
        parser.error('--stats-period-s must be > 0 and --watch-s >= 0')

    import zenoh
    watch = reader = audit = None
    out = Forwarder()   # what the router says while it serves: never blocks on stderr
    try:
        if args.insecure:
            identity, rules, members, fingerprint = None, None, [], ()
            listen = args.listen or ['tcp/127.0.0.1:7447']
            print(f'zenoh_router: WARNING {INSECURE_WARNING}', file=sys.stderr, flush=True)
        else:
            identity = keys.load(args.keys_dir, args.identity)
            # Taken before the rules are read: a change while they are read is seen at the
            # first watch, not mistaken for what they were made from.
            fingerprint = keys_fingerprint(args.keys_dir, args.fleet)
            signed = keys.signed_identities(args.keys_dir, MAX_MEMBERS)   # read once, for both
            rules, members = router_access_control(args.keys_dir, args.fleet, signed)
            serving = keys.non_routers_serving(signed)
            if serving:
                print(f'zenoh_router: WARNING identities that may serve TLS but are not routers: '
                      f'{", ".join(serving[:20])}{" ..." if len(serving) > 20 else ""}. Each can '
                      'stand in for this router to a member that reaches its address; unless '
                      'they are listening peers, rotate the authority (README: "Only a router '
                      'serves TLS")', file=sys.stderr, flush=True)
            listen = [secure_endpoint(e) for e in args.listen or ['tls/127.0.0.1:7447']]
            if args.print_config:
                print(json.dumps({'access_control': rules}, indent=2))
                return 0
            audit = AuditWriter(AuditLog(args.audit_db)) if args.audit_db else None
            if args.no_refusal_count:
                print('zenoh_router: WARNING refused messages are not counted or audited '
                      '(--no-refusal-count)', file=sys.stderr, flush=True)
            else:
                holder: dict = {}
                watch = RefusalWatch(RefusalParser(link_names(holder)), RefusalCounter(audit),
                                     say=out.say)
                _, reader = tap_zenoh_log(zenoh, watch)
        fixed_id: list[str] = []

        def make_config():
            config = session_config('router', args.connect, listen, args.multicast_scouting,
                                    identity=identity, access_control=rules)
            if fixed_id:   # a reopened router keeps its zid: clients see the same router
                config.insert_json5('id', json.dumps(fixed_id[0]))
            return config
        session = zenoh.open(make_config())
        fixed_id.append(str(session.zid()))
    except (zenoh.ZError, ValueError, keys.CredentialsError, OSError, AuditError) as exc:
        # ConfigError and AclError are ValueErrors
        print(f'zenoh_router: cannot start: {exc}', file=sys.stderr, flush=True)
        return 1
    if watch is not None:
        holder['session'] = session
    stop = stop_event()
    state = {'zid': fixed_id[0], 'secure': identity is not None, 'members': members,
             'reloads': 0, 'reload_failures': 0, 'last_reload_down_s': None,
             'counting': watch is not None}
    now = time.monotonic()
    next_watch = now + (args.watch_s or float('inf'))

    def report(final: bool = False) -> None:
        counts = {}
        if watch is not None:
            row = watch.tick(force=final)
            if row is not None:
                out.say(f'zenoh_router: refused {row["refused"]} in {row["period_s"]:.0f} s '
                        f'({row["total"]} since start): ' + ', '.join(
                            f'{t["identity"]} {t["action"]} {t["keyexpr"][:60]} x{t["count"]}'
                            for t in row['top'][:5]))
            counts = watch.snapshot()
            if audit is not None:   # rows the writer could not store, besides those refused
                counts['audit_errors'] += audit.errors
                counts['last_audit_error'] = audit.last_error or counts['last_audit_error']
        if args.stats_file:
            try:
                write_stats(args.stats_file, {**state, **counts, 'stderr_dropped': out.dropped})
            except OSError as exc:
                out.say(f'zenoh_router: stats file: {exc}')

    report()   # the stats file exists once the ready line is out
    print(json.dumps({'ready': True, 'zid': fixed_id[0], 'listen': listen,
                      'secure': identity is not None, 'members': members}), flush=True)
    next_stats = time.monotonic() + args.stats_period_s
    while not stop.wait(0.1):
        now = time.monotonic()
        if identity is not None and now >= next_watch:
            next_watch = now + args.watch_s
            seen = keys_fingerprint(args.keys_dir, args.fleet)
            if seen != fingerprint:
                fingerprint = seen
                try:
                    new_rules, new_members = router_access_control(args.keys_dir, args.fleet)
                except (ValueError, OSError, keys.CredentialsError) as exc:
                    state['reload_failures'] += 1
                    out.say(f'zenoh_router: keeping the old rules: {exc}')
                    new_rules = rules
                if new_rules != rules:
                    rules = new_rules
                    reopened, down_s = reopen(zenoh, session, make_config, stop, out.say)
                    if reopened is None:
                        break
                    session = reopened
                    if watch is not None:
                        holder['session'] = session
                    added = sorted(set(new_members) - set(members))
                    removed = sorted(set(members) - set(new_members))
                    members = new_members
                    state.update(members=members, reloads=state['reloads'] + 1,
                                 last_reload_down_s=round(down_s, 3))
                    out.say(f'zenoh_router: new rules: +{added} -{removed}; the router was '
                            f'down {down_s:.3f} s')
                    if audit is not None:
                        try:
                            audit('zenoh_acl_reload', {'added': added, 'removed': removed,
                                                       'down_s': round(down_s, 3)})
                        except queue.Full:
                            audit.errors += 1
        if now >= next_stats:
            next_stats = now + args.stats_period_s
            report()
    session.close()
    if reader is not None:
        untap_zenoh_log(reader)
    report(final=True)
    if audit is not None:
        audit.close()
    out.drain()
    return 0


if __name__ == '__main__':
    sys.exit(main())
