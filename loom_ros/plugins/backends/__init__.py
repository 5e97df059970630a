"""Model backends: one interface (ModelBackend) over onnxruntime and TFLite, picked by file
extension with `open_model`. Every unusable model file is a ModelError at load."""
from __future__ import annotations

import os
from pathlib import Path

from loom_ros.plugins.backends.base import (Expectation, ModelBackend, ModelError, ModelInputError,
                                            TensorSpec, check_file)
from loom_ros.plugins.backends.onnx_backend import OnnxBackend
from loom_ros.plugins.backends.tflite_backend import TfliteBackend

BACKENDS: tuple[type[ModelBackend], ...] = (OnnxBackend, TfliteBackend)

__all__ = ['BACKENDS', 'ModelBackend', 'ModelError', 'ModelInputError', 'OnnxBackend',
           'TensorSpec', 'TfliteBackend', 'check_file', 'open_model']


def open_model(path: str | os.PathLike, threads: int = 1, expect_inputs: Expectation = None,
               expect_outputs: Expectation = None, warmup: int = 0) -> ModelBackend:
    """Load `path` with the backend its extension names (.onnx, .tflite).

    expect_inputs/expect_outputs: shapes the caller relies on, as a list in tensor order or a dict
    by name; None or -1 leaves a dimension open. A model that disagrees is a ModelError here.
    """
    suffix = Path(path).suffix.lower()
    for backend in BACKENDS:
        if suffix in backend.extensions:
            model = backend(path, threads=threads, expect_inputs=expect_inputs,
                            expect_outputs=expect_outputs)
            if warmup:
                model.warmup(warmup)
            return model
    check_file(path, 'model')  # a missing file says so before the extension complaint
    known = ', '.join(e for b in BACKENDS for e in b.extensions)
    raise ModelError(f'model {path}: unknown extension {suffix or "(none)"!r}; supported: {known}')
