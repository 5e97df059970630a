"""Constants and helpers tests import by name (conftest.py files are not importable by name once
several folders have one)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAIT_LIMIT_S = 60.0  # upper bound on any wait for a condition; reaching it is a failure


def loom_cli(*args: str) -> list[str]:
    return ['-m', 'loom_ros.cli', *args]


class LinePeer:
    """A child Python process spoken to line by line: `tell` on its stdin, lines from its stdout
    read unbuffered (select() on a buffered pipe misses lines already read ahead)."""

    def __init__(self, name: str, args: list[str], env: dict, terminate_on_close: bool = False):
        import subprocess
        import sys
        self.name = name
        self.terminate_on_close = terminate_on_close   # a node: SIGTERM is its clean stop
        self.popen = subprocess.Popen([sys.executable, *args], env=env, cwd=REPO,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        self.fd = self.popen.stdout.fileno()
        self.pending, self.lines, self.last = b'', [], ''

    def poll_line(self, timeout: float) -> str | None:
        """The next line, or None after `timeout` s or at the end of the output."""
        import os
        import select
        if not self.lines:
            if not select.select([self.fd], [], [], timeout)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            *complete, self.pending = (self.pending + chunk).split(b'\n')
            self.lines.extend(line.decode().strip() for line in complete)
            if not self.lines:
                return None
        self.last = self.lines.pop(0)
        return self.last

    def wait_line(self, condition, what: str, limit: float = WAIT_LIMIT_S) -> str:
        """Read lines until one satisfies `condition`; fail at `limit` or if the child died."""
        import time

        import pytest
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            line = self.poll_line(0.1)
            if line is not None and condition(line):
                return line
            if line is None and self.popen.poll() is not None:
                break
        self.popen.kill()
        pytest.fail(f'{self.name}: no {what} within {limit:.0f} s (last line {self.last!r}); '
                    f'stderr: {self.popen.stderr.read()[-3000:]}')

    def tell(self, text: str) -> None:
        self.popen.stdin.write(text + '\n')
        self.popen.stdin.flush()

    def close(self) -> str:
        """Ask the child to exit ('exit' on stdin; SIGTERM too for a node), kill it if it has
        not within 15 s; returns its stderr."""
        import subprocess
        if self.popen.poll() is None:
            try:
                self.tell('exit')
                self.popen.stdin.close()
            except BrokenPipeError:
                pass
            if self.terminate_on_close:
                self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.stderr.read()


def old_agent_file(path, rows, episodes=(), facts=()):
    """An agent's own file as agents/state.py and memory.py wrote it before the storage layer
    (their tables, by hand): state rows (agent, schema, state json, events), episodes, facts."""
    import sqlite3
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute('create table agent_state (agent_id text primary key, schema int, state text, '
               'events int, last_event_id text, updated_ms int)')
    db.execute('create table episodes (agent_id text, event_id text, time_ms int, type text, '
               'source text, tags text, payload text)')
    db.execute('create table facts (id integer primary key, agent_id text, subject text, '
               'relation text, object text, provenance text, time_ms int, vector blob)')
    db.executemany('insert into agent_state values (?, ?, ?, ?, ?, 0)', rows)
    db.executemany('insert into episodes values (?, ?, ?, ?, ?, ?, ?)', episodes)
    db.executemany('insert into facts (agent_id, subject, relation, object, provenance, time_ms, '
                   'vector) values (?, ?, ?, ?, ?, ?, ?)', facts)
    db.commit()
    db.close()
