"""Audio plumbing for the speech plugins: WAV read/write, int16 PCM from event payloads,
resampling to the recognizer's 16 kHz, and loudness measures (RMS, dBFS, voiced time) that
tests and health checks use to tell speech from silence.

Mic events carry raw little-endian int16 mono PCM in the payload; the sample rate travels in the
event metadata (`sample_rate`), see plugins.py.
"""
from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np

ASR_RATE = 16000


class AudioFormatError(ValueError):
    """Audio the speech plugins cannot use: says what was expected and what arrived."""


def pcm_from_bytes(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Raw little-endian int16 mono PCM to an int16 array (no copy)."""
    if len(data) % 2:
        raise AudioFormatError(f'{len(data)} bytes is not whole int16 samples (odd length)')
    return np.frombuffer(data, dtype='<i2')


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Float or int samples to int16, rounding and clipping; int16 passes through."""
    samples = np.asarray(samples)
    if samples.dtype == np.int16:
        return samples
    if samples.dtype.kind == 'f' and samples.size and np.nanmax(np.abs(samples)) <= 1.0:
        samples = samples * 32767.0   # float audio in [-1, 1]
    return np.clip(np.rint(samples), -32768, 32767).astype(np.int16)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """(int16 mono samples, sample rate) of a PCM WAV; stereo is mixed down to mono."""
    path = Path(path)
    try:
        with wave.open(str(path), 'rb') as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except FileNotFoundError:
        raise AudioFormatError(f'{path}: no such file') from None
    except (wave.Error, EOFError) as exc:
        raise AudioFormatError(f'{path}: not a readable PCM WAV file ({exc})') from None
    if width != 2:
        raise AudioFormatError(f'{path}: {8 * width}-bit samples; 16-bit PCM expected')
    usable = len(frames) - len(frames) % (2 * channels)   # a truncated last frame is dropped
    samples = np.frombuffer(frames[:usable], dtype='<i2')
    if channels > 1:
        samples = to_int16(samples.reshape(-1, channels).astype(np.float32).mean(axis=1))
    return samples, rate


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> Path:
    """Write int16 mono samples as a PCM WAV (atomically: a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + '.part')
    with wave.open(str(tmp), 'wb') as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(int(sample_rate))
        wav.writeframes(to_int16(samples).astype('<i2').tobytes())
    tmp.replace(path)
    return path


def resample(samples: np.ndarray, from_rate: int, to_rate: int = ASR_RATE) -> np.ndarray:
    """Polyphase resampling (scipy's resample_poly, anti-aliased) to int16 at `to_rate`.

    Whole clips only: resampling chunk by chunk leaves filter edges at every chunk boundary.
    """
    if from_rate <= 0 or to_rate <= 0:
        raise AudioFormatError(f'sample rates must be positive (got {from_rate} -> {to_rate})')
    samples = np.asarray(samples)
    if from_rate == to_rate:
        return to_int16(samples)
    from scipy.signal import resample_poly
    g = math.gcd(int(from_rate), int(to_rate))
    out = resample_poly(samples.astype(np.float32), int(to_rate) // g, int(from_rate) // g)
    return np.clip(np.rint(out), -32768, 32767).astype(np.int16)


def rms(samples: np.ndarray) -> float:
    samples = np.asarray(samples, dtype=np.float64)
    return float(np.sqrt(np.mean(samples * samples))) if samples.size else 0.0


def dbfs(samples: np.ndarray) -> float:
    """RMS level relative to int16 full scale; -inf for digital silence."""
    level = rms(samples)
    return 20 * math.log10(level / 32768.0) if level > 0 else float('-inf')


def voiced_seconds(samples: np.ndarray, sample_rate: int, frame_s: float = 0.02,
                   threshold_dbfs: float = -45.0) -> float:
    """Seconds of 20 ms frames louder than `threshold_dbfs`: how much of a clip is not silence."""
    samples = np.asarray(samples, dtype=np.float64)
    n = max(1, int(sample_rate * frame_s))
    frames = samples[:samples.size - samples.size % n].reshape(-1, n)
    if not frames.size:
        return 0.0
    levels = np.sqrt(np.mean(frames * frames, axis=1))
    limit = 32768.0 * 10 ** (threshold_dbfs / 20)
    return float(np.count_nonzero(levels > limit) * n / sample_rate)


def is_silent(samples: np.ndarray, threshold_dbfs: float = -45.0) -> bool:
    return dbfs(samples) < threshold_dbfs
