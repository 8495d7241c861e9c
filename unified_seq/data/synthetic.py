"""The embedded default data set: a small COCO-format world of shapes and stick figures.

`generate` writes it in the standard COCO 2017 layout, so the ordinary COCO JSON
loader reads it and every code path (non-contiguous category ids, polygons,
keypoints, captions, images of varying aspect) is exercised without a download:

    out_dir/annotations/instances_{train,val,tune}2017.json
    out_dir/annotations/person_keypoints_{train,val,tune}2017.json
    out_dir/annotations/captions_{train,val,tune}2017.json
    out_dir/{train,val,tune}2017/<image id>.png
    out_dir/synthetic.json           parameters; written last, marks the set complete

The `tune` split exists only with num_tune > 0: a third set of images, drawn
from its own random stream, for choosing a recipe (data.eval_split=tune)
without fitting the choice to the `val` images it is reported on.

Two worlds (`variety`), five captions per image in both:

plain (default) is simple enough for a tiny model to learn all four tasks in
minutes on a CPU: 0.75-1 x image_size per side, a plain muted background,
1-5 objects that never overlap (so every polygon is exactly the visible
instance), saturated shapes in four named colours, and at most one upright
stick figure whose 17 COCO keypoints are marked with dots. Every instance is
painted from the COCO rasterisation of the very polygon written to the JSON
(pycocotools, the same rasteriser the COCO evaluation uses), so annotation and
pixels agree exactly.

varied (`VariedWorld`) is what a recipe should survive before it meets
other simple scenes: a longer side of 160-400 px (x image_size / 128) at
aspect ratios 1:2 to 2:1; 0-10 objects (a few percent of images empty), up
to three persons; shapes from 8 px to half the shorter side; persons 25-90 %
of the image height, in varied poses (leaning, arms raised, knees bent, some
seen from behind, i.e. mirrored), without joint dots; noisy, striped,
checkered or spotted backgrounds; now and then a crowd region, several tiny
shapes annotated as one iscrowd=1 RLE, as COCO does. Objects may overlap
and leave the image in part: each is painted over the ones before it, and
its polygons are the visible part only (its outline minus the kept objects
above it, traced at TRACE_SCALE), its box that part's box. An object hidden
beyond VariedWorld.min_visible_* is not painted at all. Pixels are painted
from the written polygons where they show, so polygon and pixels agree up to
a pixel along occlusion edges (IoU >= VariedWorld.min_agreement, enforced).
Keypoints under a later object are occluded (v=1), outside the image
unlabelled (v=0).

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
# A split's index seeds its images, so a new split goes at the end.
SPLITS = ("train", "val", "tune")
VARIETIES = ("plain", "varied")

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
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                8: "eight", 9: "nine", 10: "ten"}  # fmt: skip
TEXTURES = ("noisy", "striped", "checkered", "spotted")
# Background channels stay within this range: objects are saturated colours
# far from any muted background tone, textured or not.
TEXTURE_RANGE = (40, 215)


@dataclasses.dataclass(frozen=True)
class VariedWorld:
    """The settings of `variety="varied"`: a harder world, for recipes meant to transfer.

    Pixel sizes are at image_size 128 and scale with image_size / 128, as in
    the plain world; fractions are of the image's own sides.
    """

    # COCO-like image shapes instead of near-squares around image_size.
    longer_side: tuple[float, float] = (160.0, 400.0)
    aspect: tuple[float, float] = (0.5, 2.0)  # width / height, drawn log-uniform
    # Shape diameters log-uniform from a few pixels to half the shorter side
    # (median ~30 px): small objects are where detectors fail first.
    min_shape: float = 8.0
    max_shape: float = 0.5
    person_height: tuple[float, float] = (0.25, 0.9)  # of the image height
    max_objects: int = 10
    person_counts: tuple[float, ...] = (0.45, 0.3, 0.15, 0.1)  # P(0, 1, 2, 3 persons)
    empty_probability: float = 0.04  # images without any object, as COCO has
    crowd_probability: float = 0.05  # images with one iscrowd=1 region
    crowd_members: tuple[int, int] = (6, 15)
    crowd_radius: tuple[float, float] = (10.0, 24.0)
    crowd_diameter: tuple[float, float] = (3.0, 6.0)
    # Share of an object's box that may leave the image (truncated objects).
    overhang: float = 0.25
    # A later object may hide at most this share of an earlier one's box.
    max_cover: float = 0.5
    # Instances hidden beyond this are not painted at all: an unannotated
    # sliver would teach the model to miss objects.
    min_visible_fraction: float = 0.3
    min_visible_pixels: float = 20.0
    # An instance whose polygon and painted pixels agree less (IoU) is left
    # out, so every annotation is a faithful target.
    min_agreement: float = 0.9
    mirrored_probability: float = 0.5  # figures seen from behind
    lean: float = 20.0  # degrees either way
    upper_arm: tuple[float, float] = (-20.0, 170.0)  # degrees from hanging, outwards
    elbow: tuple[float, float] = (-60.0, 100.0)
    thigh: tuple[float, float] = (-15.0, 50.0)
    knee: tuple[float, float] = (-60.0, 15.0)
    noise_sigma: tuple[float, float] = (2.0, 8.0)  # per-pixel Gaussian noise
    texture_amplitude: tuple[float, float] = (6.0, 16.0)
    texture_period: tuple[float, float] = (6.0, 32.0)  # stripes, checks, blotches (px)


VARIED = VariedWorld()


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

    polygons: list of float64[P, 2] (x, y) vertices in pixels, as written to the JSON
      (for a crowd region: its members' outlines, which are painted, not written).
    color: colour name for shapes, "" for a person.
    figure: the stick figure of a person, None for shapes.
    iscrowd: a crowd region (COCO iscrowd=1), written as `mask`'s RLE.
    mask: bool[H, W] the crowd region's visible pixels; None for other instances.
    """

    category_id: int
    polygons: list[np.ndarray]
    color: str = ""
    figure: Figure | None = None
    iscrowd: bool = False
    mask: np.ndarray | None = None

    @property
    def bbox(self) -> np.ndarray:
        """float64[4] COCO box (x, y, width, height): the polygons' (or mask's) extent."""
        if self.mask is not None:
            return mask_utils.toBbox(_encode(self.mask)).astype(np.float64)
        points = np.concatenate(self.polygons)
        lo, hi = points.min(0), points.max(0)
        return np.concatenate([lo, hi - lo])


@dataclasses.dataclass
class ImageRecord:
    """One generated image: its size, background and instances.

    texture: the varied world's background texture (TEXTURES); "" when plain.
    owner: int16[H, W] the index in `instances` of the instance painted at
      each pixel, -1 for background (varied world; None when plain).
    """

    height: int
    width: int
    background: str
    pixels: np.ndarray  # uint8[H, W, 3]
    instances: list[Instance]
    variety: str = "plain"
    texture: str = ""
    owner: np.ndarray | None = None


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
    return _trace(canvas, lo)


def _trace(canvas: np.ndarray, lo: np.ndarray, min_area: float = 0.0) -> list[np.ndarray]:
    """Outline of a TRACE_SCALE-supersampled uint8 mask whose pixel (0, 0) starts at image
    point `lo`, as polygons float64[P, 2] (x, y) in image pixels, ≤ MAX_PERSON_POINTS points
    in all. Polygons enclosing less than `min_area` square pixels are left out.
    """
    # Contour points are centres of boundary pixels, half a (fine) pixel inside
    # the edge, and polygon chords cut convex bends: growing the mask by one
    # fine pixel balances both (IoU with the figure ~0.97 instead of ~0.95).
    canvas = cv2.dilate(canvas, cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3)))
    contours, _ = cv2.findContours(canvas, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if min_area > 0:
        # Slivers along an occluder's edge would cost points and match no pixel.
        contours = [c for c in contours if cv2.contourArea(c) >= min_area * TRACE_SCALE**2]
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


def _encode(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def instance_rle(instance: Instance, height: int, width: int) -> dict:
    """The instance's polygons (a crowd's mask) as one COCO RLE: the pixels COCO evaluation sees."""
    if instance.mask is not None:
        return _encode(instance.mask)
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


def make_image(
    seed: int, split: str, index: int, image_size: int, variety: str = "plain"
) -> ImageRecord:
    """Image `index` of `split` (SPLITS) in world `variety` (VARIETIES): a pure function of
    its arguments."""
    _check_variety(variety)
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    if variety == "varied":
        return _make_varied(rng, image_size, VARIED)
    height, width = (int(round(s * image_size)) for s in rng.uniform(0.75, 1.0, 2))
    background, pixels = _background(rng, height, width)
    instances = _sample_instances(rng, image_size / 128, height, width)
    for instance in instances:
        _paint(pixels, instance)
    return ImageRecord(height, width, background, pixels, instances)


def _check_variety(variety: str) -> None:
    if variety not in VARIETIES:
        raise ValueError(f"synthetic variety={variety!r}; choose one of {VARIETIES}")


# ---------------------------------------------------------------------------
# The varied world: free sizes and aspects, overlapping objects of many
# scales, posed figures without joint dots, textured backgrounds, crowds.


def _varied_size(rng: np.random.Generator, scale: float, world: VariedWorld) -> tuple[int, int]:
    """(height, width): the longer side uniform in world.longer_side, log-uniform aspect."""
    longer = rng.uniform(*world.longer_side) * scale
    aspect = np.exp(rng.uniform(*np.log(world.aspect)))
    if aspect >= 1:
        height, width = longer / aspect, longer
    else:
        height, width = longer, longer * aspect
    return int(round(height)), int(round(width))


def _textured_background(
    rng: np.random.Generator, height: int, width: int, world: VariedWorld
) -> tuple[str, str, np.ndarray]:
    """(colour name, texture name, uint8[H, W, 3]): a muted colour under a grey-level texture.

    The texture changes brightness only, so the colour name stays true and
    backgrounds stay unsaturated, unlike every object.
    """
    name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    base = np.array(BACKGROUNDS[name]) + rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, 3)
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    amplitude = rng.uniform(*world.texture_amplitude)
    period = rng.uniform(*world.texture_period)
    angle = rng.uniform(0, 2 * np.pi)
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    along = np.cos(angle) * xs + np.sin(angle) * ys
    across = np.cos(angle) * ys - np.sin(angle) * xs
    if texture == "striped":
        level = amplitude * np.sign(np.sin(np.pi * along / period))
    elif texture == "checkered":
        level = amplitude * (2 * ((np.floor(along / period) + np.floor(across / period)) % 2) - 1)
    elif texture == "spotted":
        grid = rng.normal(size=(int(height / period) + 2, int(width / period) + 2))
        level = amplitude * cv2.resize(grid.astype(np.float32), (width, height), cv2.INTER_CUBIC)
    else:
        level = np.float32(0)
    ramp = np.cos(angle) * xs / width + np.sin(angle) * ys / height
    level = level + BACKGROUND_GRADIENT * (ramp - ramp.mean())
    sigma = rng.uniform(*world.noise_sigma)
    level = level + sigma * rng.standard_normal((height, width), np.float32)
    pixels = np.clip(np.round(base.astype(np.float32) + level[:, :, None]), *TEXTURE_RANGE)
    return name, texture, pixels.astype(np.uint8)


def _sample_pose(rng: np.random.Generator, height: float, world: VariedWorld) -> Figure:
    """A stick figure in a random pose, head top near y=0: leaning torso, raised or bent
    arms, bent knees; seen from the front (its left on the image's right) or, mirrored,
    from behind, where the face's keypoints are occluded (v=1).
    """
    kp = np.zeros([17, 2])
    r = 0.1 * height * rng.uniform(0.9, 1.1)
    down = np.array([0.0, 1.0])
    torso = _rotate(down, rng.uniform(-world.lean, world.lean))  # hips → below
    side_axis = np.array([torso[1], -torso[0]])  # the figure's left, facing the viewer
    hip_y = height * rng.uniform(0.53, 0.57)
    hips = np.array([0.0, hip_y])
    shoulders = hips - (hip_y - 2 * r - 0.05 * height) * torso
    head = shoulders - (0.05 * height + r) * torso
    kp[0] = head + 0.15 * r * torso
    kp[1:3] = [
        head + 0.4 * r * side_axis - 0.2 * r * torso,
        head - 0.4 * r * side_axis - 0.2 * r * torso,
    ]
    kp[3:5] = [head + 0.8 * r * side_axis, head - 0.8 * r * side_axis]
    shoulder_x = height * rng.uniform(0.11, 0.15)
    hip_x = height * rng.uniform(0.06, 0.09)
    for side, (s, e, w, h, k, a) in ((1, (5, 7, 9, 11, 13, 15)), (-1, (6, 8, 10, 12, 14, 16))):
        kp[s] = shoulders + side * shoulder_x * side_axis
        kp[h] = hips + side * hip_x * np.array([1.0, 0.0])
        upper = rng.uniform(*world.upper_arm)
        lower = upper + rng.uniform(*world.elbow)
        kp[e] = kp[s] + 0.17 * height * _rotate(torso, side * upper)
        kp[w] = kp[e] + 0.16 * height * _rotate(torso, side * lower)
        thigh = rng.uniform(*world.thigh)
        shin = thigh + rng.uniform(*world.knee)
        kp[k] = kp[h] + 0.22 * height * _rotate(down, side * thigh)
        kp[a] = kp[k] + 0.22 * height * _rotate(down, side * shin)
    visibility = np.full(17, 2)
    head_disc = np.array([head[0], head[1], r])
    if rng.random() < world.mirrored_probability:
        kp[:, 0] *= -1
        head_disc[0] *= -1
        visibility[:3] = 1  # nose and eyes face away
    kp -= [0.0, head_disc[1] - r]  # head top at y=0
    head_disc[1] = r
    return Figure(np.round(kp, 2), visibility, np.round(head_disc, 2), max(3.0, 0.075 * height))


def _box_overlap(a: np.ndarray, b: np.ndarray, gap: float = 0.0) -> float:
    """Area shared by COCO boxes a and b, each grown by `gap` on every side."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]) + 2 * gap
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]) + 2 * gap
    return max(w, 0.0) * max(h, 0.0)


def _inside(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether box a lies within box b."""
    return (
        b[0] <= a[0] and b[1] <= a[1] and a[0] + a[2] <= b[0] + b[2] and a[1] + a[3] <= b[1] + b[3]
    )


def _fits(box: np.ndarray, is_person: bool, below: list[Instance], world: VariedWorld) -> bool:
    """Whether an object with `box` may go on top of the instances `below`.

    It may hide part of each, but not most of one, nor sit within one's box
    (its visible part would have a hole, which COCO polygons cannot hold);
    persons never overlap persons (their equal colours would merge them).
    """
    for other in below:
        other_box = other.bbox
        shared = _box_overlap(box, other_box)
        if shared > world.max_cover * other_box[2] * other_box[3] or _inside(box, other_box):
            return False
        if is_person and other.figure is not None and _box_overlap(box, other_box, MIN_GAP) > 0:
            return False
    return True


def _place_varied(
    rng: np.random.Generator,
    polygons: list[np.ndarray],
    height: int,
    width: int,
    is_person: bool,
    below: list[Instance],
    world: VariedWorld,
) -> np.ndarray | None:
    """A whole-pixel (dx, dy) for `polygons` (at most world.overhang of the box outside the
    image, see `_fits`), or None."""
    points = np.concatenate(polygons)
    lo, hi = points.min(0), points.max(0)
    slack = world.overhang * (hi - lo)
    low = np.ceil(-lo - slack)
    high = np.floor(np.array([width, height]) - hi + slack)
    if np.any(high < low):
        return None
    for _ in range(PLACEMENT_TRIES):
        offset = np.array([rng.integers(low[0], high[0] + 1), rng.integers(low[1], high[1] + 1)])
        if _fits(np.concatenate([lo + offset, hi - lo]), is_person, below, world):
            return offset.astype(float)
    return None


def _free_color(rng: np.random.Generator, box: np.ndarray, below: list[Instance]) -> str:
    """A colour no touching shape has, so neighbours never merge into one blob (when one is
    left)."""
    taken = {o.color for o in below if o.figure is None and _box_overlap(box, o.bbox, MIN_GAP) > 0}
    free = [c for c in COLORS if c not in taken] or list(COLORS)
    return free[rng.integers(len(free))]


def _sample_crowd(
    rng: np.random.Generator, scale: float, height: int, width: int, world: VariedWorld
) -> Instance:
    """A crowd region: several tiny shapes of one kind and colour, close together."""
    name = list(SHAPE_IDS)[rng.integers(len(SHAPE_IDS))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    radius = rng.uniform(*world.crowd_radius) * scale
    margin = radius + world.crowd_diameter[1] * scale
    center = rng.uniform(
        [margin, margin], [max(margin, width - margin), max(margin, height - margin)]
    )
    vertices = {"circle": CIRCLE_VERTICES, "square": 4, "triangle": 3}[name]
    members = []
    for _ in range(rng.integers(world.crowd_members[0], world.crowd_members[1] + 1)):
        angle, distance = rng.uniform(0, 2 * np.pi), radius * np.sqrt(rng.random())
        position = center + distance * np.array([np.cos(angle), np.sin(angle)])
        size = rng.uniform(*world.crowd_diameter) * scale / 2
        members.append(np.round(_regular_polygon(rng, vertices, size) + position, 2))
    return Instance(SHAPE_IDS[name], members, color, iscrowd=True)


def _sample_layers(
    rng: np.random.Generator, scale: float, height: int, width: int, world: VariedWorld
) -> list[Instance]:
    """Whole objects in painting order (a crowd region first): each may hide part of those
    before it. Objects that find no place are left out."""
    if rng.random() < world.empty_probability:
        return []
    layers = []
    if rng.random() < world.crowd_probability:
        layers.append(_sample_crowd(rng, scale, height, width, world))
    count = int(rng.integers(1, world.max_objects + 1))
    persons = min(count, int(rng.choice(len(world.person_counts), p=world.person_counts)))
    shorter = min(height, width)
    for is_person in rng.permutation([True] * persons + [False] * (count - persons)):
        if is_person:
            figure = _sample_pose(rng, rng.uniform(*world.person_height) * height, world)
            polygons = _trace_silhouette(figure)
        else:
            name = list(SHAPE_IDS)[rng.integers(len(SHAPE_IDS))]
            diameter = np.exp(
                rng.uniform(np.log(world.min_shape * scale), np.log(world.max_shape * shorter))
            )
            vertices = {"circle": CIRCLE_VERTICES, "square": 4, "triangle": 3}[name]
            polygons = [_regular_polygon(rng, vertices, diameter / 2)]
        offset = _place_varied(rng, polygons, height, width, bool(is_person), layers, world)
        if offset is None:
            continue
        polygons = [_canonical(p + offset) for p in polygons]
        if is_person:
            layers.append(Instance(PERSON_ID, polygons, figure=figure.shifted(*offset)))
        else:
            color = _free_color(rng, Instance(0, polygons).bbox, layers)
            layers.append(Instance(SHAPE_IDS[name], polygons, color))
    return layers


def _polygon_area(polygons: list[np.ndarray]) -> float:
    """Square pixels enclosed by the polygons (shoelace; overlaps counted twice)."""
    total = 0.0
    for p in polygons:
        x, y = p[:, 0], p[:, 1]
        total += abs(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)) / 2
    return total


def _fill(polygons: list[np.ndarray], origin: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """bool[shape]: the polygons at TRACE_SCALE, fine pixel (0, 0) starting at image point
    `origin`."""
    canvas = np.zeros(shape, np.uint8)
    for p in polygons:  # one by one: cv2 would cancel where polygons of one call overlap
        cv2.fillPoly(canvas, [_cv_points(p, origin, TRACE_SCALE)], 255, cv2.LINE_8, CV_SHIFT)
    return canvas > 0


def _raster(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """bool[H, W]: the polygons as COCO evaluation rasterises them."""
    rles = mask_utils.frPyObjects([p.ravel().tolist() for p in polygons], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _resolve(
    layers: list[Instance], height: int, width: int, world: VariedWorld, dropped: set[int]
) -> dict[int, Instance]:
    """Layer index → the visible part of each layer kept, its polygons traced where hidden.

    Goes from the top layer down, at TRACE_SCALE, so each layer's visible
    part is its outline minus the layers above it that are kept; a layer
    hidden beyond world.min_visible_* (or in `dropped`) is left out and hides
    nothing. Keypoints under a kept layer above become occluded (v=1), those
    outside the image unlabelled (v=0).
    """
    s = TRACE_SCALE
    covered = np.zeros([height * s, width * s], bool)  # by the kept layers above
    size = np.array([width, height])
    kept = {}
    for k in reversed(range(len(layers))):
        layer = layers[k]
        points = np.concatenate(layer.polygons)
        lo = np.clip(np.floor(points.min(0)), 0, size).astype(int)
        hi = np.clip(np.ceil(points.max(0)), 0, size).astype(int)
        if k in dropped or np.any(hi <= lo):
            continue
        window = (slice(lo[1] * s, hi[1] * s), slice(lo[0] * s, hi[0] * s))
        fine = _fill(
            layer.polygons, lo.astype(float), (int(hi[1] - lo[1]) * s, int(hi[0] - lo[0]) * s)
        )
        above = covered[window]
        visible = fine & ~above
        area = np.count_nonzero(visible) / s**2
        if area < world.min_visible_pixels:
            continue
        if area < world.min_visible_fraction * _polygon_area(layer.polygons):
            continue
        whole = np.all(points >= 0) and np.all(points <= size) and not np.any(fine & above)
        polygons = layer.polygons
        if not (whole or layer.iscrowd):
            traced = _trace(visible.astype(np.uint8) * 255, lo.astype(float), min_area=1.0)
            polygons = [_canonical(p) for p in traced]
            if not polygons:
                continue
        figure = layer.figure
        if figure is not None:
            visibility = figure.visibility.copy()
            x, y = figure.keypoints.T
            outside = (x < 0) | (y < 0) | (x >= width) | (y >= height)
            rows = np.clip((y * s).astype(int), 0, height * s - 1)
            cols = np.clip((x * s).astype(int), 0, width * s - 1)
            visibility[~outside & covered[rows, cols]] = 1
            visibility[outside] = 0
            figure = dataclasses.replace(figure, visibility=visibility)
        covered[window] |= fine
        kept[k] = dataclasses.replace(layer, polygons=polygons, figure=figure)
    return kept


def _compose(
    layers: list[Instance], height: int, width: int, world: VariedWorld
) -> tuple[list[Instance], np.ndarray]:
    """The instances kept, bottom first, and int16[H, W] the index of the one at each pixel.

    Pixels go, bottom layer first, to each layer's whole outline (what a
    painter would show), then to the rasterised visible polygons, so pixels
    and annotation agree except along occlusion edges where traced polygons
    overlap or leave a gap (sub-pixel tracing error, rounded to pixels).
    A layer whose polygon agrees with its pixels less than world.min_agreement
    (a thin sliver) is left out and the rest composed again.
    """
    dropped: set[int] = set()
    while True:
        kept = _resolve(layers, height, width, world, dropped)
        owner = np.full([height, width], -1, np.int16)
        for k in sorted(kept):
            owner[_raster(layers[k].polygons, height, width)] = k
        visible = {}
        for k in sorted(kept):
            if not kept[k].iscrowd:
                visible[k] = _raster(kept[k].polygons, height, width)
                owner[visible[k]] = k
        worst, worst_iou = None, world.min_agreement
        for k in kept:
            mine = owner == k
            if k in visible:
                union = np.count_nonzero(mine | visible[k])
                iou = np.count_nonzero(mine & visible[k]) / max(1, union)
            else:  # the crowd: written as exactly its pixels, but it must stay a region
                iou = 1.0 if np.count_nonzero(mine) >= world.min_visible_pixels else 0.0
            if iou < worst_iou:
                worst, worst_iou = k, iou
        if worst is None:
            break
        dropped.add(worst)
    order = sorted(kept)
    instances = []
    remap = np.full(len(layers) + 1, -1, np.int16)  # owner -1 → index -1
    for i, k in enumerate(order):
        remap[k] = i
        inst = kept[k]
        instances.append(dataclasses.replace(inst, mask=owner == k) if inst.iscrowd else inst)
    return instances, remap[owner]


def _paint_owned(pixels: np.ndarray, owner: np.ndarray, instances: list[Instance]) -> None:
    """Paints each instance on the pixels it owns: flat colours, no keypoint dots."""
    height, width = owner.shape
    for k, inst in enumerate(instances):
        mine = owner == k
        if inst.figure is None:
            pixels[mine] = COLORS[inst.color]
            continue
        pixels[mine] = PERSON_COLORS["body"]
        left = np.zeros([height, width], np.uint8)
        _draw_figure(left, inst.figure, np.zeros(2), 1.0, LEFT_LIMBS, with_body=False)
        pixels[mine & (left > 0)] = PERSON_COLORS["left"]


def _make_varied(rng: np.random.Generator, image_size: int, world: VariedWorld) -> ImageRecord:
    scale = image_size / 128
    height, width = _varied_size(rng, scale, world)
    background, texture, pixels = _textured_background(rng, height, width, world)
    layers = _sample_layers(rng, scale, height, width, world)
    instances, owner = _compose(layers, height, width, world)
    _paint_owned(pixels, owner, instances)
    return ImageRecord(height, width, background, pixels, instances, "varied", texture, owner)


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
    if record.variety == "varied":
        return _varied_captions(record)
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


def _varied_captions(record: ImageRecord) -> list[str]:
    """`captions` for the varied world: also several persons, up to ten shapes, a crowd
    region ("a group of small red circles"), the background's texture, empty images.

    Only the instances kept (and so painted) are named. With more than three
    colour groups the listing gives kinds only, which keeps captions short.
    """
    objects = [inst for inst in record.instances if not inst.iscrowd]
    shapes = [inst for inst in objects if inst.figure is None]
    crowds = [inst for inst in record.instances if inst.iscrowd]
    background = f"{record.texture} {record.background}"
    if not objects and not crowds:
        return [
            f"an empty {background} background",
            f"a {background} picture with no objects",
            "there are no objects",
            f"nothing but a {background} background",
            "no shapes and no people",
        ]
    num_people = len(objects) - len(shapes)
    people = (
        []
        if not num_people
        else ["a person" if num_people == 1 else f"{NUMBER_WORDS[num_people]} people"]
    )
    group = [f"a group of small {c.color} {_shape_name(c)}s" for c in crowds]
    colour_groups = len({(s.category_id, s.color) for s in shapes})
    listed = [_counts(shapes, with_color=colour_groups <= 3)] if shapes else []
    contents = " and ".join(people + listed + group)
    if shapes:
        verb = "is" if len(shapes) == 1 else "are"
        total = f"{NUMBER_WORDS[len(shapes)]} shape{'s' if len(shapes) > 1 else ''}"
        count_caption = " and ".join([f"there {verb} {total}"] + people + group)
        kind_caption = (f"{people[0]} next to " if people else "") + _counts(
            shapes, with_color=False
        )
    elif people:
        verb = "is" if num_people == 1 else "are"
        count_caption = " and ".join([f"there {verb} {people[0]} and no shapes"] + group)
        kind_caption = f"{people[0]} alone"
    else:
        count_caption = "there are no shapes but " + group[0]
        kind_caption = f"only {group[0]}"
    if objects:
        size = (record.height, record.width)
        areas = [mask_utils.area(instance_rle(inst, *size)) for inst in objects]
        largest = objects[int(np.argmax(areas))]
        where = f"the largest object is {_describe(largest)} {_position(largest, record.height)}"
    else:
        where = f"{group[0]} {_position(crowds[0], record.height)}"
    return [
        f"{contents} on a {background} background",
        f"a {background} picture with {contents}",
        count_caption,
        kind_caption,
        where,
    ]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of bool[H, W], as COCO writes crowd regions: run lengths of
    the column-major pixels, starting with a run of 0s."""
    flat = np.asarray(mask, bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"counts": counts, "size": list(mask.shape)}


def _annotation(ann_id: int, image_id: int, instance: Instance, height: int, width: int) -> dict:
    """The instance's COCO annotation (without keypoints)."""
    if instance.iscrowd:
        return {
            "id": ann_id,
            "image_id": image_id,
            "category_id": instance.category_id,
            "segmentation": _uncompressed_rle(instance.mask),
            "area": float(np.count_nonzero(instance.mask)),
            "bbox": np.round(instance.bbox, 2).tolist(),
            "iscrowd": 1,
        }
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


def _write_png(path: str, pixels: np.ndarray, compress_level: int | None = None) -> None:
    png = io.BytesIO()
    options = {} if compress_level is None else {"compress_level": compress_level}
    Image.fromarray(pixels).save(png, format="PNG", **options)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(png.getvalue())


def _write_split(
    out_dir: str,
    split: str,
    seed: int,
    count: int,
    first_id: int,
    size: int,
    variety: str = "plain",
) -> None:
    """Renders `count` images of `split` and writes them and their three annotation files."""
    image_dir = os.path.join(out_dir, f"{split}2017")
    tf.io.gfile.makedirs(image_dir)
    images, instances, keypoints, caption_anns = [], [], [], []
    for index in range(count):
        record = make_image(seed, split, index, size, variety)
        image_id = first_id + index
        file_name = f"{image_id:012d}.png"
        # Noisy backgrounds barely compress: the fastest level writes them 4x
        # faster at the same size. The plain world keeps PIL's default (its bytes).
        level = 1 if variety == "varied" else None
        _write_png(os.path.join(image_dir, file_name), record.pixels, level)
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


def _params(
    seed: int,
    num_train: int,
    num_val: int,
    image_size: int,
    num_tune: int = 0,
    variety: str = "plain",
) -> dict:
    params = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
    }
    # Named only when not the defaults, so the markers (and cache folders) of
    # sets made before these options existed stay valid.
    if num_tune:
        params["num_tune"] = num_tune
    if variety != "plain":
        params["variety"] = variety
    return params


def _is_complete(out_dir: str, params: dict) -> bool:
    """Whether out_dir's marker records exactly `params` (the marker is written last)."""
    try:
        with tf.io.gfile.GFile(os.path.join(out_dir, MARKER)) as f:
            return json.loads(f.read()) == params
    except (tf.errors.OpError, ValueError):
        return False


def generate(
    out_dir: str,
    *,
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 200,
    image_size: int = 128,
    num_tune: int = 0,
    variety: str = "plain",
) -> str:
    """Writes the data set in the COCO 2017 layout under out_dir and returns out_dir.

    Idempotent: returns at once when out_dir already holds a complete set made
    with the same parameters. Plain images are between 0.75 and 1 × image_size
    on each side; varied ones have a longer side of 160-400 × image_size / 128.
    num_tune > 0 adds the `tune` split (image ids after val's). Other files
    already in out_dir are left alone.
    """
    _check_variety(variety)
    params = _params(seed, num_train, num_val, image_size, num_tune, variety)
    if _is_complete(out_dir, params):
        return out_dir
    tf.io.gfile.makedirs(out_dir)
    marker = os.path.join(out_dir, MARKER)
    if tf.io.gfile.exists(marker):
        tf.io.gfile.remove(marker)  # a crash below must not leave a stale set looking complete
    logging.info("Writing synthetic COCO set %s to %s", params, out_dir)
    _write_split(out_dir, "train", seed, num_train, 1, image_size, variety)
    _write_split(out_dir, "val", seed, num_val, num_train + 1, image_size, variety)
    if num_tune:
        first = num_train + num_val + 1
        _write_split(out_dir, "tune", seed, num_tune, first, image_size, variety)
    _write_json(marker, params)
    return out_dir


def ensure_synthetic(cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> str:
    """Returns the coco_dir of the synthetic set described by `cfg`, generating it if needed.

    cfg: config.data.synthetic (dir, seed, num_train, num_val, image_size, and
    optionally num_tune, variety).
    An empty cfg.dir means a cache folder named from the parameters under
    $UNIFIED_SEQ_CACHE (default ~/.cache/unified_seq). The set is built in a
    temporary sibling folder and moved into place, so processes racing on
    the same folder all end up reading one complete copy.
    """
    kwargs = {k: int(cfg[k]) for k in ("seed", "num_train", "num_val", "image_size")}
    kwargs["num_tune"] = int(cfg.get("num_tune", 0))
    kwargs["variety"] = str(cfg.get("variety", "plain"))
    _check_variety(kwargs["variety"])
    params = _params(**kwargs)
    target = os.path.expanduser(str(cfg["dir"] or ""))
    if not target:
        name = "synthetic-g{generator_version}-s{seed}-n{num_train}-v{num_val}-px{image_size}"
        name = name.format(**params)
        # Suffixes only off the defaults: the plain set keeps its folder name.
        if kwargs["num_tune"]:
            name += f"-t{kwargs['num_tune']}"
        if kwargs["variety"] != "plain":
            name += f"-{kwargs['variety']}"
        target = cache.cache_dir(name)
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
