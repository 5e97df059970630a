"""A cheap embedder for the cold tier where a sentence model costs too much (sensor streams on a
small robot): signed feature hashing of words and word pairs, L2-normalised. Deterministic, no
model file, ~100x faster than MiniLM; similar texts share words, so they land close. Loom's
MiniLMEmbedder (agents/embedding.py) is the default where meaning matters."""
from __future__ import annotations

import re
import zlib

import numpy as np

_WORD = re.compile(r'[A-Za-z]+|\d+')


class HashEmbedder:
    def __init__(self, dim: int = 384, max_chars: int = 4096):
        self.dim, self.max_chars = int(dim), int(max_chars)

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _WORD.findall(str(text)[:self.max_chars].lower())
            for feature in words + [f'{a} {b}' for a, b in zip(words, words[1:])]:
                h = zlib.crc32(feature.encode())
                out[row, h % self.dim] += 1.0 if (h >> 16) & 1 else -1.0
            norm = np.linalg.norm(out[row])
            if norm:
                out[row] /= norm
        return out
