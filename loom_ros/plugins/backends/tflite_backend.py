"""TFLite models on ai-edge-litert (or tflite-runtime where that is what is installed)."""
from __future__ import annotations

import numpy as np

from loom_ros.plugins.backends.base import ModelBackend, ModelError, TensorSpec


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter
    except ImportError:
        raise ModelError('no TFLite runtime: install ai-edge-litert (or tflite-runtime)') from None


def _spec(detail: dict) -> TensorSpec:
    signature = detail.get('shape_signature')
    if signature is None or len(signature) == 0:
        signature = detail['shape']
    return TensorSpec(detail['name'], tuple(None if int(d) < 0 else int(d) for d in signature),
                      np.dtype(detail['dtype']))


class TfliteBackend(ModelBackend):
    kind = 'tflite'
    extensions = ('.tflite',)

    def _load(self) -> None:
        Interpreter = _interpreter_class()
        try:
            interpreter = Interpreter(model_path=str(self.path), num_threads=self.threads)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f'tflite model {self.path}: cannot load ({exc}); the file is '
                             'truncated, corrupt or not a TFLite model') from None
        self._interpreter = interpreter
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
        self._in_index = [d['index'] for d in inputs]
        self._in_shape = [tuple(int(x) for x in d['shape']) for d in inputs]
        self._out_index = [d['index'] for d in outputs]
        self.inputs = [_spec(d) for d in inputs]
        self.outputs = [_spec(d) for d in outputs]

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        interpreter = self._interpreter
        resized = False
        for i, array in enumerate(arrays):
            if array.shape != self._in_shape[i]:  # an open dimension with another size
                interpreter.resize_tensor_input(self._in_index[i], array.shape)
                self._in_shape[i] = array.shape
                resized = True
        if resized:
            interpreter.allocate_tensors()
        for index, array in zip(self._in_index, arrays):
            interpreter.set_tensor(index, array)
        interpreter.invoke()
        return [interpreter.get_tensor(index) for index in self._out_index]

    def close(self) -> None:
        self._interpreter = None
