"""What the simulated sensors show and say: camera scenes made from real face photos, and
microphone clips of utterances spoken by espeak-ng (no rclpy; the sim_sensors node plays them).

Camera scenes (RGB uint8, H x W x 3):
- `astronaut`: scikit-image's astronaut photo (Eileen Collins, public domain), one smiling face;
- `astronaut_mirrored`: the same photo flipped left-right (the face moves across the frame);
- `astronaut_small`: the photo at half size on a grey 512 x 512 canvas (a face further away);
- `empty`: a grey frame with faint noise, no face (the UI shows that nobody is there).
Microphone clips are 16 kHz mono int16 with silence around each utterance, cut into chunks.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCENES = ('astronaut', 'astronaut_mirrored', 'astronaut_small', 'empty')
MIC_RATE = 16000


class SceneError(ValueError):
    """An unknown scene name; says which ones exist."""


def make_scene(name: str, seed: int = 0) -> np.ndarray:
    """The RGB frame of scene `name`; SceneError names the known scenes otherwise."""
    if name not in SCENES:
        raise SceneError(f'unknown camera scene {name!r} (have: {", ".join(SCENES)})')
    if name == 'empty':
        rng = np.random.default_rng(seed)
        return np.clip(128 + rng.normal(0, 4, (512, 512, 3)), 0, 255).astype(np.uint8)
    from skimage import data
    photo = data.astronaut()
    if name == 'astronaut_mirrored':
        return np.ascontiguousarray(photo[:, ::-1])
    if name == 'astronaut_small':
        canvas = np.full((512, 512, 3), 128, dtype=np.uint8)
        small = photo[::2, ::2]
        canvas[64:64 + small.shape[0], 192:192 + small.shape[1]] = small
        return canvas
    return np.ascontiguousarray(photo)


@dataclass(frozen=True)
class Clip:
    """One utterance as 16 kHz int16 samples, and where the speech starts and ends in them."""
    text: str
    samples: np.ndarray
    speech_start: int
    speech_end: int


def speak_clips(texts: list[str], pad_s: float = 0.5, speaker=None) -> list[Clip]:
    """Each text spoken by espeak-ng (the tts plugin's Speaker), resampled to 16 kHz, with
    `pad_s` of silence each side (the recogniser's VAD needs it to end an utterance)."""
    from loom_ros.plugins.speech.audio import read_wav, resample
    from loom_ros.plugins.speech.config import load_config
    from loom_ros.plugins.speech.tts import Speaker
    own = speaker is None
    speaker = speaker or Speaker(load_config().tts)
    pad = np.zeros(int(pad_s * MIC_RATE), dtype=np.int16)
    clips = []
    try:
        with tempfile.TemporaryDirectory(prefix='loom_sim_mic_') as tmp:
            for i, text in enumerate(texts):
                out = speaker.say(text, Path(tmp) / f'{i}.wav')
                samples, rate = read_wav(out.path)
                speech = resample(samples, rate, MIC_RATE).astype(np.int16)
                clips.append(Clip(text, np.concatenate([pad, speech, pad]), pad.size,
                                  pad.size + speech.size))
    finally:
        if own:
            speaker.close()
    return clips


def chunks(samples: np.ndarray, chunk: int) -> list[np.ndarray]:
    """Consecutive chunks of `chunk` samples; the last one is zero-padded to full size."""
    out = []
    for start in range(0, samples.size, chunk):
        part = samples[start:start + chunk]
        if part.size < chunk:
            part = np.concatenate([part, np.zeros(chunk - part.size, dtype=samples.dtype)])
        out.append(part)
    return out
