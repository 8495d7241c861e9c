"""COCO-format JSON files → examples (unified_seq/data/example.py) → tf.data.

`load_coco_json` reads the standard COCO 2017 layout (DESIGN §7):

    ROOT/annotations/{instances,person_keypoints,captions}_{split}2017.json
    ROOT/{split}2017/<file_name>

Any subset of the three files may exist (at least one); they are joined by
image id, and keypoints are joined to instances by annotation id. A problem
in the files is a DataError naming the file, the annotation and the field, or,
where the rest of the data stays usable, a counted skip (the table in
`load_coco_json`). `examples_to_dataset` turns the examples into the TF example layout
that the pipelines consume, the same layout `tfds_source.load_tfds` yields:

    image/id           int64[]
    image/filename     string[]
    image/encoded      string[]
    image/size         int32[2]            (height, width)
    objects/id         int64[N]
    objects/bbox       float32[N, 4]       ymin, xmin, ymax, xmax pixels
    objects/class      int32[N]
    objects/is_crowd   bool[N]
    objects/area       float32[N]
    objects/polygons   float32 RaggedTensor [N, None, 2]  (y, x) pixels, NaN rows
                       separate the polygons of one instance
    objects/keypoints  float32[N, K, 3]    (y, x, v)
    captions           string[C]

Everything is a dense tensor except `objects/polygons`, the one key with two
variable lengths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import posixpath
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import tensorflow as tf
from absl import logging
from pycocotools import mask as mask_utils

from unified_seq.data import example as example_lib
from unified_seq.data.categories import CategoryMap, check_categories
from unified_seq.data.errors import DataError
from unified_seq.vocab import TokenSpace

KINDS = ("instances", "person_keypoints", "captions")
REQUIRED_KEYS = {
    "instances": ("images", "annotations", "categories"),
    "person_keypoints": ("images", "annotations", "categories"),
    "captions": ("images", "annotations"),
}
BAD_IMAGE_POLICIES = ("fail", "skip")
# Polygons traced from RLE masks are simplified when an instance has more
# points than the segmentation codec writes (DESIGN §3: at most 128).
MAX_POLYGON_POINTS = 128
SIMPLIFY_TOLERANCE = 1.0  # pixels
_NAN_ROW = np.full([1, 2], np.nan, np.float32)
_READ_BYTES = 1 << 24
# Annotation files larger than this are refused unread (data.max_annotation_bytes):
# COCO train's largest is 0.45 GB, and parsing costs about ten times the size.
DEFAULT_MAX_ANNOTATION_BYTES = 4 << 30
# Where the image ids of a file are read from first (see _listed_image_ids).
_PREFIX_BYTES = 1 << 24
# What the object hook leaves in place of another process's annotation.
_DROPPED = object()


@dataclasses.dataclass(frozen=True)
class _Image:
    """What the loader keeps of an `images` entry."""

    file_name: str
    height: int
    width: int
    listed_in: str  # the first annotation file that lists it


def annotation_path(coco_dir: str, kind: str, split: str) -> str:
    """ROOT/annotations/{kind}_{split}2017.json."""
    return os.path.join(coco_dir, "annotations", f"{kind}_{split}2017.json")


def image_dir(coco_dir: str, split: str) -> str:
    """ROOT/{split}2017, the folder of the split's images."""
    return os.path.join(coco_dir, f"{split}2017")


def absolute_path(path: str) -> str:
    """A local path made absolute and normalised (as `os.path.abspath`); URLs as they are."""
    if "://" in path:
        return path
    return os.path.normpath(os.path.join(os.getcwd(), path))


@contextlib.contextmanager
def _gc_paused():
    """Pauses the cyclic garbage collector while annotation files are parsed and read.

    COCO train parses into tens of millions of objects, none of them garbage;
    the collections their count triggers almost double the parse time.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_text(path: str) -> str:
    """A JSON file's text, decoded as json.loads decodes bytes.

    Read in pieces: one GFile.read of the whole file holds about three times
    its size at once (COCO train's instances: 1.4 GB for 0.48 GB).
    """
    data = bytearray()
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            data += chunk
    return data.decode(json.detect_encoding(data), "surrogatepass")


def _read_json(path: str, object_hook: Callable[[dict], Any] | None = None) -> dict:
    """Parses one annotation file; DataError on unreadable or invalid JSON."""
    try:
        text = _read_text(path)
        with _gc_paused():
            content = json.loads(text, object_hook=object_hook)
    except json.JSONDecodeError as e:
        raise DataError(
            path,
            f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}",
            "the file is damaged or truncated; download or generate it again",
        ) from e
    except (tf.errors.OpError, OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot be read ({e})", "check the file and its permissions") from e
    if not isinstance(content, dict):
        raise DataError(path, "top level is not a JSON object", "expected a COCO annotation file")
    return content


def _annotation_files(coco_dir: str, split: str, kinds: Sequence[str]) -> dict[str, str]:
    """kind → path of the split's annotation files that exist (at least one)."""
    paths = {kind: annotation_path(coco_dir, kind, split) for kind in kinds}
    present = {kind: p for kind, p in paths.items() if tf.io.gfile.exists(p)}
    if not present:
        raise DataError(
            os.path.join(coco_dir, "annotations"),
            f"no annotation file for split {split!r}; expected at least one of "
            + ", ".join(paths.values()),
            "point data.coco_dir at a folder in the COCO 2017 layout",
        )
    return present


def _check_sizes(paths: dict[str, str], limit: int) -> None:
    """DataError for an annotation file over `limit` bytes (0: no limit), before it is read."""
    if not limit:
        return
    for path in paths.values():
        size = tf.io.gfile.stat(path).length
        if size > limit:
            raise DataError(
                path,
                f"annotation file is {size:,} bytes, more than data.max_annotation_bytes={limit:,}",
                "raise --config.data.max_annotation_bytes (0 = no limit) if the file is right",
            )


def _check_layout(path: str, kind: str, content: dict) -> None:
    for key in REQUIRED_KEYS[kind]:
        if key not in content:
            raise DataError(path, f"missing top-level key {key!r}", "see the COCO format")
        if not isinstance(content[key], list):
            raise DataError(path, f"{key!r} must be a list", "see the COCO format")


class _StopParsingError(Exception):
    """Raised by `_listed_image_ids`'s hook at a file's first annotation: not an error."""


def _listed_image_ids(path: str) -> list[Any]:
    """The ids in one annotation file's `images`, read without parsing its annotations if it can.

    COCO files list `images` before `annotations`, so growing prefixes of the
    file are parsed until the first annotation, which stops the parse: a few
    percent of the file. A file in another order is parsed whole, each
    annotation dropped as soon as it is parsed.
    """
    ids = []

    def collect(obj: dict) -> dict:
        if "file_name" in obj:
            ids.append(obj.get("id"))
        return obj

    def until_annotations(obj: dict) -> dict:
        if "image_id" in obj:
            raise _StopParsingError
        return collect(obj)

    with tf.io.gfile.GFile(path, "rb") as f:
        head = f.read(_PREFIX_BYTES)
        while True:
            ids.clear()
            try:
                with _gc_paused():
                    json.loads(head.decode("utf-8-sig", "ignore"), object_hook=until_annotations)
            except _StopParsingError:
                if ids:
                    return ids
                break  # annotations before images
            except json.JSONDecodeError:
                more = f.read(len(head))
                if more:
                    head += more
                    continue
                break  # damaged: the full parse below reports it
            return ids  # a file without annotations
    ids.clear()
    _read_json(path, lambda obj: _DROPPED if "image_id" in obj else collect(obj))
    return ids


def _process_shard(
    paths: dict[str, str], process_index: int, process_count: int
) -> tuple[frozenset, frozenset] | None:
    """(image ids kept, image ids left to other processes): the sorted ids [index::count]."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    if process_count == 1:
        return None
    listed = set()
    for path in paths.values():
        listed.update(i for i in _listed_image_ids(path) if _is_int(i))
    kept = frozenset(sorted(listed)[process_index::process_count])
    return kept, frozenset(listed - kept)


def _annotation_hook(elsewhere: frozenset) -> Callable[[dict], Any]:
    """A json object_hook that drops other processes' annotations and packs the rest.

    Called on every JSON object as soon as it is parsed, so an annotation of
    another process's image never outlives its own parse, and the kept ones
    hold their numbers as float32 arrays instead of Python floats (8x
    smaller). Whatever does not look right is left as it is, for `_Reader` to
    check and report.
    """

    def hook(obj: dict) -> Any:
        image_id = obj.get("image_id")
        if image_id is None:
            return obj  # images, categories, RLE
        if _is_int(image_id) and image_id in elsewhere:
            return _DROPPED
        seg = obj.get("segmentation")
        if type(seg) is list:
            arrays = [_numbers(p, len(p)) if type(p) is list else None for p in seg]
            if all(a is not None for a in arrays):
                obj["segmentation"] = arrays
        elif type(seg) is dict and obj.get("iscrowd"):
            obj["segmentation"] = {}  # crowd regions are never targets; frees the RLE counts
        keypoints = obj.get("keypoints")
        if type(keypoints) is list:
            array = _numbers(keypoints, len(keypoints))
            if array is not None:
                obj["keypoints"] = array
        return obj

    return hook


def _ann_error(path: str, ann: dict, index: int, problem: str) -> DataError:
    name = ann.get("id", f"#{index}") if isinstance(ann, dict) else f"#{index}"
    return DataError(path, f"annotation {name}: {problem}", "fix or remove the annotation")


def _require(path: str, ann: Any, index: int, fields: tuple[str, ...]) -> None:
    if not isinstance(ann, dict):
        raise _ann_error(path, {}, index, "is not a JSON object")
    for field in fields:
        if field not in ann:
            raise _ann_error(path, ann, index, f"missing required field {field!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _numbers(values: Any, length: int) -> np.ndarray | None:
    """float32[length] when `values` is a list (or array) of `length` numbers, else None."""
    if isinstance(values, list):
        if len(values) != length:
            return None
        try:
            values = np.asarray(values)  # one C pass instead of a Python type check per value
        except ValueError:  # nested lists of different lengths
            return None
    if not isinstance(values, np.ndarray) or values.shape != (length,):
        return None
    if values.dtype.kind not in "iuf":
        return None
    return values.astype(np.float32, copy=False)


class _Reader:
    """Joins the annotation files into per-image object records, checking as it goes.

    Files are added one at a time; what needs every file (the images of all
    of them, the merged categories) is checked by `finish`.
    """

    def __init__(self, num_keypoints: int, kept_images: frozenset | None):
        self.num_keypoints = num_keypoints
        self.kept_images = kept_images
        self.images: dict[int, _Image] = {}
        self.listed_images: set[int] = set()
        self.file_names: dict[int, tuple[str, str]] = {}  # id → (file_name, first file)
        self.dropped_ids: set = set()  # annotations dropped as boxes without area
        self.categories: dict[int, dict] = {}
        self.category_files: list[str] = []
        self.objects: dict[int, list[dict]] = {}
        self.by_ann_id: dict[Any, dict] = {}
        self.captions: dict[int, list[str]] = {}
        self.first_caption: dict[Any, tuple[str, int, dict]] = {}  # for errors: where, what
        self.stats = {
            "rle_converted": 0,
            "dropped_polygons": 0,
            "dropped_boxes/empty": 0,
            "dropped_boxes/outside": 0,
            "clipped_boxes": 0,
            "nan_keypoints": 0,
            "empty_captions": 0,
        }

    def add_images(self, path: str, images: list) -> None:
        """Checks a file's `images` and keeps those of this process (the first file's entry).

        An id listed twice in one file, or with another file_name than in an
        earlier file, is a DataError: which entry is meant cannot be known.
        """
        seen = set()
        for index, image in enumerate(images):
            if not isinstance(image, dict):
                raise DataError(path, f"images[{index}] is not an object")
            for field in ("id", "file_name", "height", "width"):
                if field not in image:
                    name = image.get("id", f"images[{index}]")
                    raise DataError(
                        path, f"image {name} has no {field!r}", "every image needs it (COCO format)"
                    )
            if not _is_int(image["id"]):
                raise DataError(path, f"images[{index}] has id {image['id']!r}; ids are integers")
            if not isinstance(image["file_name"], str) or not image["file_name"]:
                raise DataError(path, f"image {image['id']}: 'file_name' must be a path string")
            if not _inside_image_folder(image["file_name"]):
                raise DataError(
                    path,
                    f"image {image['id']}: file_name {image['file_name']!r} points outside the "
                    "split's image folder",
                    "file names are relative to ROOT/<split>2017/; move the image there",
                )
            h, w = image["height"], image["width"]
            if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
                raise DataError(
                    path,
                    f"image {image['id']}: height/width must be positive integers, got {h}, {w}",
                )
            self._check_unique(path, image, seen)
            self.listed_images.add(image["id"])
            if image["id"] not in self.images and (
                self.kept_images is None or image["id"] in self.kept_images
            ):
                self.images[image["id"]] = _Image(image["file_name"], h, w, path)

    def _check_unique(self, path: str, image: dict, seen: set) -> None:
        image_id, name = image["id"], image["file_name"]
        if image_id in seen:
            raise DataError(
                path,
                f"image id {image_id} appears twice in 'images'",
                "image ids must be unique; remove or renumber one entry",
            )
        seen.add(image_id)
        earlier = self.file_names.setdefault(image_id, (name, path))
        if earlier[0] != name:
            raise DataError(
                path,
                f"image {image_id}: file_name {name!r} differs from {earlier[0]!r} in {earlier[1]}",
                "an image id must name the same file in every annotation file",
            )

    def add_categories(self, path: str, categories: list) -> None:
        """Merges a file's categories by id (the keypoint file adds `keypoints`)."""
        check_categories(categories, path)
        self.category_files.append(path)
        for category in categories:
            self.categories[category["id"]] = {
                **self.categories.get(category["id"], {}),
                **category,
            }

    def add_instance(self, path: str, ann: Any, index: int) -> dict | None:
        """Checks one instance annotation and files it under its image.

        A box with a non-finite number is a DataError; one with zero or
        negative width or height is dropped (None) and counted in
        stats["dropped_boxes/empty"].
        """
        _require(path, ann, index, ("id", "image_id", "category_id", "bbox"))
        bbox = _numbers(ann["bbox"], 4)
        if bbox is None:
            raise _ann_error(
                path, ann, index, f"'bbox' must be 4 numbers [x, y, w, h], got {ann['bbox']}"
            )
        if ann["id"] in self.by_ann_id or ann["id"] in self.dropped_ids:
            raise _ann_error(path, ann, index, "annotation id appears twice")
        if not np.all(np.isfinite(bbox)):
            raise _ann_error(
                path,
                ann,
                index,
                f"'bbox' {bbox.tolist()} holds a non-finite number (NaN or Infinity)",
            )
        area = ann["area"] if "area" in ann else float(bbox[2] * bbox[3])
        if not _is_number(area) or not np.isfinite(area):
            raise _ann_error(path, ann, index, f"'area' must be a finite number, got {area!r}")
        if bbox[2] <= 0 or bbox[3] <= 0:
            self.stats["dropped_boxes/empty"] += 1
            self.dropped_ids.add(ann["id"])
            return None
        record = {
            "id": ann["id"],
            "image_id": ann["image_id"],
            "category_id": ann["category_id"],
            "bbox": bbox,
            "area": area,
            "is_crowd": bool(ann.get("iscrowd", 0)),
            "segmentation": ann.get("segmentation"),
            "keypoints": None,
            "where": (path, index),
        }
        self.by_ann_id[ann["id"]] = record
        self.objects.setdefault(ann["image_id"], []).append(record)
        return record

    def add_keypoints(self, path: str, ann: Any, index: int) -> None:
        """Attaches keypoints to the instance with the same annotation id (adding it if new)."""
        _require(path, ann, index, ("id", "image_id", "keypoints"))
        if ann["id"] in self.dropped_ids:
            return  # its box has no area (counted once, when it was dropped)
        record = self.by_ann_id.get(ann["id"])
        if record is None:
            record = self.add_instance(path, ann, index)
            if record is None:
                return
        elif record["image_id"] != ann["image_id"]:
            raise _ann_error(
                path,
                ann,
                index,
                f"image_id {ann['image_id']} differs from the instances file's "
                f"{record['image_id']} for the same annotation id",
            )
        kps = ann["keypoints"]
        k = self.num_keypoints
        xyv = _numbers(kps, 3 * k)
        if xyv is None:
            got = (
                f"{len(kps)} values" if isinstance(kps, (list, np.ndarray)) else type(kps).__name__
            )
            raise _ann_error(
                path,
                ann,
                index,
                f"'keypoints' must be 3 * {k} = {3 * k} numbers [x, y, v, ...], got {got} "
                "(set config.data.num_keypoints to the data set's count)",
            )
        yxv = xyv.reshape(k, 3)[:, [1, 0, 2]]
        broken = ~np.all(np.isfinite(yxv), axis=1)
        if broken.any():
            # A point with NaN or Infinity is taken as not labelled (v=0), and counted.
            yxv[broken] = 0.0
            self.stats["nan_keypoints"] += int(broken.sum())
        record["keypoints"] = yxv

    def add_caption(self, path: str, ann: Any, index: int) -> None:
        _require(path, ann, index, ("image_id", "caption"))
        if not isinstance(ann["caption"], str):
            raise _ann_error(path, ann, index, "'caption' must be a string")
        self.first_caption.setdefault(ann["image_id"], (path, index, ann))
        if not ann["caption"].strip():
            self.stats["empty_captions"] += 1  # nothing to learn or to score against
            return
        self.captions.setdefault(ann["image_id"], []).append(ann["caption"])

    def finish(self, space: TokenSpace) -> CategoryMap:
        """Checks image and category ids against every file's; returns the category map."""
        category_map = CategoryMap.build(
            list(self.categories.values()), space, " + ".join(self.category_files) or "annotations"
        )
        class_of = dict(zip(category_map.dataset_ids, category_map.class_ids, strict=True))
        for record in self.by_ann_id.values():
            path, index = record["where"]
            if record["image_id"] not in self.listed_images:
                raise _ann_error(
                    path, record, index, f"image_id {record['image_id']} is not in 'images'"
                )
            record["class"] = class_of.get(record["category_id"])
            if record["class"] is None:
                raise _ann_error(
                    path,
                    record,
                    index,
                    f"category_id {record['category_id']!r} is not in 'categories'",
                )
        for image_id, (path, index, ann) in self.first_caption.items():
            if image_id not in self.listed_images:
                raise _ann_error(path, ann, index, f"image_id {image_id} is not in 'images'")
        self.by_ann_id.clear()  # records now live in self.objects alone
        return category_map

    def polygons(self, record: dict, height: int, width: int) -> np.ndarray:
        """float32[P, 2] (y, x) pixels of one instance; NaN rows between polygons."""
        seg = record["segmentation"]
        path, index = record["where"]
        if seg is None or (isinstance(seg, list) and not seg):
            return np.zeros([0, 2], np.float32)
        if isinstance(seg, dict):
            if record["is_crowd"]:
                return np.zeros([0, 2], np.float32)  # crowd regions are never targets
            self.stats["rle_converted"] += 1
            return rle_to_points(seg, height, width, path, record["id"])
        if not isinstance(seg, list):
            raise _ann_error(path, record, index, "'segmentation' must be polygons or RLE")
        parts = []
        for poly in seg:
            if type(poly) is np.ndarray:
                xy = poly  # packed and checked by _annotation_hook
            else:
                xy = _numbers(poly, len(poly)) if isinstance(poly, list) else None
            if xy is None or xy.size % 2:
                raise _ann_error(
                    path,
                    record,
                    index,
                    "'segmentation' polygons must be flat lists of numbers [x1, y1, x2, y2, ...]",
                )
            if xy.size < 6 or not np.all(np.isfinite(xy)):
                # A polygon needs 3 points; NaN would read as a polygon separator.
                self.stats["dropped_polygons"] += 1
                continue
            parts.append(xy.reshape(-1, 2)[:, ::-1])
        return join_polygons(parts)

    def keypoints(self, record: dict) -> np.ndarray:
        """float32[K, 3] (y, x, v); zeros when the instance has none."""
        if record["keypoints"] is None:
            return np.zeros([self.num_keypoints, 3], np.float32)
        return record["keypoints"]

    def pop_objects(self, image_id: int, height: int, width: int) -> dict[str, Any]:
        """The `objects/*` entries of one image (example.py layout); its records are let go."""
        records = self.objects.pop(image_id, None)
        if records:
            yxyx, inside, clipped = clip_boxes(
                np.stack([r["bbox"] for r in records]), height, width
            )
            self.stats["dropped_boxes/outside"] += int(np.sum(~inside))
            self.stats["clipped_boxes"] += int(np.sum(clipped))
            records = [r for r, keep in zip(records, inside, strict=True) if keep]
            yxyx = yxyx[inside]
        if not records:
            return example_lib.empty_objects(self.num_keypoints)
        return {
            "objects/id": np.asarray([r["id"] for r in records], np.int64),
            "objects/bbox": yxyx,
            "objects/class": np.asarray([r["class"] for r in records], np.int32),
            "objects/is_crowd": np.asarray([r["is_crowd"] for r in records], bool),
            "objects/area": np.asarray([r["area"] for r in records], np.float32),
            "objects/polygons": [self.polygons(r, height, width) for r in records],
            "objects/keypoints": np.stack([self.keypoints(r) for r in records]),
        }


def clip_boxes(xywh: np.ndarray, height: int, width: int) -> tuple[np.ndarray, ...]:
    """COCO boxes float32[N, 4] (x, y, w, h) → clipped to the image.

    Returns:
      float32[N, 4] (ymin, xmin, ymax, xmax) pixels inside the image; bool[N]
      boxes with area left inside the image; bool[N] of those, the ones clipping changed.
    """
    x0, y0 = xywh[:, 0], xywh[:, 1]
    raw = np.stack([y0, x0, y0 + xywh[:, 3], x0 + xywh[:, 2]], axis=1).astype(np.float32)
    limit = np.array([height, width, height, width], np.float32)
    yxyx = np.clip(raw, 0.0, limit)
    inside = (yxyx[:, 2] > yxyx[:, 0]) & (yxyx[:, 3] > yxyx[:, 1])
    clipped = inside & np.any(yxyx != raw, axis=1)
    return yxyx, inside, clipped


def join_polygons(parts: list[np.ndarray]) -> np.ndarray:
    """Joins float32[P_i, 2] polygons with one NaN row between them (float32[P, 2])."""
    if not parts:
        return np.zeros([0, 2], np.float32)
    if len(parts) == 1:
        return np.ascontiguousarray(parts[0], np.float32)
    joined = [parts[0]]
    for part in parts[1:]:
        joined += [_NAN_ROW, part]
    return np.concatenate(joined).astype(np.float32, copy=False)


def mask_to_points(mask: np.ndarray) -> np.ndarray:
    """Outer contours of a binary mask as polygons: float32[P, 2] (y, x), NaN-separated.

    Vertices lie on pixel edges, so pycocotools rasterises the polygon back to
    the mask (holes aside: only outer contours are kept). Tracing runs on the
    mask upsampled 2×, where a region's first row or column has an even index
    and its last an odd one; `ceil(index / 2)` then gives the pixel edge on
    both sides. Instances with more than MAX_POLYGON_POINTS points are
    simplified (Douglas-Peucker, SIMPLIFY_TOLERANCE pixels).

    Args:
      mask: uint8 or bool [H, W].
    """
    fine = np.pad(np.repeat(np.repeat(mask.astype(np.uint8), 2, 0), 2, 1), 1)
    contours, _ = cv2.findContours(fine, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        xy = np.ceil((contour.reshape(-1, 2) - 1) / 2).astype(np.float32)
        if len(xy) >= 3 and cv2.contourArea(xy) >= 1.0:
            polygons.append(xy)
    if sum(len(p) for p in polygons) > MAX_POLYGON_POINTS:
        polygons = [_simplify(p) for p in polygons]
    return join_polygons([p[:, ::-1] for p in polygons])


def _simplify(xy: np.ndarray) -> np.ndarray:
    approx = cv2.approxPolyDP(xy, SIMPLIFY_TOLERANCE, closed=True).reshape(-1, 2)
    return approx if len(approx) >= 3 else xy  # thin shapes must not collapse to a line


def rle_to_points(seg: dict, height: int, width: int, path: str, ann_id: Any) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list counts) → polygons, see mask_to_points."""
    if "counts" not in seg or "size" not in seg:
        raise DataError(
            path, f"annotation {ann_id}: RLE 'segmentation' needs 'counts' and 'size'", "fix it"
        )
    if list(seg["size"]) != [height, width]:
        raise DataError(
            path,
            f"annotation {ann_id}: RLE size {seg['size']} differs from the image's "
            f"[height, width] [{height}, {width}]",
            "fix the annotation or the image entry",
        )
    counts = seg["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects(seg, height, width)
    elif isinstance(counts, str):
        rle = {"size": [height, width], "counts": counts.encode()}
    else:
        raise DataError(path, f"annotation {ann_id}: RLE 'counts' must be a string or a list")
    return mask_to_points(mask_utils.decode(rle))


def _inside_image_folder(file_name: str) -> bool:
    """Whether a `file_name` stays inside its image folder: relative, no URL, no `..` out.

    Annotation files come from elsewhere; a name like `../../etc/passwd` or
    `/etc/passwd` must not make the loader read files outside the data.
    """
    if "://" in file_name or os.path.isabs(file_name) or file_name.startswith("\\"):
        return False
    normal = posixpath.normpath(file_name.replace("\\", "/"))
    return normal not in (".", "..") and not normal.startswith("../")


def _image_files(
    folder: str, images: dict[int, _Image], on_bad_image: str
) -> tuple[dict[int, str], list[str]]:
    """image id → image path for images whose file exists; and the missing paths."""
    if not tf.io.gfile.isdir(folder):
        raise DataError(
            folder,
            f"image folder not found ({len(images)} images are listed in the annotations)",
            "the COCO layout keeps a split's images in ROOT/<split>2017/<file_name>",
        )
    # One listing instead of a stat per image; names in subfolders are stat'ed.
    names = {n.rstrip("/") for n in tf.io.gfile.listdir(folder)}
    found, missing = {}, []
    for image_id, image in images.items():
        path = os.path.join(folder, image.file_name)
        if image.file_name in names or tf.io.gfile.exists(path):
            found[image_id] = path
            continue
        if on_bad_image == "fail":
            raise DataError(
                path,
                f"image file not found (image {image_id}, listed in {image.listed_in})",
                "restore the file, or set --config.data.on_bad_image=skip to skip and count",
            )
        missing.append(path)
    return found, missing


def load_coco_json(
    coco_dir: str,
    split: str,
    space: TokenSpace,
    *,
    num_keypoints: int = 17,
    on_bad_image: str = "fail",
    process_index: int = 0,
    process_count: int = 1,
    kinds: Sequence[str] = KINDS,
    max_annotation_bytes: int = DEFAULT_MAX_ANNOTATION_BYTES,
) -> tuple[list[dict], CategoryMap, dict]:
    """Reads one split of a data set in the COCO 2017 layout, or one process's share of it.

    Crowd regions are kept (`objects/is_crowd`); images without annotations are
    kept with no objects. Only the existence of image files is checked here;
    images that fail to decode are found by `inputs.load_split`.

    Faults in the files are either a DataError naming the file, the image or
    annotation id and the field, or dropped (or mended) and counted:

      DataError: invalid JSON; a missing top-level key; a file over
        `max_annotation_bytes`; a bbox that is not 4 numbers or holds NaN or
        Infinity; an area that is not a finite number; keypoints that are
        not 3 x K numbers; an annotation id twice; an image_id or
        category_id not listed; an image id twice in one file's `images`;
        one image id with two file_names; a file_name outside the image
        folder; an RLE of another size than its image; a missing image file
        under on_bad_image=fail.
      Counted (stats key): a box with width or height <= 0, dropped
        (dropped_boxes/empty); a box entirely outside its image, dropped
        (dropped_boxes/outside); a box partly outside, clipped to the image
        (clipped_boxes); a keypoint with NaN or Infinity, made unlabelled,
        v=0 (nan_keypoints); a polygon of < 3 points or with NaN, dropped
        (dropped_polygons); an empty or blank caption, dropped
        (empty_captions); a missing image file under on_bad_image=skip,
        dropped (skipped_images).

    "The image" is the size the `images` entry gives; the decoded size may
    differ (inputs.load_split counts that).

    With `process_count` n > 1, the process keeps the images `process_index::n`
    of the split's image ids in sorted order (what `examples.shard(n, index)`
    of the whole split holds, when no image file is missing) and their
    annotations. Other processes' annotations are dropped while the JSON is
    parsed, so memory falls with n; they are not checked here, each process
    checks its own.

    Args:
      coco_dir: ROOT of the layout (any tf.io.gfile path: local, gs://, ...).
      split: `train`, `val`, ... as in the file names.
      space: token space; class ids are remapped when data-set ids do not fit.
      num_keypoints: K, keypoints per instance.
      on_bad_image: `fail` raises on a missing image file; `skip` drops the
        image and counts it in stats["skipped_images"].
      process_index, process_count: this process's share of the images.
      kinds: the annotation files to read, of KINDS (those that exist).
      max_annotation_bytes: a larger annotation file is a DataError, before
        it is read (0: no limit).

    Returns:
      examples (example.py layout, sorted by image id; `image/filename` is the
      image's path, absolute when local; `image/encoded` b""), the category
      map, and counts over the examples: images, objects, crowd,
      with_keypoints, with_masks, captions, empty_images, skipped_images and
      the counts of the table above.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image={on_bad_image!r}; choose one of {BAD_IMAGE_POLICIES}")
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"kinds={kinds!r}; choose from {KINDS}")
    coco_dir = absolute_path(coco_dir)
    paths = _annotation_files(coco_dir, split, [k for k in KINDS if k in kinds])
    _check_sizes(paths, max_annotation_bytes)
    shard = _process_shard(paths, process_index, process_count)
    kept, elsewhere = shard or (None, frozenset())
    reader = _Reader(num_keypoints, kept)
    adders = {
        "instances": reader.add_instance,
        "person_keypoints": reader.add_keypoints,
        "captions": reader.add_caption,
    }
    hook = _annotation_hook(elsewhere)
    with _gc_paused():
        for kind, path in paths.items():
            content = _read_json(path, hook)
            _check_layout(path, kind, content)
            reader.add_images(path, content["images"])
            if kind != "captions":
                reader.add_categories(path, content["categories"])
            add = adders[kind]
            annotations = content["annotations"]
            for index, ann in enumerate(annotations):
                annotations[index] = None  # each parsed annotation goes once it is filed
                if ann is not _DROPPED:
                    add(path, ann, index)
            del content, annotations  # one parsed file at a time
        if shard and reader.listed_images != kept | elsewhere:
            raise DataError(
                " + ".join(paths.values()),
                "the image ids read ahead of the annotations differ from the files' 'images'",
                "list 'images' before 'annotations' in the files (COCO's order)",
            )
        category_map = reader.finish(space)
        found, missing = _image_files(image_dir(coco_dir, split), reader.images, on_bad_image)
        if missing:
            logging.warning(
                "Skipping %d images whose files are missing, e.g. %s", len(missing), missing[:3]
            )
        examples = []
        for image_id in sorted(found):
            image = reader.images[image_id]
            h, w = image.height, image.width
            examples.append(
                {
                    "image/id": np.int64(image_id),
                    "image/filename": found[image_id],
                    "image/encoded": b"",
                    "image/size": np.array([h, w], np.int32),
                    **reader.pop_objects(image_id, h, w),
                    "captions": reader.captions.pop(image_id, []),
                }
            )
    stats = _stats(examples, reader.stats, len(missing))
    logging.info(
        "Read %s split %r (process %d of %d): %s",
        coco_dir,
        split,
        process_index,
        process_count,
        stats,
    )
    return examples, category_map, stats


def _stats(examples: list[dict], reader_stats: dict, skipped: int) -> dict:
    objects = crowd = with_keypoints = with_masks = captions = empty = 0
    for ex in examples:
        n = len(ex["objects/id"])
        objects += n
        empty += n == 0
        crowd += int(np.sum(ex["objects/is_crowd"]))
        with_keypoints += int(np.sum(np.any(ex["objects/keypoints"][..., 2] > 0, axis=-1)))
        with_masks += sum(len(p) > 0 for p in ex["objects/polygons"])
        captions += len(ex["captions"])
    return {
        "images": len(examples),
        "objects": objects,
        "crowd": crowd,
        "with_keypoints": with_keypoints,
        "with_masks": with_masks,
        "captions": captions,
        "empty_images": empty,
        "skipped_images": skipped,
        **reader_stats,
    }


def examples_to_dataset(examples: list[dict], num_keypoints: int) -> tf.data.Dataset:
    """A list of numpy examples → tf.data.Dataset in the TF example layout (module docstring).

    Built with `from_tensor_slices` on ragged tensors assembled once from flat
    arrays, so it is fast to build and can be read in parallel. Its
    `element_spec` equals that of `tfds_source.load_tfds`.
    """
    counts = np.array([len(ex["objects/id"]) for ex in examples], np.int64)

    def per_object(key: str, dtype: Any, inner: tuple[int, ...]) -> tf.RaggedTensor:
        parts = [np.asarray(ex[key], dtype).reshape((-1, *inner)) for ex in examples]
        flat = np.concatenate(parts) if parts else np.zeros((0, *inner), dtype)
        return tf.RaggedTensor.from_row_lengths(flat, counts)

    polygons = [p for ex in examples for p in ex["objects/polygons"]]
    points = np.concatenate(polygons).astype(np.float32) if polygons else np.zeros([0, 2])
    point_counts = np.array([len(p) for p in polygons], np.int64)
    captions = [c for ex in examples for c in ex["captions"]]
    caption_counts = np.array([len(ex["captions"]) for ex in examples], np.int64)
    tensors = {
        "image/id": np.array([ex["image/id"] for ex in examples], np.int64),
        "image/filename": tf.constant([ex["image/filename"] for ex in examples], tf.string),
        "image/encoded": tf.constant([ex["image/encoded"] for ex in examples], tf.string),
        "image/size": np.array([ex["image/size"] for ex in examples], np.int32).reshape(-1, 2),
        "objects/id": per_object("objects/id", np.int64, ()),
        "objects/bbox": per_object("objects/bbox", np.float32, (4,)),
        "objects/class": per_object("objects/class", np.int32, ()),
        "objects/is_crowd": per_object("objects/is_crowd", bool, ()),
        "objects/area": per_object("objects/area", np.float32, ()),
        "objects/polygons": tf.RaggedTensor.from_nested_row_lengths(
            tf.constant(points, tf.float32), [counts, point_counts]
        ),
        "objects/keypoints": per_object("objects/keypoints", np.float32, (num_keypoints, 3)),
        "captions": tf.RaggedTensor.from_row_lengths(
            tf.constant(captions, tf.string, shape=[len(captions)]), caption_counts
        ),
    }
    # Slices of the ragged-rank-1 tensors come out as dense tensors but are typed
    # RaggedTensorSpec(ragged_rank=0); the identity map retypes them as TensorSpec,
    # the spec load_tfds has.
    ds = tf.data.Dataset.from_tensor_slices(tensors)
    return ds.map(lambda ex: ex, num_parallel_calls=tf.data.AUTOTUNE)
