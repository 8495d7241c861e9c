"""Reading a user's image for prediction: any path, PIL image or array → uint8[h, w, 3] RGB.

Prediction takes whatever a person points it at, so every failure here is an
`ImageError` that names the image and says what is wrong with it; the caller
reports it and goes on to the next image. Training data does not come through
here: its decoding is inside the tf.data pipeline (`data/views.py`).

Files are read through tf.io.gfile (local, gs://, ram://) into memory and
decoded by PIL from those bytes; nothing is ever written.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps, UnidentifiedImageError

# 2**28 ≈ 268 MP, e.g. 16384 x 16384. It admits every camera a user is likely
# to have (200 MP phone sensors, 16320 x 12240) and stitched phone panoramas,
# which PIL's default (89.5 MP, refused only above 179 MP) would not, while
# bounding what one file can cost: 805 MB as RGB uint8, about 2 GB at the peak
# of a conversion (RGBA or 16-bit intermediate next to the result). The model
# sees a few hundred pixels a side, so nothing larger is worth decoding; a
# caller with more memory and bigger scans passes `max_pixels`.
MAX_PIXELS = 1 << 28

# PIL hands EPS files to Ghostscript, a full PostScript interpreter: never on
# files a stranger may have supplied.
_REFUSED_FORMATS = frozenset({"EPS"})

# Exceptions PIL raises for bytes that are not a (whole) image. Anything else
# is a bug here, not a bad file, and is left to propagate.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

# PIL's bomb limit and Python's warning filters are process-wide; this lock
# keeps one call's temporary settings from leaking into another thread's call.
_PIL_SETTINGS = threading.Lock()


# What prediction accepts; arrays also as anything np.asarray takes (JAX, tf tensors).
ImageSource = str | os.PathLike | Image.Image | np.ndarray


class ImageError(ValueError):
    """An image that cannot be read; the message names it and says why."""


def image_name(source: ImageSource, index: int) -> str:
    """A name to show and to file outputs under: the file name, else `image_{index}`.

    Args:
      source: what was passed to `load_image` (path, PIL image or array).
      index: the image's position in the caller's list, for sources without a file.
    """
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
    elif isinstance(source, Image.Image):
        path = getattr(source, "filename", "")  # set only by Image.open(a path)
    else:
        path = ""
    name = os.path.basename(path) if isinstance(path, str) else ""
    return name or f"image_{index}"


def load_image(
    source: ImageSource, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """uint8[h, w, 3] RGB of a path, a PIL image or an array, upright and opaque.

    Args:
      source: a path (str or os.PathLike; anything tf.io.gfile reads), a
        PIL.Image.Image, or an array (anything np.asarray takes: numpy, JAX, tf)
        of uint8, uint16 or float in [0, 1], shaped [h, w], [h, w, 1], [h, w, 3]
        or [h, w, 4].
      name: what error messages call the image; defaults to the path, the PIL
        image's file name, or "array".
      max_pixels: images with more pixels (h * w) are refused. For files this is
        checked on the header, before anything is decoded.

    Returns:
      A new C-contiguous uint8[h, w, 3] array. EXIF orientation is applied;
      transparent pixels are composited over white; an animated file gives its
      first frame (a PIL image, the frame it is at).

    Raises:
      ImageError: the image is missing, unreadable, corrupt, truncated, too
        large, or of a kind that has no RGB reading; the message names it.
    """
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        name = name or path
        data = _read_bytes(path, name)
        rgb = _decode(lambda: _open(data), name, max_pixels)
    elif isinstance(source, Image.Image):
        name = name or getattr(source, "filename", "") or "PIL image"
        rgb = _decode(lambda: source, name, max_pixels)
    else:
        rgb = _array_to_rgb(source, name or "array", max_pixels)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


# --- files and PIL images ----------------------------------------------------------------


def _read_bytes(path: str, name: str) -> bytes:
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except tf.errors.NotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except tf.errors.OpError as e:
        raise ImageError(f"{name}: cannot be read ({e.message})") from None


def _open(data: bytes) -> Image.Image:
    """A lazily opened image: the header is parsed, the pixels are not decoded yet."""
    Image.init()  # registers the plugins, so the format list below is complete
    formats = [f for f in Image.ID if f not in _REFUSED_FORMATS]
    return Image.open(io.BytesIO(data), formats=formats)  # bytes in memory, not a path


@contextlib.contextmanager
def _pil_bomb_limit(max_pixels: int) -> Iterator[None]:
    """PIL's own size checks at `max_pixels`, as errors, for the duration of one call.

    PIL re-checks sizes while decoding (a GIF frame's extent, a TIFF tile) where
    our header check cannot see; by default it only warns below 179 MP.
    """
    with _PIL_SETTINGS, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_size(width: int, height: int, name: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: the image has no pixels ({width} x {height})")
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: {width} x {height} = {width * height} pixels is more than max_pixels="
            f"{max_pixels} (a decompression bomb, or too large to predict on); "
            "pass a larger max_pixels to read it"
        )


def _decode(get_image: Callable[[], Image.Image], name: str, max_pixels: int) -> np.ndarray:
    """Opens (via `get_image`), size-checks, decodes, orients and converts to RGB."""
    try:
        with _pil_bomb_limit(max_pixels):
            img = get_image()
            _check_size(*img.size, name, max_pixels)  # still lazy: only the header is read
            img.load()  # decode here, inside the try, so that truncation is caught
            img = ImageOps.exif_transpose(img)  # a copy; the caller's image is untouched
        return _pil_to_rgb(img, name)
    except ImageError:
        raise  # already says what is wrong (and is a ValueError, caught below otherwise)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        refused = ", ".join(sorted(_REFUSED_FORMATS))
        raise ImageError(
            f"{name}: not an image (an unknown format, or one refused: {refused})"
        ) from None
    except _DECODE_ERRORS as e:
        raise ImageError(f"{name}: corrupt or truncated image data ({e})") from None


def _pil_to_rgb(img: Image.Image, name: str) -> np.ndarray:
    """uint8[h, w, 3] of a decoded image of any PIL mode."""
    if img.mode.startswith("I;16"):  # I;16, I;16L, I;16B, I;16N: 16-bit grey
        return _grey_to_rgb(_uint16_to_uint8(np.asarray(img)))
    if img.mode in ("I", "F"):  # 32-bit int or float grey, range unknown
        return _grey_to_rgb(_by_value_range(np.asarray(img), name, img.mode))
    if img.has_transparency_data:  # an alpha band, or a transparent colour/palette entry
        if img.mode == "La":  # premultiplied; PIL goes to RGBA only from LA
            img = img.convert("LA")
        return _composite_on_white(np.array(img.convert("RGBA")))
    # PIL's conversions cover the rest: 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX.
    return np.array(img.convert("RGB"))


# --- arrays ----------------------------------------------------------------------------


def _array_to_rgb(source: Any, name: str, max_pixels: int) -> np.ndarray:
    try:
        array = np.asarray(source)
    except (TypeError, ValueError) as e:
        raise ImageError(
            f"{name}: {type(source).__name__} is not a path, image or array ({e})"
        ) from None
    what = f"{name}: {array.dtype}{list(array.shape)}"
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ImageError(
            f"{what} is not an image: expected [h, w], [h, w, 1], [h, w, 3] or [h, w, 4]"
        )
    _check_size(array.shape[1], array.shape[0], what, max_pixels)
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.uint16:
        pixels = _uint16_to_uint8(array)
    elif np.issubdtype(array.dtype, np.floating):
        nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        if nan or inf:
            raise ImageError(f"{what} has {nan} NaN and {inf} infinite values")
        # Floats are taken as [0, 1]; clipping keeps resampling overshoot (-0.01, 1.02) valid.
        pixels = _unit_to_uint8(np.clip(array, 0.0, 1.0))
    else:
        raise ImageError(f"{what}: dtype must be uint8, uint16 or float in [0, 1]")
    if pixels.ndim == 2:
        return _grey_to_rgb(pixels)
    if pixels.shape[-1] == 4:
        return _composite_on_white(pixels)
    return np.array(pixels, order="C")  # a copy: the result must not alias the caller's array


# --- pixel arithmetic -------------------------------------------------------------------


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def _uint16_to_uint8(values: np.ndarray) -> np.ndarray:
    """Rounds v / 257, which maps 0..65535 onto 0..255 exactly (PIL's I;16 → L clips instead)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _unit_to_uint8(values: np.ndarray) -> np.ndarray:
    """[0, 1] → 0..255, rounded."""
    return (values.astype(np.float32) * 255.0 + 0.5).astype(np.uint8)


def _by_value_range(values: np.ndarray, name: str, mode: str) -> np.ndarray:
    """uint8 of PIL's 32-bit int ("I") or float ("F") grey, whose bit depth is not recorded.

    The depth is inferred from the values: within [0, 1] (floats), [0, 255] or
    [0, 65535] they are taken as that range, so a dark image stays dark;
    anything else (negative, larger: depth maps, elevations) is stretched from
    its minimum to its maximum.
    """
    values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise ImageError(f"{name}: mode {mode} image has NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0 and hi <= 1 and mode == "F":
        return _unit_to_uint8(values)
    if lo >= 0 and hi <= 255:
        return (values + 0.5).astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return _uint16_to_uint8(values.round().astype(np.uint16))
    return _unit_to_uint8((values - lo) / ((hi - lo) or 1.0))


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8[h, w, 3] of uint8[h, w, 4] laid over white.

    Dropping alpha would show whatever colour the transparent pixels happen to
    store (often black, sometimes junk from the editor), which the model would
    see as objects; white is how the image looks on a page.
    """
    colour = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:].astype(np.uint32)
    return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
