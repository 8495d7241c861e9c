"""Polygons ↔ binary masks ↔ COCO run-length encodings, with pycocotools.

Masks are rasterised by pycocotools (`frPyObjects` → `merge` → `decode`), the
same code COCO uses to turn ground-truth polygons into masks, so a predicted
polygon identical to the ground truth scores IoU 1. Points are (y, x) pixels
of the original image, as everywhere in unified_seq; COCO's flat lists are
x-y, and the conversion happens only here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils


def _coco_flat(polygon: np.ndarray) -> list[float]:
    """float[P, 2] (y, x) → COCO flat list [x1, y1, x2, y2, ...]."""
    return np.asarray(polygon, np.float64)[:, ::-1].reshape(-1).tolist()


def polygons_to_mask(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Rasterises the union of polygons, as COCO does for ground truth.

    Args:
      polygons: float[P_i, 2] arrays of (y, x) pixels, each with P_i ≥ 3
        (pycocotools reads 2-point lists as boxes).
      height, width: mask size in pixels.

    Returns:
      uint8[height, width] mask of 0/1.
    """
    flat = [_coco_flat(p) for p in polygons if len(p) >= 3]
    if not flat:
        return np.zeros([height, width], np.uint8)
    rles = mask_utils.frPyObjects(flat, height, width)
    return mask_utils.decode(mask_utils.merge(rles))


def mask_to_rle(mask: np.ndarray) -> dict:
    """uint8[h, w] mask → COCO compressed RLE with `counts` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two binary masks of the same shape (1.0 if both empty)."""
    a = a.astype(bool)
    b = b.astype(bool)
    union = np.count_nonzero(a | b)
    if union == 0:
        return 1.0
    return np.count_nonzero(a & b) / union
