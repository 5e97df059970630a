"""Frames in and out of Loom: sensor_msgs/Image (rgb8, bgr8, mono8, rgba8, bgra8) to numpy and
back without cv_bridge, PNG/JPEG bytes to numpy, and the camera frame event format.

A camera frame travels in an Event payload in one of two forms:
- encoded: the payload is a PNG or JPEG file (recognised by its magic bytes), no metadata needed;
- raw: the payload is the pixel rows, with metadata `width`, `height`, `encoding` (rgb8, bgr8,
  mono8, rgba8, bgra8) and optionally `step` (bytes per row, default width * channels).
The conversions take any object with sensor_msgs/Image's fields, so they run without rclpy.

Hostile frames are ImageErrors, never a crash or a memory blow-up: raw sizes are checked against
the bytes that carry them before any arithmetic (`check_raw`, which the camera adapter applies
too), and a PNG or JPEG is refused from its header, before decoding, when it would decode to
more than a raw frame may carry (a 20 KB PNG can claim 179 Mpx: a decompression bomb).
"""
from __future__ import annotations

import io

import numpy as np

from loom_ros.bus.event import DEFAULT_MAX_PAYLOAD_BYTES

CHANNELS = {'rgb8': 3, 'bgr8': 3, 'mono8': 1, 'rgba8': 4, 'bgra8': 4}
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
JPEG_MAGIC = b'\xff\xd8\xff'
# Largest width, height or step of a raw frame: sensor_msgs/Image's fields are uint32; anything
# larger is a lie (and 10**20 overflowed numpy's strides).
MAX_RAW_DIMENSION = 2**31
# Largest side of an encoded (PNG/JPEG) frame, and most bytes its RGB pixels may take: what the
# bus lets a raw frame carry, so an encoded frame decodes to no more than a raw one could be.
MAX_SIDE = 4096
MAX_DECODED_BYTES = DEFAULT_MAX_PAYLOAD_BYTES


class ImageError(ValueError):
    """A frame that cannot be read: says what is wrong (encoding, size, bytes)."""


def to_rgb(pixels: np.ndarray, encoding: str) -> np.ndarray:
    """An (H, W, 3) uint8 RGB view or copy of pixels in `encoding`."""
    if encoding == 'rgb8':
        return pixels
    if encoding == 'bgr8':
        return pixels[:, :, ::-1]
    if encoding == 'mono8':
        grey = pixels.reshape(pixels.shape[0], pixels.shape[1])
        return np.repeat(grey[:, :, None], 3, axis=2)
    if encoding == 'rgba8':
        return pixels[:, :, :3]
    if encoding == 'bgra8':
        return pixels[:, :, 2::-1]
    raise ImageError(f'unsupported encoding {encoding!r}; supported: {", ".join(CHANNELS)}')


def check_raw(size: int, width: int, height: int, encoding: str,
              step: int = 0) -> tuple[int, int]:
    """(channels, step) of a raw frame of `size` bytes, or an ImageError saying what does not
    fit: unsupported encoding, empty or out-of-range size, rows shorter than the pixels, too few
    bytes. Pure integer checks: nothing is allocated or read."""
    if encoding not in CHANNELS:
        raise ImageError(f'unsupported encoding {encoding!r}; supported: {", ".join(CHANNELS)}')
    channels = CHANNELS[encoding]
    if width <= 0 or height <= 0:
        raise ImageError(f'image size {width}x{height} is empty')
    if max(width, height, step) > MAX_RAW_DIMENSION or step < 0:
        raise ImageError(f'image size {width}x{height} step {step} is out of range (each at '
                         f'most {MAX_RAW_DIMENSION}, step not negative)')
    row = width * channels
    step = step or row
    if step < row:
        raise ImageError(f'step {step} is shorter than a row of {width} {encoding} pixels ({row})')
    needed = step * (height - 1) + row
    if size < needed:
        raise ImageError(f'{size} bytes for a {width}x{height} {encoding} image with step '
                         f'{step}: needs {needed}')
    return channels, step


def raw_to_array(data, width: int, height: int, encoding: str, step: int = 0) -> np.ndarray:
    """Pixel rows (bytes-like) to an (H, W, C) uint8 array in the same encoding (C=1 for mono8)."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    channels, step = check_raw(buffer.size, width, height, encoding, step)
    row = width * channels
    if step == row:
        return buffer[:row * height].reshape(height, width, channels)
    # Rows padded to `step`: a strided view over the buffer, no copy.
    return np.lib.stride_tricks.as_strided(buffer, (height, width, channels), (step, channels, 1))


def image_from_msg(msg) -> np.ndarray:
    """A sensor_msgs/Image (or any object with its fields) to (H, W, 3) uint8 RGB."""
    data = msg.data
    if isinstance(data, (list, tuple)):
        data = bytes(data)
    elif hasattr(data, 'tobytes') and not isinstance(data, (bytes, bytearray, memoryview)):
        data = memoryview(data)  # array.array from rclpy: no copy
    pixels = raw_to_array(data, int(msg.width), int(msg.height), str(msg.encoding), int(msg.step))
    return to_rgb(pixels, msg.encoding)


def image_to_msg(rgb: np.ndarray, encoding: str = 'rgb8', frame_id: str = '', stamp=None,
                 msg=None):
    """(H, W, 3) RGB (or (H, W) grey for mono8) to a sensor_msgs/Image in `encoding`.

    Pass `msg` (any object with the Image fields) to fill it instead of a new sensor_msgs one.
    """
    pixels = from_rgb(rgb, encoding)
    if msg is None:
        from sensor_msgs.msg import Image
        msg = Image()
    msg.height, msg.width = int(pixels.shape[0]), int(pixels.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(pixels.shape[1] * CHANNELS[encoding])
    msg.data = pixels.tobytes()
    if hasattr(msg, 'header'):
        msg.header.frame_id = frame_id
        if stamp is not None:
            msg.header.stamp = stamp
    return msg


def from_rgb(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """RGB (H, W, 3) uint8 to contiguous pixels in `encoding` ((H, W, 1) for mono8)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        raise ImageError(f'pixels must be uint8, got {rgb.dtype}')
    if encoding == 'mono8':
        grey = rgb if rgb.ndim == 2 else to_grey(rgb)
        return np.ascontiguousarray(grey.reshape(grey.shape[0], grey.shape[1], 1))
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageError(f'expected (H, W, 3) RGB pixels, got shape {rgb.shape}')
    if encoding == 'rgb8':
        return np.ascontiguousarray(rgb)
    if encoding == 'bgr8':
        return np.ascontiguousarray(rgb[:, :, ::-1])
    if encoding in ('rgba8', 'bgra8'):
        alpha = np.full(rgb.shape[:2] + (1,), 255, dtype=np.uint8)
        body = rgb if encoding == 'rgba8' else rgb[:, :, ::-1]
        return np.concatenate([body, alpha], axis=2)
    raise ImageError(f'unsupported encoding {encoding!r}; supported: {", ".join(CHANNELS)}')


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma (what OpenCV's RGB2GRAY computes, which the expression model saw in
    training), as uint8."""
    weighted = rgb[..., 0] * np.float32(0.299) + rgb[..., 1] * np.float32(0.587) \
        + rgb[..., 2] * np.float32(0.114)
    return (weighted + np.float32(0.5)).astype(np.uint8)


def is_encoded(data: bytes) -> bool:
    return data[:8] == PNG_MAGIC or data[:3] == JPEG_MAGIC


def check_decoded_size(width: int, height: int) -> None:
    """An ImageError when an encoded frame of this size would decode to more than a raw frame
    may carry (MAX_DECODED_BYTES as RGB) or has a side over MAX_SIDE."""
    if width > MAX_SIDE or height > MAX_SIDE or width * height * 3 > MAX_DECODED_BYTES:
        raise ImageError(f'image of {width}x{height} refused before decoding: at most '
                         f'{MAX_SIDE} a side and {MAX_DECODED_BYTES} bytes of RGB pixels '
                         f'({width * height * 3} here)')


def decode_image(data: bytes) -> np.ndarray:
    """PNG or JPEG bytes to (H, W, 3) uint8 RGB; the size is checked from the header first."""
    from PIL import Image, UnidentifiedImageError
    try:
        # open reads the header only; nothing is decoded before the size check.
        with Image.open(io.BytesIO(data), formats=('PNG', 'JPEG')) as image:
            check_decoded_size(*image.size)
            image.draft('RGB', image.size)  # lets JPEG skip work it would throw away
            return np.asarray(image.convert('RGB'))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own bomb check in open (a warning is raised where warnings are errors).
        raise ImageError(f'image refused before decoding ({len(data)} bytes): {exc}') from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f'cannot decode the image ({len(data)} bytes): {exc}') from None


def encode_png(rgb: np.ndarray) -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(out, format='PNG', compress_level=1)
    return out.getvalue()


def image_from_event(event) -> np.ndarray:
    """The frame in a camera event (see the module docstring) as (H, W, 3) uint8 RGB."""
    payload = bytes(event.payload) if not isinstance(event.payload, bytes) else event.payload
    if not payload:
        raise ImageError(f'event {event.id} ({event.type}) carries no image')
    if is_encoded(payload):
        return decode_image(payload)
    meta = event.metadata
    missing = [k for k in ('width', 'height', 'encoding') if k not in meta]
    if missing:
        raise ImageError(f'event {event.id} ({event.type}): payload is neither PNG nor JPEG, and '
                         f'raw pixels need metadata {", ".join(missing)}')
    try:
        width, height = int(meta['width']), int(meta['height'])
        step = int(meta.get('step') or 0)
    except ValueError:
        raise ImageError(f'event {event.id}: width/height/step must be integers, got '
                         f'{meta.get("width")!r}/{meta.get("height")!r}/{meta.get("step")!r}') from None
    return to_rgb(raw_to_array(payload, width, height, meta['encoding'], step), meta['encoding'])


def frame_event(rgb: np.ndarray, type: str = 'camera.frame', encoding: str = 'rgb8',
                png: bool = False, **fields):
    """A camera frame event: raw pixels with metadata (default) or a PNG payload."""
    from loom_ros.bus.event import Event
    if png:
        return Event(type=type, payload=encode_png(rgb), **fields)
    pixels = from_rgb(rgb, encoding)
    metadata = dict(fields.pop('metadata', {}))
    metadata.update(width=str(pixels.shape[1]), height=str(pixels.shape[0]), encoding=encoding)
    return Event(type=type, payload=pixels.tobytes(), metadata=metadata, **fields)
