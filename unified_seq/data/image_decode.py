"""Training and evaluation images inside tf.data: a size guard and EXIF orientation.

Two things TensorFlow's `decode_image` does not do, written as TF ops so they
run inside tf.data maps (no py_function, so no GIL and no pickling):

* A pixel limit read from the file's header *before* decoding. Zeros
  compress a thousandfold: a 1 MB PNG can hold 20000 x 20000 pixels, and
  decoding it fills 1.2 GB, per parallel call. `declared_size` reads the
  size that JPEG, PNG, GIF, BMP and WebP headers declare; other formats (JPEG
  XL) get no pre-check.
* EXIF orientation of JPEGs, which cameras and phones set instead of
  rotating the pixels. PIL's `ImageOps.exif_transpose` (what prediction uses,
  unified_seq/images.py) and every photo viewer apply it; a model trained on
  sideways images and asked about upright ones is wrong in a way no metric on
  the training data shows.

`probe_images` runs both over a list of files in one parallel pass, for the
check of a split before training (unified_seq/data/inputs.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import tensorflow as tf

# PIL's decompression-bomb guard warns at 89.5 MP and refuses at twice that;
# 50 MP is above every common camera, and a few hundred MB decoded, which a
# training run's parallel decoders can afford several of at once.
DEFAULT_MAX_PIXELS = 50_000_000
_PNG = b"\x89PNG\r\n\x1a\n"
_IHDR = tuple(b"IHDR")  # the first chunk of every PNG
# Sizes of the BMP DIB headers there are (core, v1, v2, v3, OS/2 v2, v4, v5).
_DIB_SIZES = (12, 40, 52, 56, 64, 108, 124)
_EXIF = (0x45, 0x78, 0x69, 0x66, 0x00, 0x00)  # "Exif\0\0"
_ORIENTATION_TAG = 0x0112
# IFD0 entries read at most; real files hold a dozen or two.
_MAX_ENTRIES = 64
# JPEG segments walked at most while looking for the EXIF block, which
# cameras write right after SOI (or after JFIF's APP0).
_MAX_SEGMENTS = 32
# What `decode` puts in the error a too-large image raises; `parse_too_large`
# reads it back out of TensorFlow's message.
_TOO_LARGE = re.compile(
    r"assertion failed: \[(?P<name>.*) declares (?P<h>\d+)x(?P<w>\d+) pixels, more than "
    r"data\.max_image_pixels=(?P<limit>\d+)\]"
)


def _bytes_at(data: tf.Tensor, pos: tf.Tensor, n: int) -> tf.Tensor:
    """int64[n]: the bytes data[pos:pos + n], zeros past the end (never an error)."""
    length = tf.cast(tf.strings.length(data), tf.int64)
    pos = tf.clip_by_value(tf.cast(pos, tf.int64), 0, length)
    piece = tf.strings.substr(data, pos, n)
    padded = tf.strings.substr(tf.strings.join([piece, b"\0" * n]), 0, n)
    return tf.cast(tf.reshape(tf.io.decode_raw(padded, tf.uint8), [n]), tf.int64)


def _uint(b: tf.Tensor, little: tf.Tensor | bool) -> tf.Tensor:
    """Unsigned integer of the last axis of int64 bytes, in either byte order."""
    powers = [256**i for i in range(b.shape[-1])]
    # Both orders as constants: a reversing slice of a constant makes TF's
    # graph optimiser log an alarming (harmless) "remapper failed" error.
    return tf.where(
        little,
        tf.reduce_sum(b * tf.constant(powers, tf.int64), axis=-1),
        tf.reduce_sum(b * tf.constant(powers[::-1], tf.int64), axis=-1),
    )


def _signed32(v: tf.Tensor) -> tf.Tensor:
    return tf.where(v >= 2**31, v - 2**32, v)


def _starts_with(data: tf.Tensor, prefix: bytes) -> tf.Tensor:
    return tf.equal(tf.strings.substr(data, 0, len(prefix)), prefix)


def declared_size(data: tf.Tensor) -> tf.Tensor:
    """int64[2] (height, width) an encoded image's header declares; (-1, -1) when unknown.

    Read from the bytes alone, nothing decoded: JPEG (SOF marker, through
    `tf.io.extract_jpeg_shape`), PNG (IHDR), GIF (logical screen), BMP (DIB
    header; a negative height means rows top-down) and WebP (VP8, VP8L or
    VP8X canvas). The JPEG size is as stored, before EXIF orientation.
    """
    head = _bytes_at(data, 0, 30)
    png = tf.stack([_uint(head[20:24], False), _uint(head[16:20], False)])
    gif = tf.stack([_uint(head[8:10], True), _uint(head[6:8], True)])
    dib = _uint(head[14:18], True)  # BMP: the DIB header's size tells its version
    bmp = tf.where(
        dib == 12,  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        tf.stack([_uint(head[20:22], True), _uint(head[18:20], True)]),
        tf.abs(_signed32(tf.stack([_uint(head[22:26], True), _uint(head[18:22], True)]))),
    )
    # A header that is not what its signature promises is left to the decoder,
    # which names the problem better than a made-up size would.
    is_png = _starts_with(data, _PNG) & tf.reduce_all(tf.equal(head[12:16], _IHDR))
    is_bmp = _starts_with(data, b"BM") & tf.reduce_any(tf.equal(dib, _DIB_SIZES))
    unknown = tf.constant([-1, -1], tf.int64)
    hw = tf.where(is_png, png, unknown)
    hw = tf.where(_starts_with(data, b"GIF87a") | _starts_with(data, b"GIF89a"), gif, hw)
    hw = tf.where(is_bmp, bmp, hw)
    hw = tf.where(_webp_kind(head, b"VP8 "), _webp_lossy(head), hw)
    hw = tf.where(_webp_kind(head, b"VP8L"), _webp_lossless(head), hw)
    hw = tf.where(_webp_kind(head, b"VP8X"), _webp_extended(head), hw)
    return tf.cond(
        _starts_with(data, b"\xff\xd8\xff"),
        lambda: tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64),
        lambda: hw,
    )


def _webp_kind(head: tf.Tensor, chunk: bytes) -> tf.Tensor:
    """bool[]: a WebP file whose first chunk is `chunk`, from its first 16 bytes."""
    want = tf.constant(list(b"RIFF") + [-1] * 4 + list(b"WEBP" + chunk), tf.int64)
    return tf.reduce_all((head[:16] == want) | (want < 0))


def _webp_lossy(head: tf.Tensor) -> tf.Tensor:
    # Key frame: 3-byte tag, start code 9d 01 2a, then 14-bit width and height.
    return tf.stack([_uint(head[28:30], True), _uint(head[26:28], True)]) % (1 << 14)


def _webp_lossless(head: tf.Tensor) -> tf.Tensor:
    # After the 0x2f signature: width - 1 and height - 1 in 14 bits each.
    bits = _uint(head[21:25], True)
    return tf.stack([(bits // (1 << 14)) % (1 << 14) + 1, bits % (1 << 14) + 1])


def _webp_extended(head: tf.Tensor) -> tf.Tensor:
    # The canvas: width - 1 and height - 1 in 24 bits each.
    return tf.stack([_uint(head[27:30], True) + 1, _uint(head[24:27], True) + 1])


def too_large(hw: tf.Tensor, max_pixels: int) -> tf.Tensor:
    """bool[]: a declared (height, width) over `max_pixels` (0: no limit)."""
    if not max_pixels:
        return tf.constant(False)
    # float64: two 32-bit sides read from a hostile header overflow int64.
    pixels = tf.cast(hw[0], tf.float64) * tf.cast(hw[1], tf.float64)
    return pixels > float(max_pixels)


def _tiff_orientation(data: tf.Tensor, tiff: tf.Tensor) -> tf.Tensor:
    """int64[]: the Orientation tag of IFD0 of the TIFF block at `tiff`, else 1."""
    header = _bytes_at(data, tiff, 8)
    little = (header[0] == 0x49) & (header[1] == 0x49)  # "II"; "MM" is big-endian
    known = little | ((header[0] == 0x4D) & (header[1] == 0x4D))
    ifd = tiff + _uint(header[4:8], little)
    count = _uint(_bytes_at(data, ifd, 2), little)
    entries = tf.reshape(_bytes_at(data, ifd + 2, 12 * _MAX_ENTRIES), [_MAX_ENTRIES, 12])
    tags = _uint(entries[:, 0:2], little)
    types = _uint(entries[:, 2:4], little)
    # SHORT (3) is the standard type; some writers use LONG (4).
    values = tf.where(types == 3, _uint(entries[:, 8:10], little), _uint(entries[:, 8:12], little))
    match = (
        (tf.range(_MAX_ENTRIES, dtype=tf.int64) < count)
        & (tags == _ORIENTATION_TAG)
        & ((types == 3) | (types == 4))
    )
    value = tf.gather(values, tf.argmax(tf.cast(match, tf.int32)))  # the first match
    valid = known & tf.reduce_any(match) & (value >= 1) & (value <= 8)
    return tf.where(valid, value, 1)


def exif_orientation(data: tf.Tensor) -> tf.Tensor:
    """int64[] EXIF orientation 1-8 of an encoded JPEG; 1 for other formats or none.

    Walks the JPEG's marker segments up to the image data (SOS) for the APP1
    segment that starts "Exif\\0\\0", then reads tag 0x0112 from IFD0 of the
    TIFF structure behind it.
    """
    length = tf.cast(tf.strings.length(data), tf.int64)
    start = tf.where(_starts_with(data, b"\xff\xd8"), tf.constant(2, tf.int64), -1)

    def searching(pos, tiff, steps):
        return (tiff < 0) & (pos >= 0) & (pos + 4 <= length) & (steps < _MAX_SEGMENTS)

    def step(pos, tiff, steps):
        seg = _bytes_at(data, pos, 10)
        marker = seg[1]
        fill = (seg[0] == 0xFF) & (marker == 0xFF)  # padding byte before a marker
        size = seg[2] * 256 + seg[3]
        exif = (marker == 0xE1) & tf.reduce_all(tf.equal(seg[4:10], _EXIF))
        end = (seg[0] != 0xFF) | (marker == 0xDA) | (marker == 0xD9) | (size < 2)
        next_pos = tf.where(fill, pos + 1, tf.where(end, tf.constant(-1, tf.int64), pos + 2 + size))
        found = tf.where((seg[0] == 0xFF) & exif, pos + 10, tf.constant(-1, tf.int64))
        return next_pos, found, steps + 1

    _, tiff, _ = tf.while_loop(searching, step, (start, tf.constant(-1, tf.int64), tf.constant(0)))
    return tf.cond(
        tiff >= 0, lambda: _tiff_orientation(data, tiff), lambda: tf.constant(1, tf.int64)
    )


def orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Applies EXIF orientation 1-8 to a decoded [h, w, c] image (as PIL's exif_transpose)."""

    # Plain reverses and transposes: tf.image's versions carry shape asserts,
    # which make the branch op stateful, and under symbolic checkpointing
    # tf.data then logs a warning for every image (~20 lines per train step).
    def swapped():
        return tf.transpose(image, [1, 0, 2])

    branches = [
        lambda: image,
        lambda: tf.reverse(image, [1]),  # mirrored
        lambda: tf.reverse(image, [0, 1]),  # 180°
        lambda: tf.reverse(image, [0]),  # flipped
        swapped,  # transposed
        lambda: tf.reverse(swapped(), [1]),  # 90° clockwise
        lambda: tf.reverse(swapped(), [0, 1]),  # transverse
        lambda: tf.reverse(swapped(), [0]),  # 90° counter-clockwise
    ]
    index = tf.clip_by_value(tf.cast(orientation, tf.int32) - 1, 0, 7)
    return tf.switch_case(index, branches)


def _decode_raw_image(data: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def decode(data: tf.Tensor, name: tf.Tensor, max_pixels: int = DEFAULT_MAX_PIXELS) -> tf.Tensor:
    """uint8[h, w, 3] of encoded bytes, upright; refused unread when the header is too large.

    Args:
      data: string[], the encoded image.
      name: string[], the image's file name, for the error message.
      max_pixels: the most pixels (height x width) a header may declare;
        0 for no limit.

    Raises (when run):
      InvalidArgumentError "<name> declares HxW pixels, more than
      data.max_image_pixels=N" (see `parse_too_large`) before any decoding,
      or TensorFlow's decode error for bytes that are not an image.
    """
    if max_pixels:
        hw = declared_size(data)
        message = tf.strings.join(
            [
                name,
                " declares ",
                tf.strings.as_string(hw[0]),
                "x",
                tf.strings.as_string(hw[1]),
                f" pixels, more than data.max_image_pixels={int(max_pixels)}",
            ]
        )
        check = tf.debugging.Assert(tf.logical_not(too_large(hw, max_pixels)), [message])
        # The decoder reads bytes that exist only once the check has passed.
        with tf.control_dependencies([check]):
            data = tf.identity(data)
    return orient(_decode_raw_image(data), exif_orientation(data))


def parse_too_large(message: str) -> tuple[str, int, int, int] | None:
    """(file name, height, width, limit) from the error `decode` raises; None for other errors."""
    match = _TOO_LARGE.search(first_line(message))
    if not match:
        return None
    return match["name"], int(match["h"]), int(match["w"]), int(match["limit"])


@dataclasses.dataclass
class ProbeReport:
    """What one pass over image files found.

    Attributes:
      sizes: path → (height, width) of the decoded, upright image.
      too_large: path → (height, width) its header declares, over the limit
        (never decoded).
      undecodable: path → why it could not be read or decoded (first line
        of TensorFlow's message).
    """

    sizes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    too_large: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    undecodable: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def bad(self) -> list[str]:
        """Every file that cannot be used, in the order probed."""
        return [*self.too_large, *self.undecodable]


def _probe(path: tf.Tensor, max_pixels: int) -> tuple[tf.Tensor, ...]:
    data = tf.io.read_file(path)
    hw = declared_size(data)
    refused = too_large(hw, max_pixels)

    def decoded_size():
        shape = tf.cast(tf.shape(_decode_raw_image(data))[:2], tf.int64)
        # Orientations 5-8 turn the image a quarter: height and width swap.
        return tf.where(exif_orientation(data) >= 5, tf.reverse(shape, [0]), shape)

    size = tf.cond(refused, lambda: tf.constant([-1, -1], tf.int64), decoded_size)
    return refused, hw, size


def probe_images(
    files: Sequence[str], max_pixels: int = DEFAULT_MAX_PIXELS, stop_at_first: bool = False
) -> ProbeReport:
    """Reads and decodes every file once, in parallel, as the pipeline would.

    Images whose header declares more than `max_pixels` are not decoded.
    With `stop_at_first` the pass ends at the first bad file (to name the
    file a pipeline failed on without reading the rest).
    """
    report = ProbeReport()
    files = list(files)
    if not files:
        return report
    ds = tf.data.Dataset.from_tensor_slices(files)
    ds = ds.map(lambda p: _probe(p, max_pixels), num_parallel_calls=tf.data.AUTOTUNE)
    # In order, so that the k-th result (or error) is the k-th file's: a
    # failed element does not end a tf.data iterator.
    iterator = iter(ds.prefetch(tf.data.AUTOTUNE))
    for path in files:
        try:
            refused, hw, size = (t.numpy() for t in next(iterator))
        except tf.errors.OpError as e:
            report.undecodable[path] = first_line(e.message)
        else:
            if refused:
                report.too_large[path] = (int(hw[0]), int(hw[1]))
            else:
                report.sizes[path] = (int(size[0]), int(size[1]))
        if stop_at_first and report.bad:
            break
    return report


def first_line(message: str) -> str:
    """TensorFlow's error message without its function-node prefix, node dump and later lines."""
    line = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line)
    line = re.sub(r"^Error in user-defined function passed to .*? transformation with iterator: "
                  r"[\w:]+: ", "", line)  # fmt: skip
    line = re.sub(r"\s*\[Op:\w+\].*$", "", line)
    return line.strip()
