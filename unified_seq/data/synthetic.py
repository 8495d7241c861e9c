"""The embedded default data set: a small COCO-format world of shapes and stick figures.

`generate` writes it in the standard COCO 2017 layout, so the ordinary COCO JSON
loader reads it and every code path (non-contiguous category ids, polygons,
keypoints, captions, images of varying aspect) is exercised without a download:

    out_dir/annotations/instances_{train,val}2017.json
    out_dir/annotations/person_keypoints_{train,val}2017.json
    out_dir/annotations/captions_{train,val}2017.json
    out_dir/{train,val}2017/<image id>.png
    out_dir/synthetic.json           parameters; written last, marks the set complete

The world is kept simple enough for a tiny model to learn all four tasks in
minutes on a CPU: a plain muted background, 1-5 objects that never overlap
(so every polygon is exactly the visible instance), saturated shapes in four
named colours, and at most one upright stick figure whose 17 COCO keypoints
are marked with dots. Every instance is painted from the COCO rasterisation
of the very polygon written to the JSON (pycocotools, the same rasteriser the
COCO evaluation uses), so annotation and pixels agree exactly.

Everything is a pure function of the seed: image `i` of a split draws from
`numpy.random.default_rng([seed, split, i])`, so two runs give byte-identical
files and a smaller set is a prefix of a larger one.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

import cv2
import ml_collections
import numpy as np
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils

from unified_seq import cache
from unified_seq.data.coco import absolute_path

# Bump when the generated content changes, so cached sets are rebuilt.
GENERATOR_VERSION = 1
MARKER = "synthetic.json"
SPLITS = ("train", "val")

PERSON_ID = 1
KEYPOINT_NAMES = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
# COCO's skeleton, 1-based keypoint indices.
SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
    [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]  # fmt: skip
# Ids deliberately leave gaps, as COCO's do, so remapping code is exercised.
SHAPE_IDS = {"circle": 3, "square": 6, "triangle": 9}
CATEGORIES = [
    {
        "id": PERSON_ID,
        "name": "person",
        "supercategory": "person",
        "keypoints": list(KEYPOINT_NAMES),
        "skeleton": SKELETON,
    },
    *({"id": i, "name": name, "supercategory": "shape"} for name, i in SHAPE_IDS.items()),
]

# Exact RGB values: far from every background, so an instance's pixels can be
# told apart by colour (the tests rely on that).
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
# The figure's left limbs get a lighter shade so left and right stay
# distinguishable under horizontal flips.
PERSON_COLORS = {
    "body": (150, 50, 170),
    "left": (225, 130, 235),
    "visible": (255, 255, 255),  # keypoint dot, v = 2
    "occluded": (15, 15, 15),  # keypoint dot, v = 1 (v = 0 has no dot)
}
# Muted base colours; jitter and gradient keep every channel within [50, 205].
BACKGROUNDS = {
    "gray": (125, 125, 125),
    "beige": (185, 172, 148),
    "dark": (70, 70, 80),
}
BACKGROUND_JITTER = 8
BACKGROUND_GRADIENT = 10

CIRCLE_VERTICES = 24
SHAPE_DIAMETER = (16.0, 54.0)  # pixels at image_size 128
PERSON_HEIGHT = (40.0, 90.0)  # pixels at image_size 128
PERSON_PROBABILITY = 0.4
MAX_OBJECTS = 5
MIN_GAP = 2.0  # pixels between the boxes of two objects
PLACEMENT_TRIES = 50
MAX_PERSON_POINTS = 128
# Silhouettes are traced at this supersampling so the polygon hugs the
# drawn figure within a fraction of a pixel.
TRACE_SCALE = 4
CV_SHIFT = 4  # fractional bits of cv2 drawing coordinates

LEFT_LIMBS = ((5, 7), (7, 9), (11, 13), (13, 15))
RIGHT_LIMBS = ((6, 8), (8, 10), (12, 14), (14, 16))
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}


@dataclasses.dataclass
class Figure:
    """A stick figure in image pixels (continuous COCO coordinates, x before y).

    keypoints: float64[17, 2] joint positions (x, y), COCO keypoint order.
    visibility: int64[17] COCO flags: 0 not labelled, 1 occluded, 2 visible.
    head: float64[3] head disc (x, y, radius).
    thickness: limb width in pixels.
    """

    keypoints: np.ndarray
    visibility: np.ndarray
    head: np.ndarray
    thickness: float

    def shifted(self, dx: float, dy: float) -> Figure:
        offset = np.array([dx, dy])
        head = self.head + np.array([dx, dy, 0.0])
        return dataclasses.replace(self, keypoints=self.keypoints + offset, head=head)


@dataclasses.dataclass
class Instance:
    """One object of an image.

    polygons: list of float64[P, 2] (x, y) vertices in pixels, as written to the JSON.
    color: colour name for shapes, "" for a person.
    figure: the stick figure of a person, None for shapes.
    """

    category_id: int
    polygons: list[np.ndarray]
    color: str = ""
    figure: Figure | None = None

    @property
    def bbox(self) -> np.ndarray:
        """float64[4] COCO box (x, y, width, height): the polygons' extent."""
        points = np.concatenate(self.polygons)
        lo, hi = points.min(0), points.max(0)
        return np.concatenate([lo, hi - lo])


@dataclasses.dataclass
class ImageRecord:
    """One generated image: its size, background and instances."""

    height: int
    width: int
    background: str
    pixels: np.ndarray  # uint8[H, W, 3]
    instances: list[Instance]


def _cv_points(points: np.ndarray, origin: np.ndarray, scale: float) -> np.ndarray:
    """Continuous (x, y) → cv2 fixed-point pixel indices (pixel i spans [i, i + 1])."""
    return np.round(((points - origin) * scale - 0.5) * (1 << CV_SHIFT)).astype(np.int32)


def _draw_figure(
    canvas: np.ndarray,
    figure: Figure,
    origin: np.ndarray,
    scale: float,
    limbs: tuple[tuple[int, int], ...],
    with_body: bool,
) -> None:
    """Draws limbs (and, with_body, the torso, neck and head) of `figure` into `canvas`."""
    joints = _cv_points(figure.keypoints, origin, scale)
    width = max(1, round(figure.thickness * scale))
    for a, b in limbs:
        cv2.line(canvas, joints[a], joints[b], 255, width, cv2.LINE_8, CV_SHIFT)
    if not with_body:
        return
    torso = joints[[5, 6, 12, 11]]
    cv2.fillConvexPoly(canvas, torso, 255, cv2.LINE_8, CV_SHIFT)
    cv2.polylines(canvas, [torso], True, 255, width, cv2.LINE_8, CV_SHIFT)
    head = _cv_points(figure.head[None, :2], origin, scale)[0]
    neck = _cv_points(figure.keypoints[[5, 6]].mean(0, keepdims=True), origin, scale)[0]
    cv2.line(canvas, head, neck, 255, width, cv2.LINE_8, CV_SHIFT)
    radius = round(figure.head[2] * scale * (1 << CV_SHIFT))
    cv2.circle(canvas, head, radius, 255, -1, cv2.LINE_8, CV_SHIFT)


def figure_mask(figure: Figure, height: int, width: int) -> np.ndarray:
    """bool[H, W]: pixels at least half covered by the figure's ideal silhouette.

    Independent of the traced polygon, so it checks how well the polygon
    follows the figure.
    """
    s = TRACE_SCALE
    canvas = np.zeros([height * s, width * s], np.uint8)
    _draw_figure(canvas, figure, np.zeros(2), s, LEFT_LIMBS + RIGHT_LIMBS, True)
    coverage = canvas.reshape(height, s, width, s).mean(axis=(1, 3)) / 255
    return coverage >= 0.5


def _trace_silhouette(figure: Figure) -> list[np.ndarray]:
    """The figure's outline as COCO polygons: float64[P, 2] (x, y), ≤ 128 points in all."""
    margin = figure.thickness + 2.0
    lo = np.floor(np.minimum(figure.keypoints.min(0), figure.head[:2] - figure.head[2]) - margin)
    hi = np.ceil(np.maximum(figure.keypoints.max(0), figure.head[:2] + figure.head[2]) + margin)
    size = ((hi - lo) * TRACE_SCALE).astype(int)
    canvas = np.zeros([size[1], size[0]], np.uint8)
    _draw_figure(canvas, figure, lo, TRACE_SCALE, LEFT_LIMBS + RIGHT_LIMBS, True)
    # Contour points are centres of boundary pixels, half a (fine) pixel inside
    # the edge, and polygon chords cut convex bends: growing the mask by one
    # fine pixel balances both (IoU with the figure ~0.97 instead of ~0.95).
    canvas = cv2.dilate(canvas, cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3)))
    contours, _ = cv2.findContours(canvas, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # Start at half a pixel of tolerance and loosen until the point budget of
    # the segmentation codec is met.
    epsilon = 0.5 * TRACE_SCALE
    while True:
        approx = [cv2.approxPolyDP(c, epsilon, True)[:, 0, :] for c in contours]
        approx = [a for a in approx if len(a) >= 3]
        if sum(len(a) for a in approx) <= MAX_PERSON_POINTS:
            break
        epsilon *= 1.25
    return [(a + 0.5) / TRACE_SCALE + lo for a in approx]


def _canonical(polygon: np.ndarray) -> np.ndarray:
    """Rounds to 0.01 px, starts at the top-most (then left-most) vertex, goes clockwise.

    A fixed start and direction make the polygon token sequence a function of
    the shape alone, which the segmentation decoder can learn.
    """
    polygon = np.round(polygon, 2)
    x, y = polygon[:, 0], polygon[:, 1]
    signed_area = np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)
    if signed_area < 0:  # counter-clockwise on screen (y down)
        polygon = polygon[::-1]
    start = np.lexsort((polygon[:, 0], polygon[:, 1]))[0]
    return np.roll(polygon, -start, axis=0)


def _regular_polygon(rng: np.random.Generator, num_vertices: int, radius: float) -> np.ndarray:
    """float64[V, 2] vertices around the origin, randomly rotated."""
    angles = rng.uniform(0, 2 * np.pi) + np.arange(num_vertices) * (2 * np.pi / num_vertices)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _sample_shape(rng: np.random.Generator, scale: float) -> tuple[str, str, np.ndarray]:
    """(shape name, colour name, float64[V, 2] vertices centred on the origin)."""
    name = list(SHAPE_IDS)[rng.integers(len(SHAPE_IDS))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    radius = rng.uniform(*SHAPE_DIAMETER) * scale / 2
    vertices = {"circle": CIRCLE_VERTICES, "square": 4, "triangle": 3}[name]
    return name, color, _regular_polygon(rng, vertices, radius)


def _rotate(vector: np.ndarray, degrees: float) -> np.ndarray:
    """Rotates a downward (x, y) direction; positive degrees turn it towards +x."""
    t = np.deg2rad(degrees)
    x, y = vector
    return np.array([x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)])


def _sample_figure(rng: np.random.Generator, height: float) -> Figure:
    """An upright figure facing the viewer (its left on the image's right), head top at y=0.

    Limb angles are drawn independently per side so poses vary; a random
    share of figures get 1-4 keypoints flagged occluded (v=1) or unlabelled (v=0).
    """
    kp = np.zeros([17, 2])
    r = 0.1 * height * rng.uniform(0.9, 1.1)
    head = np.array([0.0, r, r])
    kp[0] = [0.0, 1.15 * r]
    kp[1:3] = [[0.4 * r, 0.8 * r], [-0.4 * r, 0.8 * r]]
    kp[3:5] = [[0.8 * r, r], [-0.8 * r, r]]
    shoulder_y = 2 * r + 0.05 * height
    hip_y = height * rng.uniform(0.53, 0.57)
    shoulder_x = height * rng.uniform(0.11, 0.15)
    hip_x = height * rng.uniform(0.06, 0.09)
    down = np.array([0.0, 1.0])
    for side, (s, e, w, h, k, a) in ((1, (5, 7, 9, 11, 13, 15)), (-1, (6, 8, 10, 12, 14, 16))):
        kp[s] = [side * shoulder_x, shoulder_y]
        kp[h] = [side * hip_x, hip_y]
        upper = rng.uniform(10, 80)
        lower = upper + rng.uniform(-20, 50)
        kp[e] = kp[s] + 0.17 * height * _rotate(down, side * upper)
        kp[w] = kp[e] + 0.16 * height * _rotate(down, side * lower)
        thigh = rng.uniform(0, 20)
        shin = thigh + rng.uniform(-15, 10)
        kp[k] = kp[h] + 0.22 * height * _rotate(down, side * thigh)
        kp[a] = kp[k] + 0.22 * height * _rotate(down, side * shin)
    # Rounded as the JSON will hold them; placement shifts by whole pixels, so
    # the dots drawn from these match the file exactly.
    kp, head = np.round(kp, 2), np.round(head, 2)
    visibility = np.full(17, 2)
    if rng.random() < 0.5:
        hidden = rng.choice(17, size=rng.integers(1, 5), replace=False)
        visibility[hidden] = rng.integers(0, 2, size=len(hidden))
    return Figure(kp, visibility, head, max(3.0, 0.075 * height))


def _boxes_apart(box: np.ndarray, others: list[np.ndarray]) -> bool:
    """Whether COCO box (x, y, w, h) keeps MIN_GAP pixels from every box in `others`."""
    for other in others:
        if (
            box[0] < other[0] + other[2] + MIN_GAP
            and other[0] < box[0] + box[2] + MIN_GAP
            and box[1] < other[1] + other[3] + MIN_GAP
            and other[1] < box[1] + box[3] + MIN_GAP
        ):
            return False
    return True


def _place(
    rng: np.random.Generator, polygons: list[np.ndarray], height: int, width: int, taken: list
) -> np.ndarray | None:
    """A whole-pixel (dx, dy) that puts `polygons` inside the image clear of `taken`, or None."""
    points = np.concatenate(polygons)
    lo, hi = points.min(0), points.max(0)
    low = np.ceil(1 - lo)
    high = np.floor(np.array([width, height]) - 1 - hi)
    if np.any(high < low):
        return None
    for _ in range(PLACEMENT_TRIES):
        offset = np.array([rng.integers(low[0], high[0] + 1), rng.integers(low[1], high[1] + 1)])
        box = np.concatenate([lo + offset, hi - lo])
        if _boxes_apart(box, taken):
            return offset.astype(float)
    return None


def _sample_person(
    rng: np.random.Generator, scale: float, height: int, width: int
) -> Instance | None:
    """A stick figure placed in an empty image, or None when none fits."""
    for _ in range(PLACEMENT_TRIES):
        figure = _sample_figure(rng, rng.uniform(*PERSON_HEIGHT) * scale)
        polygons = _trace_silhouette(figure)
        offset = _place(rng, polygons, height, width, [])
        if offset is not None:
            figure = figure.shifted(*offset)
            return Instance(PERSON_ID, [_canonical(p + offset) for p in polygons], figure=figure)
    return None


def _sample_instances(
    rng: np.random.Generator, scale: float, height: int, width: int
) -> list[Instance]:
    """1-5 non-overlapping objects, a person among them with PERSON_PROBABILITY."""
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    instances = []
    if rng.random() < PERSON_PROBABILITY:
        person = _sample_person(rng, scale, height, width)
        if person is not None:
            instances.append(person)
    boxes = [inst.bbox for inst in instances]
    # A crowded image keeps fewer objects rather than letting them overlap.
    for _ in range(3 * MAX_OBJECTS):
        if len(instances) >= count:
            break
        name, color, vertices = _sample_shape(rng, scale)
        offset = _place(rng, [vertices], height, width, boxes)
        if offset is not None:
            instances.append(Instance(SHAPE_IDS[name], [_canonical(vertices + offset)], color))
            boxes.append(instances[-1].bbox)
    return instances


def instance_rle(instance: Instance, height: int, width: int) -> dict:
    """The instance's polygons as one COCO RLE: exactly the pixels COCO evaluation sees."""
    flat = [p.ravel().tolist() for p in instance.polygons]
    return mask_utils.merge(mask_utils.frPyObjects(flat, height, width))


def _background(rng: np.random.Generator, height: int, width: int) -> tuple[str, np.ndarray]:
    """(colour name, uint8[H, W, 3]) a muted colour with a slight linear gradient."""
    name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    base = np.array(BACKGROUNDS[name]) + rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = np.cos(angle) * xs / width + np.sin(angle) * ys / height
    ramp = BACKGROUND_GRADIENT * (ramp - ramp.mean())
    pixels = np.round(base[None, None, :] + ramp[:, :, None])
    return name, pixels.astype(np.uint8)


def _paint(pixels: np.ndarray, instance: Instance) -> None:
    """Paints one instance in place; nothing falls outside its polygon mask."""
    height, width = pixels.shape[:2]
    mask = mask_utils.decode(instance_rle(instance, height, width)).astype(bool)
    if instance.figure is None:
        pixels[mask] = COLORS[instance.color]
        return
    figure = instance.figure
    pixels[mask] = PERSON_COLORS["body"]
    left = np.zeros([height, width], np.uint8)
    _draw_figure(left, figure, np.zeros(2), 1.0, LEFT_LIMBS, with_body=False)
    pixels[mask & (left > 0)] = PERSON_COLORS["left"]
    radius = int(figure.head[2] >= 6)  # single-pixel dots on small figures
    for flag, color in ((2, "visible"), (1, "occluded")):
        dots = np.zeros([height, width], np.uint8)
        # Centred on the pixel that holds the keypoint, so the dot marks it exactly.
        for point in np.floor(figure.keypoints[figure.visibility == flag]).astype(int):
            cv2.circle(dots, point, radius, 255, -1, cv2.LINE_8)
        pixels[mask & (dots > 0)] = PERSON_COLORS[color]


def make_image(seed: int, split: str, index: int, image_size: int) -> ImageRecord:
    """Image `index` of `split`: a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    height, width = (int(round(s * image_size)) for s in rng.uniform(0.75, 1.0, 2))
    background, pixels = _background(rng, height, width)
    instances = _sample_instances(rng, image_size / 128, height, width)
    for instance in instances:
        _paint(pixels, instance)
    return ImageRecord(height, width, background, pixels, instances)


def _position(instance: Instance, height: int) -> str:
    """ "at the top", "in the middle" or "at the bottom": the third holding the box centre.

    Only vertical: captions must stay true under horizontal-flip augmentation.
    """
    _, y, _, h = instance.bbox
    third = min(2, int(3 * (y + h / 2) / height))
    return ("at the top", "in the middle", "at the bottom")[third]


def _shape_name(instance: Instance) -> str:
    return next(name for name, i in SHAPE_IDS.items() if i == instance.category_id)


def _describe(instance: Instance) -> str:
    if instance.figure is not None:
        return "a person"
    return f"a {instance.color} {_shape_name(instance)}"


def _counts(shapes: list[Instance], with_color: bool) -> str:
    """ "two red circles and a blue square": groups in category, then colour order."""
    colors = list(COLORS)
    groups = collections.Counter(
        (s.category_id, colors.index(s.color) if with_color else 0, _shape_name(s)) for s in shapes
    )
    phrases = []
    for (_, color, name), count in sorted(groups.items()):
        noun = f"{colors[color]} {name}" if with_color else name
        phrases.append(f"{NUMBER_WORDS[count]} {noun}{'s' if count > 1 else ''}")
    return " and ".join(phrases)


def captions(record: ImageRecord) -> list[str]:
    """Five phrasings of the same facts: contents by colour and kind, counts, background, place.

    All lowercase, without punctuation, from a vocabulary of about 40 words.

    Objects are listed in a fixed order (person, then shapes by category id,
    then colour) so each phrasing is a function of the image alone.
    """
    shapes = [inst for inst in record.instances if inst.figure is None]
    person = ["a person"] if len(shapes) < len(record.instances) else []
    contents = " and ".join(person + ([_counts(shapes, with_color=True)] if shapes else []))
    if shapes:
        verb = "is" if len(shapes) == 1 else "are"
        total = f"{NUMBER_WORDS[len(shapes)]} shape{'s' if len(shapes) > 1 else ''}"
        count_caption = " and ".join([f"there {verb} {total}"] + person)
        kind_caption = ("a person next to " if person else "") + _counts(shapes, with_color=False)
    else:
        count_caption = "there is a person and no shapes"
        kind_caption = "a person alone"
    size = (record.height, record.width)
    areas = [mask_utils.area(instance_rle(inst, *size)) for inst in record.instances]
    largest = record.instances[int(np.argmax(areas))]
    return [
        f"{contents} on a {record.background} background",
        f"a {record.background} picture with {contents}",
        count_caption,
        kind_caption,
        f"the largest object is {_describe(largest)} {_position(largest, record.height)}",
    ]


def _annotation(ann_id: int, image_id: int, instance: Instance, height: int, width: int) -> dict:
    """The instance's COCO annotation (without keypoints)."""
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": instance.category_id,
        "segmentation": [p.ravel().tolist() for p in instance.polygons],
        "area": float(mask_utils.area(instance_rle(instance, height, width))),
        "bbox": np.round(instance.bbox, 2).tolist(),
        "iscrowd": 0,
    }


def _keypoint_fields(figure: Figure) -> dict:
    """COCO `keypoints` [x, y, v] * 17 (x = y = 0 where v = 0) and `num_keypoints`."""
    points = np.round(figure.keypoints, 2) * (figure.visibility[:, None] > 0)
    flat = []
    for (x, y), v in zip(points.tolist(), figure.visibility.tolist(), strict=True):
        flat += [x, y, v]  # v stays an int, as in COCO files
    return {"keypoints": flat, "num_keypoints": int(np.sum(figure.visibility > 0))}


def _coco_header() -> dict:
    return {
        "info": {
            "description": "unified_seq synthetic shapes and figures",
            "version": str(GENERATOR_VERSION),
            "year": 2024,
            "contributor": "unified_seq",
            "date_created": "",
        },
        "licenses": [{"id": 1, "name": "generated, no restrictions", "url": ""}],
    }


def _write_json(path: str, content: dict) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(content, separators=(",", ":")))


def _write_png(path: str, pixels: np.ndarray) -> None:
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(png.getvalue())


def _write_split(out_dir: str, split: str, seed: int, count: int, first_id: int, size: int) -> None:
    """Renders `count` images of `split` and writes them and their three annotation files."""
    image_dir = os.path.join(out_dir, f"{split}2017")
    tf.io.gfile.makedirs(image_dir)
    images, instances, keypoints, caption_anns = [], [], [], []
    for index in range(count):
        record = make_image(seed, split, index, size)
        image_id = first_id + index
        file_name = f"{image_id:012d}.png"
        _write_png(os.path.join(image_dir, file_name), record.pixels)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": record.height,
                "width": record.width,
                "license": 1,
            }
        )
        # Annotation ids derive from the image id, so they are unique across splits.
        for k, instance in enumerate(record.instances):
            ann = _annotation(image_id * 100 + k, image_id, instance, record.height, record.width)
            instances.append(ann)
            if instance.figure is not None:
                keypoints.append({**ann, **_keypoint_fields(instance.figure)})
        for k, text in enumerate(captions(record)):
            caption_anns.append({"id": image_id * 100 + k, "image_id": image_id, "caption": text})
    ann_dir = os.path.join(out_dir, "annotations")
    tf.io.gfile.makedirs(ann_dir)
    header = _coco_header()
    files = {
        "instances": {"annotations": instances, "categories": CATEGORIES},
        "person_keypoints": {"annotations": keypoints, "categories": CATEGORIES[:1]},
        "captions": {"annotations": caption_anns},
    }
    for kind, body in files.items():
        content = {**header, "images": images, **body}
        _write_json(os.path.join(ann_dir, f"{kind}_{split}2017.json"), content)


def _params(seed: int, num_train: int, num_val: int, image_size: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
    }


def _is_complete(out_dir: str, params: dict) -> bool:
    """Whether out_dir's marker records exactly `params` (the marker is written last)."""
    try:
        with tf.io.gfile.GFile(os.path.join(out_dir, MARKER)) as f:
            return json.loads(f.read()) == params
    except (tf.errors.OpError, ValueError):
        return False


def generate(
    out_dir: str, *, seed: int = 0, num_train: int = 2000, num_val: int = 200, image_size: int = 128
) -> str:
    """Writes the data set in the COCO 2017 layout under out_dir and returns out_dir.

    Idempotent: returns at once when out_dir already holds a complete set made
    with the same parameters. Images are between 0.75 and 1 × image_size on
    each side. Other files already in out_dir are left alone.
    """
    params = _params(seed, num_train, num_val, image_size)
    if _is_complete(out_dir, params):
        return out_dir
    tf.io.gfile.makedirs(out_dir)
    marker = os.path.join(out_dir, MARKER)
    if tf.io.gfile.exists(marker):
        tf.io.gfile.remove(marker)  # a crash below must not leave a stale set looking complete
    logging.info("Writing synthetic COCO set %s to %s", params, out_dir)
    _write_split(out_dir, "train", seed, num_train, 1, image_size)
    _write_split(out_dir, "val", seed, num_val, num_train + 1, image_size)
    _write_json(marker, params)
    return out_dir


def ensure_synthetic(cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> str:
    """Returns the coco_dir of the synthetic set described by `cfg`, generating it if needed.

    cfg: config.data.synthetic (dir, seed, num_train, num_val, image_size).
    An empty cfg.dir means a cache folder named from the parameters under
    $UNIFIED_SEQ_CACHE (default ~/.cache/unified_seq). The set is built in a
    temporary sibling folder and moved into place, so processes racing on
    the same folder all end up reading one complete copy.
    """
    kwargs = {k: int(cfg[k]) for k in ("seed", "num_train", "num_val", "image_size")}
    params = _params(**kwargs)
    target = os.path.expanduser(str(cfg["dir"] or ""))
    if not target:
        name = "synthetic-g{generator_version}-s{seed}-n{num_train}-v{num_val}-px{image_size}"
        target = cache.cache_dir(name.format(**params))
    target = absolute_path(target)
    if _is_complete(target, params):
        return target
    if tf.io.gfile.isdir(target) and tf.io.gfile.listdir(target):
        # A folder of another set (or one the user filled): regenerate in place.
        return generate(target, **kwargs)
    parent, name = os.path.split(target)
    scratch = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        generate(scratch, **kwargs)
        _move_files(scratch, target)
    finally:
        if tf.io.gfile.isdir(scratch):
            tf.io.gfile.rmtree(scratch)
    return target


def _move_files(src: str, dst: str) -> None:
    """Moves the files under src to the same places under dst, the marker last.

    File by file, because renaming a folder is not supported by every
    tf.io.gfile file system (ram:// renames the folder entry alone). Each
    file's rename is atomic, and a set is a pure function of its parameters:
    a process that loses a race replaces the winner's files with the same
    bytes, and readers, who wait for the marker, see complete files only.
    """
    for folder, _, names in tf.io.gfile.walk(src):
        target = os.path.join(dst, folder[len(src) :].lstrip("/"))
        tf.io.gfile.makedirs(target)
        for name in names:
            if folder == src and name == MARKER:
                continue
            source = os.path.join(folder, name)
            tf.io.gfile.rename(source, os.path.join(target, name), overwrite=True)
    tf.io.gfile.rename(os.path.join(src, MARKER), os.path.join(dst, MARKER), overwrite=True)
