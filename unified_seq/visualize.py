"""Pictures of annotations and predictions (PIL), for people to look at.

All coordinates are pixels of the image drawn on, y before x.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

# COCO skeleton over the 17 keypoints (0-based), drawn as limbs.
COCO_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
    (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4),
)  # fmt: skip
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128),
)  # fmt: skip


def colour(i: int) -> tuple[int, int, int]:
    return _PALETTE[int(i) % len(_PALETTE)]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float[h, w, 3] in [0, 1] (or uint8) → uint8[h, w, 3]."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def draw(
    image: np.ndarray,
    boxes: np.ndarray | None = None,
    labels: Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    masks: Sequence[np.ndarray] | None = None,
    polygons: Sequence[Sequence[np.ndarray]] | None = None,
    keypoints: np.ndarray | None = None,
    caption: str | None = None,
) -> Image.Image:
    """Draws annotations on an image.

    Args:
      image: float[h, w, 3] in [0, 1] or uint8.
      boxes: float[N, 4] ymin, xmin, ymax, xmax.
      labels: N strings written at the boxes.
      classes: N class ids choosing colours.
      masks: N uint8[h, w] binary masks, blended in.
      polygons: per instance, a list of float[P, 2] (y, x) outlines.
      keypoints: float[M, K, 3] (y, x, v); points with v > 0 and limbs drawn.
      caption: text written under the image.

    Returns:
      the picture, with a strip for the caption when one is given.
    """
    base = to_uint8(image).copy()
    n = 0 if boxes is None else len(boxes)
    classes = list(classes) if classes is not None else list(range(n))
    if masks is not None:
        for i, m in enumerate(masks):
            c = np.array(colour(classes[i] if i < len(classes) else i), np.float32)
            sel = np.asarray(m) > 0
            base[sel] = (0.5 * base[sel] + 0.5 * c).astype(np.uint8)
    h, w = base.shape[:2]
    strip = 14 if caption else 0
    pic = Image.new("RGB", (w, h + strip), (255, 255, 255))
    pic.paste(Image.fromarray(base), (0, 0))
    pen = ImageDraw.Draw(pic)
    for i in range(n):
        y0, x0, y1, x1 = (float(v) for v in boxes[i])
        c = colour(classes[i])
        pen.rectangle([x0, y0, x1, y1], outline=c, width=1)
        if labels is not None:
            pen.text((x0 + 1, y0), labels[i], fill=c)
    for i, parts in enumerate(polygons or []):
        c = colour(classes[i] if i < len(classes) else i)
        for poly in parts:
            xy = [(float(p[1]), float(p[0])) for p in poly]
            if len(xy) >= 2:
                pen.line(xy + xy[:1], fill=c, width=1)
    for person in [] if keypoints is None else keypoints:
        for a, b in COCO_SKELETON:
            if a < len(person) and b < len(person) and person[a, 2] > 0 and person[b, 2] > 0:
                pen.line(
                    [(person[a, 1], person[a, 0]), (person[b, 1], person[b, 0])],
                    fill=(255, 255, 255),
                )
        for k, (y, x, v) in enumerate(person):
            if v > 0:
                c = colour(k)
                pen.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=c)
    if caption:
        pen.text((2, h + 1), caption, fill=(0, 0, 0))
    return pic


def _keypoints_yx(flat: Sequence[float]) -> np.ndarray:
    """COCO's flat [x, y, v] * K → float32[K, 3] (y, x, v)."""
    xyv = np.asarray(flat, np.float32).reshape(-1, 3)
    return xyv[:, [1, 0, 2]]


def draw_prediction(image: np.ndarray, record: dict, min_score: float = 0.3) -> Image.Image:
    """A prediction record (prediction.py) drawn on its image, at the image's size.

    Objects scored below `min_score` are left out (the record keeps them: AP
    counts low-score detections, people looking at a picture do not). Boxes
    carry their category and score; masks are blended in; keypoints are
    drawn as skeletons; the caption is written over the image's bottom edge
    on a dark band, so the picture keeps the image's size.
    """
    # Local: pycocotools is only needed when there are masks to draw.
    from pycocotools import mask as mask_utils

    objects = [o for o in record.get("objects", []) if o.get("score", 1.0) >= min_score]
    boxes = np.array(
        [[o["bbox"][1], o["bbox"][0], o["bbox"][1] + o["bbox"][3], o["bbox"][0] + o["bbox"][2]]
         for o in objects], np.float32,
    ).reshape(-1, 4)  # fmt: skip
    labels = [f"{o.get('category', o['category_id'])} {o.get('score', 1.0):.2f}" for o in objects]
    masks, people = [], []
    for o in objects:
        for value in o.values():
            if not isinstance(value, dict):
                continue
            if "segmentation" in value:
                rle = dict(value["segmentation"])
                if isinstance(rle["counts"], str):
                    rle["counts"] = rle["counts"].encode("ascii")
                masks.append(mask_utils.decode(rle))
            if "keypoints" in value:
                people.append(_keypoints_yx(value["keypoints"]))
    picture = draw(
        image,
        boxes,
        labels,
        classes=[o["category_id"] for o in objects],
        masks=masks or None,
        keypoints=np.stack(people) if people else None,
    )
    caption = next(
        (v["caption"] for v in record.values() if isinstance(v, dict) and "caption" in v), None
    )
    if caption:
        _write_over(picture, caption)
    return picture


def _write_over(picture: Image.Image, text: str) -> None:
    """Writes `text` on a dark band along the picture's bottom edge."""
    pen = ImageDraw.Draw(picture, "RGBA")
    left, top, right, bottom = pen.textbbox((0, 0), text)
    height = bottom - top + 4
    y = max(0, picture.height - height)
    pen.rectangle([0, y, picture.width, picture.height], fill=(0, 0, 0, 150))
    pen.text((2, y + 2 - top), text, fill=(255, 255, 255, 255))


def grid(pictures: Sequence[Image.Image], columns: int = 4) -> Image.Image:
    """Tiles pictures row by row on a white sheet."""
    if not pictures:
        raise ValueError("grid() needs at least one picture")
    cw = max(p.width for p in pictures)
    ch = max(p.height for p in pictures)
    rows = (len(pictures) + columns - 1) // columns
    sheet = Image.new("RGB", (cw * columns, ch * rows), (255, 255, 255))
    for i, p in enumerate(pictures):
        sheet.paste(p, ((i % columns) * cw, (i // columns) * ch))
    return sheet


def save_png(picture: Image.Image, path: str) -> None:
    """Writes a picture as PNG to any tf.io.gfile path, creating its folder."""
    png = io.BytesIO()
    picture.save(png, format="PNG")
    folder = os.path.dirname(path)
    if folder:
        tf.io.gfile.makedirs(folder)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(png.getvalue())
