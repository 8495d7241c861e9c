"""Where normalised model coordinates sit in the original image.

The model sees a square canvas of `input_size` pixels holding a resized (and
possibly cropped) view of the original image, padded at the bottom/right.
Codecs work in coordinates normalised to that canvas; results are written in
pixels of the original image. A frame is the per-axis affine map between them:

    pixel = c * scale + offset        (y and x separately)

stored as float32[4] = (scale_y, scale_x, offset_y, offset_x).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def make_frame(
    region: Any,
    unpadded_size: Any,
    input_size: int,
) -> np.ndarray:
    """Frame of a canvas showing `region` of the original image.

    Args:
      region: (y0, x0, height, width) of the shown region in original pixels;
        the whole image is (0, 0, H, W).
      unpadded_size: (height, width) in canvas pixels that the region occupies
        after resizing (the rest of the canvas is padding).
      input_size: side of the square canvas.

    Returns:
      float32[4] frame.
    """
    y0, x0, h, w = (float(v) for v in region)
    uh, uw = (float(v) for v in unpadded_size)
    return np.array(
        [input_size * h / uh, input_size * w / uw, y0, x0],
        np.float32,
    )


def fit_size(height: float, width: float, input_size: int) -> tuple[int, int]:
    """Size of an image resized (aspect kept) to fit inside the canvas."""
    scale = min(input_size / height, input_size / width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def eval_frame(region: Any, input_size: int) -> np.ndarray:
    """Frame of the evaluation view: `region` resized to fit, then padded."""
    unpadded = fit_size(region[2], region[3], input_size)
    return make_frame(region, unpadded, input_size)


def to_pixels(points: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Normalised (y, x) points, float[..., 2] → original-image pixels."""
    points = np.asarray(points, np.float32)
    return points * frame[:2] + frame[2:]


def to_normalised(points: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Original-image pixels (y, x), float[..., 2] → normalised canvas coordinates."""
    points = np.asarray(points, np.float32)
    return (points - frame[2:]) / frame[:2]


def boxes_to_pixels(boxes: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Normalised boxes float[..., 4] (ymin, xmin, ymax, xmax) → pixels."""
    boxes = np.asarray(boxes, np.float32)
    return boxes * np.tile(frame[:2], 2) + np.tile(frame[2:], 2)


def boxes_to_normalised(boxes: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Pixel boxes float[..., 4] (ymin, xmin, ymax, xmax) → normalised."""
    boxes = np.asarray(boxes, np.float32)
    return (boxes - np.tile(frame[2:], 2)) / np.tile(frame[:2], 2)
