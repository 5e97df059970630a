"""ONNX models on onnxruntime (CPU execution provider)."""
from __future__ import annotations

import numpy as np

from loom_ros.plugins.backends.base import ModelBackend, ModelError, TensorSpec

# onnxruntime's element type names to numpy dtypes (the ones models here use).
_DTYPES = {
    'tensor(float)': np.float32, 'tensor(float16)': np.float16, 'tensor(double)': np.float64,
    'tensor(int64)': np.int64, 'tensor(int32)': np.int32, 'tensor(int16)': np.int16,
    'tensor(int8)': np.int8, 'tensor(uint8)': np.uint8, 'tensor(uint16)': np.uint16,
    'tensor(bool)': np.bool_, 'tensor(string)': np.object_,
}


def _spec(node) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (node.shape or ()))
    return TensorSpec(node.name, shape, np.dtype(_DTYPES.get(node.type, np.float32)))


class OnnxBackend(ModelBackend):
    kind = 'onnx'
    extensions = ('.onnx',)

    def _load(self) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ModelError('no ONNX runtime: install onnxruntime') from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors reach us as exceptions; keep stderr quiet
        try:
            session = onnxruntime.InferenceSession(str(self.path), options,
                                                   providers=['CPUExecutionProvider'])
        except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail...)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f'onnx model {self.path}: cannot load ({reason}); the file is '
                             'truncated, corrupt or not an ONNX model') from None
        self._session = session
        self.inputs = [_spec(n) for n in session.get_inputs()]
        self.outputs = [_spec(n) for n in session.get_outputs()]
        self._in_names = [s.name for s in self.inputs]

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return self._session.run(None, dict(zip(self._in_names, arrays)))

    def close(self) -> None:
        self._session = None
