"""What the storage, encryption and erasure benchmarks share: percentiles, P50/P99/max
summaries and their table cells, a per-op wall + CPU timer, and the machine line every results
file names. One copy here instead of one per benchmark."""
from __future__ import annotations

import os
import platform
import sqlite3
import time

import numpy as np
import psutil


def pct(values, q) -> float:
    """The q-th percentile of `values` (nan when there are none)."""
    return float(np.percentile(values, q)) if len(values) else float('nan')


def summary(values_s, unit: float = 1e6) -> dict:
    """P50, P99, max and count of durations in seconds, scaled by `unit` (1e6: µs, 1e3: ms)."""
    v = np.asarray(values_s, dtype=float) * unit
    return {'p50': pct(v, 50), 'p99': pct(v, 99), 'max': float(v.max()) if len(v) else
            float('nan'), 'n': len(v)}


def fmt(s: dict, digits: int = 1) -> str:
    """'P50 / P99 / max' of a summary()."""
    return f'{s["p50"]:.{digits}f} / {s["p99"]:.{digits}f} / {s["max"]:.{digits}f}'


def ms(values, digits: int = 1) -> str:
    """'a / b / c ms' of a list of milliseconds (P50, P99, max as a benchmark stored them)."""
    return ' / '.join(f'{v:.{digits}f}' for v in values) + ' ms'


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 1e6


class Timer:
    """Wall and this thread's CPU time per op: on a busy machine the CPU time is what the op
    itself cost; the wall time adds whatever else ran (both are reported)."""

    def __init__(self):
        self.wall, self.cpu = [], []

    def __call__(self, fn, *args, **kw):
        w, c = time.perf_counter(), time.thread_time()
        result = fn(*args, **kw)
        self.cpu.append(time.thread_time() - c)
        self.wall.append(time.perf_counter() - w)
        return result

    def stats(self, unit: float) -> dict:
        out = summary(self.wall, unit)
        out['cpu_p50'] = pct(np.asarray(self.cpu) * unit, 50)
        out['cpu_mean'] = float(np.mean(self.cpu) * unit) if self.cpu else float('nan')
        return out


def machine(**libraries: str) -> str:
    """CPU, cores, memory, OS, Python, SQLite, the given library versions, the load average
    (other work on the machine shows there) and the time."""
    cpu = 'unknown CPU'
    for line in open('/proc/cpuinfo'):
        if line.startswith('model name'):
            cpu = line.split(':', 1)[1].strip()
            break
    mem_gb = psutil.virtual_memory().total / 2**30
    libs = ''.join(f', {name} {version}' for name, version in libraries.items())
    return (f'{cpu}, {os.cpu_count()} cores, {mem_gb:.1f} GB; {platform.platform()}; Python '
            f'{platform.python_version()}, SQLite {sqlite3.sqlite_version}{libs}; load average '
            f'at start {os.getloadavg()[0]:.2f}; {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}')
