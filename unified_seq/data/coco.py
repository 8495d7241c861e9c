"""COCO-format JSON files → examples (unified_seq/data/example.py) → tf.data.

`load_coco_json` reads the standard COCO 2017 layout (DESIGN §7):

    ROOT/annotations/{instances,person_keypoints,captions}_{split}2017.json
    ROOT/{split}2017/<file_name>

Any subset of the three files may exist (at least one); they are joined by
image id, and keypoints are joined to instances by annotation id. Every
problem in the files is a DataError naming the file, the annotation and the
field. `examples_to_dataset` turns the examples into the TF example layout
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

import json
import os
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


def annotation_path(coco_dir: str, kind: str, split: str) -> str:
    """ROOT/annotations/{kind}_{split}2017.json."""
    return os.path.join(coco_dir, "annotations", f"{kind}_{split}2017.json")


def image_dir(coco_dir: str, split: str) -> str:
    """ROOT/{split}2017, the folder of the split's images."""
    return os.path.join(coco_dir, f"{split}2017")


def _is_remote(path: str) -> bool:
    return "://" in path


def _exists(path: str) -> bool:
    return tf.io.gfile.exists(path) if _is_remote(path) else os.path.exists(path)


def _read_json(path: str) -> dict:
    """Parses one annotation file; DataError on unreadable or invalid JSON."""
    try:
        if _is_remote(path):
            with tf.io.gfile.GFile(path, "rb") as f:
                content = json.loads(f.read())
        else:
            with open(path, "rb") as f:
                content = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            path,
            f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}",
            "the file is damaged or truncated; download or generate it again",
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot be read ({e})", "check the file and its permissions") from e
    if not isinstance(content, dict):
        raise DataError(path, "top level is not a JSON object", "expected a COCO annotation file")
    return content


def _read_files(coco_dir: str, split: str) -> dict[str, tuple[str, dict]]:
    """kind → (path, parsed content) for the annotation files that exist."""
    paths = {kind: annotation_path(coco_dir, kind, split) for kind in KINDS}
    present = {kind: p for kind, p in paths.items() if _exists(p)}
    if not present:
        raise DataError(
            os.path.join(coco_dir, "annotations"),
            f"no annotation file for split {split!r}; expected at least one of "
            + ", ".join(paths.values()),
            "point data.coco_dir at a folder in the COCO 2017 layout",
        )
    files = {}
    for kind, path in present.items():
        content = _read_json(path)
        for key in REQUIRED_KEYS[kind]:
            if key not in content:
                raise DataError(path, f"missing top-level key {key!r}", "see the COCO format")
            if not isinstance(content[key], list):
                raise DataError(path, f"{key!r} must be a list", "see the COCO format")
        files[kind] = (path, content)
    return files


def _collect_images(files: dict[str, tuple[str, dict]]) -> dict[int, tuple[dict, str]]:
    """image id → (image entry, path of the first file that lists it)."""
    images: dict[int, tuple[dict, str]] = {}
    for path, content in files.values():
        for index, image in enumerate(content["images"]):
            if not isinstance(image, dict):
                raise DataError(path, f"images[{index}] is not an object")
            for field in ("id", "file_name", "height", "width"):
                if field not in image:
                    name = image.get("id", f"images[{index}]")
                    raise DataError(
                        path, f"image {name} has no {field!r}", "every image needs it (COCO format)"
                    )
            if not isinstance(image["id"], int):
                raise DataError(path, f"images[{index}] has id {image['id']!r}; ids are integers")
            if not isinstance(image["file_name"], str) or not image["file_name"]:
                raise DataError(path, f"image {image['id']}: 'file_name' must be a path string")
            h, w = image["height"], image["width"]
            if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
                raise DataError(
                    path,
                    f"image {image['id']}: height/width must be positive integers, got {h}, {w}",
                )
            images.setdefault(image["id"], (image, path))
    return images


def _build_categories(files: dict[str, tuple[str, dict]], space: TokenSpace) -> CategoryMap:
    """Union of the files' categories, by id (the keypoint file adds `keypoints`)."""
    merged: dict[int, dict] = {}
    paths = []
    for kind in ("instances", "person_keypoints"):
        if kind not in files:
            continue
        path, content = files[kind]
        check_categories(content["categories"], path)
        paths.append(path)
        for category in content["categories"]:
            merged[category["id"]] = {**merged.get(category["id"], {}), **category}
    return CategoryMap.build(list(merged.values()), space, " + ".join(paths) or "annotations")


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


def _numbers(values: Any, length: int) -> np.ndarray | None:
    """float32[length] when `values` is a list of `length` numbers, else None."""
    if not isinstance(values, list) or len(values) != length:
        return None
    try:
        array = np.asarray(values)  # one C pass instead of a Python type check per value
    except ValueError:  # nested lists of different lengths
        return None
    if array.ndim != 1 or array.dtype.kind not in "iuf":
        return None
    return array.astype(np.float32)


class _Reader:
    """Joins the annotation files into per-image object records, checking as it goes."""

    def __init__(self, images: dict, category_map: CategoryMap, num_keypoints: int):
        self.images = images
        self.class_of = dict(zip(category_map.dataset_ids, category_map.class_ids, strict=True))
        self.num_keypoints = num_keypoints
        self.objects: dict[int, list[dict]] = {}
        self.by_ann_id: dict[Any, dict] = {}
        self.captions: dict[int, list[str]] = {}
        self.stats = {"rle_converted": 0, "dropped_polygons": 0}

    def add_instance(self, path: str, ann: Any, index: int) -> dict:
        """Checks one instance annotation and files it under its image."""
        _require(path, ann, index, ("id", "image_id", "category_id", "bbox"))
        if ann["image_id"] not in self.images:
            raise _ann_error(path, ann, index, f"image_id {ann['image_id']} is not in 'images'")
        class_id = self.class_of.get(ann["category_id"])
        if class_id is None:
            raise _ann_error(
                path, ann, index, f"category_id {ann['category_id']!r} is not in 'categories'"
            )
        bbox = _numbers(ann["bbox"], 4)
        if bbox is None:
            raise _ann_error(
                path, ann, index, f"'bbox' must be 4 numbers [x, y, w, h], got {ann['bbox']}"
            )
        if ann["id"] in self.by_ann_id:
            raise _ann_error(path, ann, index, "annotation id appears twice")
        area = ann["area"] if "area" in ann else float(bbox[2] * bbox[3])
        if not _is_number(area):
            raise _ann_error(path, ann, index, f"'area' must be a number, got {area!r}")
        record = {
            "id": ann["id"],
            "image_id": ann["image_id"],
            "class": class_id,
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
        record = self.by_ann_id.get(ann["id"])
        if record is None:
            record = self.add_instance(path, ann, index)
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
            got = f"{len(kps)} values" if isinstance(kps, list) else type(kps).__name__
            raise _ann_error(
                path,
                ann,
                index,
                f"'keypoints' must be 3 * {k} = {3 * k} numbers [x, y, v, ...], got {got} "
                "(set config.data.num_keypoints to the data set's count)",
            )
        record["keypoints"] = xyv.reshape(k, 3)[:, [1, 0, 2]]

    def add_caption(self, path: str, ann: Any, index: int) -> None:
        _require(path, ann, index, ("image_id", "caption"))
        if ann["image_id"] not in self.images:
            raise _ann_error(path, ann, index, f"image_id {ann['image_id']} is not in 'images'")
        if not isinstance(ann["caption"], str):
            raise _ann_error(path, ann, index, "'caption' must be a string")
        self.captions.setdefault(ann["image_id"], []).append(ann["caption"])

    def polygons(self, record: dict, height: int, width: int) -> np.ndarray:
        """float32[P, 2] (y, x) pixels of one instance; NaN rows between polygons."""
        seg = record["segmentation"]
        path, index = record["where"]
        if seg is None or seg == []:
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
            xy = _numbers(poly, len(poly)) if isinstance(poly, list) else None
            if xy is None or xy.size % 2:
                raise _ann_error(
                    path,
                    record,
                    index,
                    "'segmentation' polygons must be flat lists of numbers [x1, y1, x2, y2, ...]",
                )
            if xy.size < 6:
                self.stats["dropped_polygons"] += 1  # a polygon needs 3 points
                continue
            parts.append(xy.reshape(-1, 2)[:, ::-1])
        return join_polygons(parts)

    def keypoints(self, record: dict) -> np.ndarray:
        """float32[K, 3] (y, x, v); zeros when the instance has none."""
        if record["keypoints"] is None:
            return np.zeros([self.num_keypoints, 3], np.float32)
        return record["keypoints"]

    def objects_of(self, image_id: int, height: int, width: int) -> dict[str, Any]:
        """The `objects/*` entries of one image (example.py layout)."""
        records = self.objects.get(image_id)
        if not records:
            return example_lib.empty_objects(self.num_keypoints)
        xywh = np.stack([r["bbox"] for r in records])
        yxyx = np.stack(
            [xywh[:, 1], xywh[:, 0], xywh[:, 1] + xywh[:, 3], xywh[:, 0] + xywh[:, 2]], axis=1
        )
        return {
            "objects/id": np.asarray([r["id"] for r in records], np.int64),
            "objects/bbox": yxyx,
            "objects/class": np.asarray([r["class"] for r in records], np.int32),
            "objects/is_crowd": np.asarray([r["is_crowd"] for r in records], bool),
            "objects/area": np.asarray([r["area"] for r in records], np.float32),
            "objects/polygons": [self.polygons(r, height, width) for r in records],
            "objects/keypoints": np.stack([self.keypoints(r) for r in records]),
        }


def join_polygons(parts: list[np.ndarray]) -> np.ndarray:
    """Joins float32[P_i, 2] polygons with one NaN row between them (float32[P, 2])."""
    if not parts:
        return np.zeros([0, 2], np.float32)
    joined = [parts[0]]
    for part in parts[1:]:
        joined += [_NAN_ROW, part]
    return np.concatenate(joined).astype(np.float32)


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


def _listing(folder: str) -> set[str] | None:
    """Names in `folder` (one listing instead of a stat per image); None if it is missing."""
    if not _exists(folder):
        return None
    if _is_remote(folder):
        return {n.rstrip("/") for n in tf.io.gfile.listdir(folder)}
    return set(os.listdir(folder))


def _image_files(
    folder: str, images: dict[int, tuple[dict, str]], on_bad_image: str
) -> tuple[dict[int, str], list[str]]:
    """image id → image path for images whose file exists; and the missing paths."""
    names = _listing(folder)
    if names is None:
        raise DataError(
            folder,
            f"image folder not found ({len(images)} images are listed in the annotations)",
            "the COCO layout keeps a split's images in ROOT/<split>2017/<file_name>",
        )
    local = not _is_remote(folder)
    found, missing = {}, []
    for image_id, (image, json_path) in images.items():
        path = os.path.join(folder, image["file_name"])
        if local:
            path = os.path.abspath(path)
        if image["file_name"] in names or _exists(path):
            found[image_id] = path
            continue
        if on_bad_image == "fail":
            raise DataError(
                path,
                f"image file not found (image {image_id}, listed in {json_path})",
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
) -> tuple[list[dict], CategoryMap, dict]:
    """Reads one split of a data set in the COCO 2017 layout.

    Crowd regions are kept (`objects/is_crowd`); images without annotations are
    kept with no objects. Only the existence of image files is checked here;
    images that fail to decode are the pipeline's business.

    Args:
      coco_dir: ROOT of the layout (local path or tf.io.gfile URL).
      split: `train`, `val`, ... as in the file names.
      space: token space; class ids are remapped when data-set ids do not fit.
      num_keypoints: K, keypoints per instance.
      on_bad_image: `fail` raises on a missing image file; `skip` drops the
        image and counts it in stats["skipped_images"].

    Returns:
      examples (example.py layout, sorted by image id; `image/filename` is the
      image's path, `image/encoded` b""), the category map, and counts:
      images, objects, crowd, with_keypoints, with_masks, rle_converted,
      dropped_polygons, captions, empty_images, skipped_images.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image={on_bad_image!r}; choose one of {BAD_IMAGE_POLICIES}")
    files = _read_files(coco_dir, split)
    images = _collect_images(files)
    category_map = _build_categories(files, space)
    reader = _Reader(images, category_map, num_keypoints)
    adders = {
        "instances": reader.add_instance,
        "person_keypoints": reader.add_keypoints,
        "captions": reader.add_caption,
    }
    for kind in KINDS:
        if kind in files:
            path, content = files[kind]
            add = adders[kind]
            for index, ann in enumerate(content["annotations"]):
                add(path, ann, index)
    del files  # the parsed JSON of COCO train is gigabytes; free it before converting

    found, missing = _image_files(image_dir(coco_dir, split), images, on_bad_image)
    if missing:
        logging.warning(
            "Skipping %d images whose files are missing, e.g. %s", len(missing), missing[:3]
        )
    examples = []
    for image_id in sorted(found):
        image = images[image_id][0]
        h, w = image["height"], image["width"]
        examples.append(
            {
                "image/id": np.int64(image_id),
                "image/filename": found[image_id],
                "image/encoded": b"",
                "image/size": np.array([h, w], np.int32),
                **reader.objects_of(image_id, h, w),
                "captions": list(reader.captions.get(image_id, [])),
            }
        )
    stats = _stats(examples, reader.stats, len(missing))
    logging.info("Read %s split %r: %s", coco_dir, split, stats)
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
