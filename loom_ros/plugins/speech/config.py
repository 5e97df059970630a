"""config/speech.yaml as validated pydantic models: what the recognizer listens for (phrases with
<slot> templates, or keyphrases) and how the speaker speaks.

A phrase like "what is the weather in <city>" with `slots: {city: [paris, london]}` becomes one
JSGF rule, so the grammar stays small, and the recognised text maps back to the template and the
slot values (Flow 2 asks for the city, not for a string to re-parse).
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_FILE = 'speech.yaml'
SLOT = re.compile(r'<([a-z_][a-z0-9_]*)>')
_WORD = re.compile(r"^[a-z][a-z']*$")


class SpeechConfigError(ValueError):
    """A speech config that cannot be used: names the file, the key and what is wrong."""


def normalize(text: str) -> str:
    """Lower case, single spaces, no punctuation: the form phrases are compared in."""
    text = re.sub(r"[^a-z'<>_0-9 ]+", ' ', text.lower())
    return ' '.join(text.split())


class AsrConfig(BaseModel):
    model_config = ConfigDict(extra='forbid')

    mode: Literal['grammar', 'keyphrase'] = 'grammar'
    sample_rate: Literal[16000] = 16000     # the en-us acoustic model's rate; resample before
    phrases: list[str] = Field(min_length=1)
    slots: dict[str, list[str]] = Field(default_factory=dict)
    keyphrase_threshold: float = Field(1e-30, gt=0, le=1)
    min_confidence: float = Field(0.0, ge=0, le=1)
    partial_results: bool = True
    vad_mode: int = Field(0, ge=0, le=3)          # webrtc VAD aggressiveness
    vad_window_s: float = Field(0.3, gt=0, le=5)  # how much audio decides speech start/end
    vad_ratio: float = Field(0.9, gt=0, lt=1)
    dither: bool = True    # a simulated mic's exact-zero silence breaks the features without it
    seed: int = 1          # dither seed, so a run repeats
    model_dir: str = ''    # empty: pocketsphinx's bundled model/en-us
    # A mic chunk longer than this is refused (counted): one 4 MB event (131 s) had held the
    # plugin host's executor thread 3.3 s. sim_sensors' mic_chunk_ms goes up to 1000.
    max_chunk_s: float = Field(1.0, gt=0, le=10, strict=True, allow_inf_nan=False)
    # An utterance still going after this much audio is dropped (counted `too_long`) and the
    # stream restarted: continuous noise had kept one open for 900 s, growing memory and
    # hiding every command after it.
    max_utterance_s: float = Field(10.0, ge=0.5, le=300, strict=True, allow_inf_nan=False)

    @field_validator('phrases')
    @classmethod
    def _phrases(cls, value: list[str]) -> list[str]:
        out = []
        for phrase in value:
            norm = normalize(phrase)
            if not norm:
                raise ValueError(f'empty phrase {phrase!r}')
            bad = [w for w in SLOT.sub('', norm).split() if not _WORD.match(w)]
            if bad:
                raise ValueError(f'phrase {phrase!r}: words must be letters (got {bad})')
            out.append(norm)
        return out

    @field_validator('slots')
    @classmethod
    def _slots(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        out = {}
        for name, options in value.items():
            if not re.fullmatch(r'[a-z_][a-z0-9_]*', name):
                raise ValueError(f'slot name {name!r}: lower-case letters, digits and _ only')
            norm = [normalize(o) for o in options]
            if not norm or any(not o or '<' in o for o in norm):
                raise ValueError(f'slot {name!r} needs a list of non-empty plain phrases')
            out[name] = norm
        return out

    @model_validator(mode='after')
    def _slots_used_exist(self) -> 'AsrConfig':
        for phrase in self.phrases:
            for name in SLOT.findall(phrase):
                if name not in self.slots:
                    raise ValueError(f'phrase {phrase!r} uses slot <{name}>, which `slots` does '
                                     f'not define (defined: {sorted(self.slots) or "none"})')
        return self

    @model_validator(mode='after')
    def _utterance_outlasts_the_vad_window(self) -> 'AsrConfig':
        if self.max_utterance_s <= self.vad_window_s:
            raise ValueError(f'max_utterance_s ({self.max_utterance_s:g}) must be longer than '
                             f'vad_window_s ({self.vad_window_s:g}): no utterance could finish')
        return self

    def words(self) -> set[str]:
        text = ' '.join([SLOT.sub('', p) for p in self.phrases]
                        + [o for opts in self.slots.values() for o in opts])
        return set(text.split())

    def expanded(self) -> list[str]:
        """Every sentence the grammar accepts (templates with each slot value filled in)."""
        out: list[str] = []
        for phrase in self.phrases:
            names = SLOT.findall(phrase)
            for values in itertools.product(*(self.slots[n] for n in names)):
                text = phrase
                for name, val in zip(names, values):
                    text = text.replace(f'<{name}>', val, 1)
                if text not in out:
                    out.append(text)
        return out

    def match(self, text: str) -> tuple[str, dict[str, str]] | None:
        """The template `text` came from and its slot values; None when no phrase matches."""
        text = normalize(text)
        for phrase in self.phrases:
            pattern = ''
            for part in re.split(r'(<[a-z_][a-z0-9_]*>)', phrase):
                m = SLOT.fullmatch(part)
                if m:
                    alts = '|'.join(re.escape(o) for o in sorted(self.slots[m.group(1)], key=len,
                                                                   reverse=True))
                    pattern += f'(?P<{m.group(1)}>{alts})'
                else:
                    pattern += re.escape(part)
            m = re.fullmatch(pattern, text)
            if m:
                return phrase, {k: v for k, v in m.groupdict().items() if v is not None}
        return None


class TtsConfig(BaseModel):
    model_config = ConfigDict(extra='forbid')

    voice: str = 'en-us'
    rate_wpm: int = Field(150, ge=50, le=500)
    volume: float = Field(1.0, ge=0, le=1)
    isolation: Literal['process', 'inline'] = 'process'
    timeout_s: float = Field(10.0, gt=0, le=300)
    max_chars: int = Field(1000, ge=1)
    play: bool = False          # play through aplay, only where a sound card exists
    keep_last: int = Field(200, ge=1)   # WAV files kept under data_dir/tts (oldest removed)


class SpeechConfig(BaseModel):
    model_config = ConfigDict(extra='forbid')

    asr: AsrConfig
    tts: TtsConfig = Field(default_factory=TtsConfig)


def parse_config(data: object, origin: str = '<dict>') -> SpeechConfig:
    try:
        return SpeechConfig.model_validate(data)
    except ValidationError as exc:
        problems = '; '.join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
                             for e in exc.errors())
        raise SpeechConfigError(f'{origin}: {problems}') from None


def load_config(path: str | Path | None = None) -> SpeechConfig:
    """Read and validate config/speech.yaml (or `path`); SpeechConfigError says what is wrong."""
    if path is None:
        from loom_ros.config.params import config_dir
        path = config_dir() / CONFIG_FILE
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpeechConfigError(f'{path}: cannot read the speech config: {exc.strerror}') from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpeechConfigError(f'{path}: not valid YAML: {exc}') from None
    if not isinstance(data, dict):
        raise SpeechConfigError(f'{path}: expected a mapping with `asr` (and `tts`) at the top')
    return parse_config(data, str(path))
