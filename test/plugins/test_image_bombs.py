"""Hostile frames into perception (attack review, findings 2 and minor): a PNG or JPEG that
claims more pixels than a raw frame may carry is refused from its header, before anything is
decoded (a 22 KB PNG of 13370x13380 decoded to 179 Mpx, +1.7 GB; at 20000x20000 Pillow's own
DecompressionBombError escaped as a plugin bug), and raw metadata beyond sensor_msgs' ranges
(step 10**20 overflowed numpy's strides) is an ImageError. Each goes through a real PluginHost
running face_expression, as a camera.front event: counted bad_input, never `raised`.

The big bombs are built a row at a time with zlib (what Pillow would write, without holding
179 Mpx to encode them: a few KB each); the smaller ones are Pillow's own. Decoding is watched:
a test fails, without decoding, the moment Pillow is asked to load an image over the limit."""
from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from loom_ros.bus.event import DEFAULT_MAX_PAYLOAD_BYTES, Event, Privacy
from loom_ros.plugins.host import PluginHost, PluginSpec
from loom_ros.plugins.perception.image import (MAX_DECODED_BYTES, MAX_SIDE, PNG_MAGIC, ImageError,
                                               decode_image, raw_to_array)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid black 1-bit PNG of width x height, compressed a block of rows at a time."""
    row = b'\0' * (1 + (width + 7) // 8)          # filter byte + packed bits
    per_block = max(1, (1 << 20) // len(row))
    z = zlib.compressobj(9)
    parts, left = [], height
    while left:
        n = min(per_block, left)
        parts.append(z.compress(row * n))
        left -= n
    parts.append(z.flush())
    header = struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0)   # 1 bit, greyscale
    return (PNG_MAGIC + _chunk(b'IHDR', header) + _chunk(b'IDAT', b''.join(parts))
            + _chunk(b'IEND', b''))


def pil_bytes(mode: str, size: tuple[int, int], fmt: str, **save) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, format=fmt, **save)
    return out.getvalue()


@pytest.fixture
def decoded(monkeypatch):
    """Sizes Pillow was asked to decode; one over the limit fails the call at once (the old
    code would have gone on to decode 179 Mpx)."""
    sizes = set()
    load = ImageFile.ImageFile.load

    def watched(self):
        sizes.add(self.size)
        if self.size[0] * self.size[1] * 3 > MAX_DECODED_BYTES:
            raise AssertionError(f'decoding {self.size[0]}x{self.size[1]}: not refused')
        return load(self)
    monkeypatch.setattr(ImageFile.ImageFile, 'load', watched)
    return sizes


@pytest.fixture(scope='module')
def host():
    host = PluginHost([PluginSpec(name='face_expression', grants=['camera.read'])])
    assert host.start() == {}
    yield host
    host.stop()


def _send(host, payload: bytes, **metadata):
    slot = host.slots['face_expression']
    before = dict(slot.counters), dict(slot.plugin.stats)
    response = host.handle('face_expression', Event(
        type='camera.front', payload=payload, source='attacker', metadata=metadata,
        privacy=Privacy.SENSITIVE))
    counters, stats = dict(slot.counters), dict(slot.plugin.stats)
    assert counters.get('raised', 0) == before[0].get('raised', 0), response.error  # no bug
    assert stats['bad_input'] == before[1]['bad_input'] + 1, (response.ok, response.error)
    assert not response.ok and response.events == []
    return response.error


def test_the_limits_are_what_a_raw_frame_may_carry(decoded):
    assert MAX_DECODED_BYTES == DEFAULT_MAX_PAYLOAD_BYTES
    # A 1280x1024 RGB frame fits (the bus' sizing), so does a strip MAX_SIDE long; one more
    # pixel a side does not.
    assert decode_image(pil_bytes('RGB', (1280, 1024), 'JPEG')).shape == (1024, 1280, 3)
    assert decode_image(pil_bytes('L', (MAX_SIDE, 8), 'PNG')).shape == (8, MAX_SIDE, 3)
    with pytest.raises(ImageError, match='refused before decoding'):
        decode_image(pil_bytes('L', (MAX_SIDE + 1, 1), 'PNG'))
    with pytest.raises(ImageError, match='refused before decoding'):
        decode_image(pil_bytes('RGB', (1280, 1093), 'JPEG'))   # 1280 * 1093 * 3 > 4 MiB
    assert decoded == {(1280, 1024), (MAX_SIDE, 8)}


@pytest.mark.parametrize('width, height', [(13370, 13380), (20000, 20000)])
def test_png_bomb_is_refused_from_its_header(host, decoded, width, height):
    bomb = png_bomb(width, height)
    assert len(bomb) < 100_000 and struct.unpack('>II', bomb[16:24]) == (width, height)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        error = _send(host, bomb)
    assert 'refused before decoding' in error, error
    # Built the same way, a small one is a real PNG that decodes to what it says.
    assert not decode_image(png_bomb(70, 9)).any()
    assert decoded == {(70, 9)}


def test_a_bomb_warning_raised_as_an_error_is_bad_input_too(host, decoded):
    """Where warnings are errors (python -W error), Pillow raises DecompressionBombWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter('error', Image.DecompressionBombWarning)
        error = _send(host, png_bomb(13370, 13380))
        with pytest.raises(ImageError, match='refused before decoding'):
            decode_image(png_bomb(10000, 10000))   # 100 Mpx: over Pillow's warning limit only
    assert 'refused before decoding' in error and not decoded


@pytest.mark.parametrize('mode, size, fmt, save', [
    ('1', (2048, 2048), 'PNG', {'optimize': True}),         # 12.6 MB of RGB, a 600 B file
    ('RGB', (1500, 1000), 'JPEG', {'quality': 1}),          # 4.5 MB of RGB
    ('L', (MAX_SIDE + 1, 8), 'JPEG', {'quality': 1}),       # one side too long, few pixels
    ('L', (8, MAX_SIDE + 1), 'PNG', {}),
])
def test_pillow_made_frames_over_the_limit_are_refused(host, decoded, mode, size, fmt, save):
    data = pil_bytes(mode, size, fmt, **save)
    assert len(data) < 100_000
    error = _send(host, data)
    assert f'image of {size[0]}x{size[1]} refused before decoding' in error, error
    assert not decoded


@pytest.mark.parametrize('meta, what', [
    (dict(width='1', height='1', encoding='rgb8', step=str(10**20)), 'out of range'),
    (dict(width='1', height='1', encoding='rgb8', step=str(2**63)), 'out of range'),
    (dict(width=str(10**30), height='1', encoding='rgb8'), 'out of range'),
    (dict(width='1', height=str(2**40), encoding='mono8'), 'out of range'),
    (dict(width='10', height='10', encoding='rgb8', step='-5'), 'out of range'),
])
def test_raw_sizes_out_of_range_are_bad_input(host, meta, what):
    """step 10**20 with one row passed the length check (one row needs no step) and overflowed
    numpy's strides: OverflowError, counted as a plugin bug and logged at ERROR."""
    error = _send(host, b'\0' * 3, **meta)
    assert what in error, error


def test_raw_to_array_checks_before_any_arithmetic():
    with pytest.raises(ImageError, match='out of range'):
        raw_to_array(b'\0' * 3, 1, 1, 'rgb8', 10**20)
    with pytest.raises(ImageError, match='out of range'):
        raw_to_array(b'\0' * 6, 1, 2, 'rgb8', 2**31 + 1)
    # In range and consistent with the bytes: still a strided view of them.
    padded = raw_to_array(bytes(range(16)), 2, 2, 'rgb8', 8)
    np.testing.assert_array_equal(padded.reshape(2, 6), [[0, 1, 2, 3, 4, 5],
                                                         [8, 9, 10, 11, 12, 13]])
