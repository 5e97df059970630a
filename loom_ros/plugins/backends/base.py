"""The model backend interface: one way to load, describe, warm up and run a model whatever runtime
executes it, and one error (ModelError) for every way a model file can be unusable.

Everything that can be wrong with a model file is found at load (missing, empty, truncated,
corrupt, not the shape the caller expects), so a plugin fails at Init with a reason, never later.
"""
from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loom_ros.agents.embedding import ModelError as _EmbeddingModelError
from loom_ros.plugins.contract import PluginError

Shape = tuple  # of int (fixed) or None (dynamic)


class ModelError(PluginError, _EmbeddingModelError):
    """A model that cannot be used: says which file and why. It is a PluginError (a plugin's Init
    may let it through) and the embedding module's ModelError (one except clause catches both)."""


class ModelInputError(ValueError):
    """Data handed to run() that does not fit the model's inputs; says which input and how."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, shape (None where the model leaves a dimension open) and
    numpy dtype."""

    name: str
    shape: Shape
    dtype: np.dtype

    def fits(self, shape: Sequence[int | None]) -> bool:
        """Whether an expected shape agrees with this one (None or -1 on either side: any size)."""
        shape = tuple(shape)
        if len(shape) != len(self.shape):
            return False
        return all(a is None or b is None or a == -1 or b == -1 or a == b
                   for a, b in zip(self.shape, shape))

    def describe(self) -> str:
        dims = 'x'.join('?' if d is None else str(d) for d in self.shape)
        return f'{self.name}[{dims}] {np.dtype(self.dtype).name}'


Expectation = Mapping[str, Sequence[int | None]] | Sequence[Sequence[int | None]] | None


def check_file(path: str | os.PathLike, kind: str) -> Path:
    """The path as a Path if it names a non-empty regular file, else a ModelError."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f'{kind} model {path}: file not found')
    if not path.is_file():
        raise ModelError(f'{kind} model {path}: not a regular file')
    if path.stat().st_size == 0:
        raise ModelError(f'{kind} model {path}: file is empty (truncated download or copy?)')
    return path


def _check_expected(path: Path, what: str, specs: list[TensorSpec], expected: Expectation) -> None:
    if expected is None:
        return
    described = ', '.join(s.describe() for s in specs) or 'none'
    if isinstance(expected, Mapping):
        by_name = {s.name: s for s in specs}
        for name, shape in expected.items():
            spec = by_name.get(name)
            if spec is None:
                raise ModelError(f'{path}: expected {what} {name!r}, the model has: {described}')
            if not spec.fits(shape):
                raise ModelError(f'{path}: {what} {name!r} has shape {list(spec.shape)}, '
                                 f'expected {list(shape)} (wrong model file?)')
        return
    expected = list(expected)
    if len(expected) != len(specs):
        raise ModelError(f'{path}: expected {len(expected)} {what}s, the model has '
                         f'{len(specs)}: {described}')
    for spec, shape in zip(specs, expected):
        if not spec.fits(shape):
            raise ModelError(f'{path}: {what} {spec.name!r} has shape {list(spec.shape)}, '
                             f'expected {list(shape)} (wrong model file?)')


class ModelBackend(ABC):
    """A loaded model. Subclasses implement _load (raising ModelError) and _run.

    `inputs`/`outputs` describe the tensors; `run` takes one array per input (a list in input
    order, a dict by name, or a single array for one-input models) and returns the outputs in
    order; `warmup` runs zeros through once so the first real call is not the slow one;
    `set_threads` reloads the runtime with another thread count.
    """

    kind: str = ''
    extensions: tuple[str, ...] = ()

    def __init__(self, path: str | os.PathLike, threads: int = 1,
                 expect_inputs: Expectation = None, expect_outputs: Expectation = None):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ModelError(f'threads must be a positive integer, got {threads!r}')
        self.path = check_file(path, self.kind)
        self.threads = threads
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self._lock = threading.Lock()  # runtimes' interpreters must not run two calls at once
        self._load()
        _check_expected(self.path, 'input', self.inputs, expect_inputs)
        _check_expected(self.path, 'output', self.outputs, expect_outputs)
        self.runs = 0

    # -- for subclasses ---------------------------------------------------------------------------
    @abstractmethod
    def _load(self) -> None:
        """Open the runtime on self.path with self.threads; fill inputs/outputs."""

    @abstractmethod
    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Run arrays (one per input, in order, already checked) and return the outputs."""

    # -- the interface ----------------------------------------------------------------------------
    def run(self, feed) -> list[np.ndarray]:
        arrays = self._arrange(feed)
        with self._lock:
            outputs = self._run(arrays)
            self.runs += 1
        return outputs

    def warmup(self, runs: int = 1) -> None:
        zeros = [np.zeros(tuple(1 if d is None else d for d in s.shape), dtype=s.dtype)
                 for s in self.inputs]
        with self._lock:
            for _ in range(runs):
                self._run(zeros)

    def set_threads(self, threads: int) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ModelError(f'threads must be a positive integer, got {threads!r}')
        with self._lock:
            if threads != self.threads:
                self.threads = threads
                self._load()

    def close(self) -> None:
        """Release the runtime (subclasses drop their session or interpreter)."""

    def describe(self) -> str:
        return (f'{self.kind} {self.path.name}: inputs ' + ', '.join(s.describe() for s in self.inputs)
                + '; outputs ' + ', '.join(s.describe() for s in self.outputs))

    def _arrange(self, feed) -> list[np.ndarray]:
        if isinstance(feed, np.ndarray):
            feed = [feed]
        if isinstance(feed, Mapping):
            missing = [s.name for s in self.inputs if s.name not in feed]
            extra = sorted(set(feed) - {s.name for s in self.inputs})
            if missing or extra:
                raise ModelInputError(f'{self.path.name}: inputs missing {missing}, unknown {extra}')
            feed = [feed[s.name] for s in self.inputs]
        feed = list(feed)
        if len(feed) != len(self.inputs):
            raise ModelInputError(f'{self.path.name}: {len(feed)} arrays for '
                                  f'{len(self.inputs)} inputs')
        arrays = []
        for spec, value in zip(self.inputs, feed):
            value = np.asarray(value)
            if not spec.fits(value.shape):
                raise ModelInputError(f'{self.path.name}: input {spec.name!r} needs shape '
                                      f'{list(spec.shape)}, got {list(value.shape)}')
            if value.dtype != spec.dtype:
                if not np.can_cast(value.dtype, spec.dtype, casting='same_kind'):
                    raise ModelInputError(f'{self.path.name}: input {spec.name!r} needs '
                                          f'{np.dtype(spec.dtype).name}, got {value.dtype.name}')
                value = value.astype(spec.dtype)
            arrays.append(np.ascontiguousarray(value))
        return arrays
