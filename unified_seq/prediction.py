"""Every task on any images in one call: objects, their masks and poses, a caption.

`predict_images` (`Predictor.predict`) takes images in batches. For each
batch it runs the tasks that give boxes (detection) on every image, then
prompts the tasks that take boxes (segmentation, keypoints) with each
image's top detections (or the boxes the caller gave), all instances of all
images of the batch in the same sampler calls, and the tasks that answer
for the whole image (captioning). The N mask samples of an instance are
rows of the same call.

Each task turns an image into its prompts and views exactly as in
evaluation (`Task.eval_examples`, the same TensorFlow code), and its
answers into COCO-format results (`Task.results`); nothing here knows a task
by name. Row counts vary from batch to batch, so a call's rows are padded up
to a power of two (`bucket_rows`): a stream of images compiles each task's
sampler a handful of times, not once per image.

One record per image:

    {"image": "dog.jpg", "index": 0, "image_id": 0, "height": 480, "width": 640,
     "objects": [{"bbox": [x, y, w, h], "category_id": 18, "category": "dog",
                  "score": 0.93,
                  "instance_segmentation": {"segmentation": RLE, "score": ...},
                  "keypoint_detection": {"keypoints": [x, y, v] * 17, "score": ...}}],
     "captioning": {"caption": "a dog on a couch"}}

Coordinates are pixels of the image as loaded (EXIF orientation applied).
An image that cannot be read gives `{"image", "index", "error"}` with
`skip_errors`, and raises `images.ImageError` otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from unified_seq import evaluate, images
from unified_seq.predictor import Predictor, sampling_seed, task_key
from unified_seq.tasks.task import Task

DEFAULT_BATCH_SIZE = 8  # images per batch
# Keys of a COCO result that the record already holds elsewhere.
_RESULT_KEYS_ELSEWHERE = ("image_id", "category_id")


def bucket_rows(n: int, cap: int, multiple: int = 1) -> int:
    """Rows a call of n rows is padded to: the next power of two, at most `cap`,
    rounded up to a multiple of the devices."""
    size = min(1 << max(0, (n - 1).bit_length()), max(cap, n))
    return -(-size // multiple) * multiple


@dataclasses.dataclass
class _Loaded:
    index: int
    name: str
    image_id: int
    pixels: np.ndarray  # uint8[h, w, 3]


def _example_signature() -> dict[str, tf.TensorSpec]:
    return {
        "image": tf.TensorSpec([None, None, 3], tf.uint8),
        "image/id": tf.TensorSpec([], tf.int64),
        "detections/bbox": tf.TensorSpec([None, 4], tf.float32),
        "detections/class": tf.TensorSpec([None], tf.int32),
        "detections/score": tf.TensorSpec([None], tf.float32),
    }


def _examples_fn(task: Task, labels: Any):
    """The task's evaluation examples of one image, traced once for any image size."""

    @tf.function(input_signature=[_example_signature()])
    def examples(example):
        example = dict(example)
        # As views.decode_image: uint8 → [0, 1] floats.
        image = tf.image.convert_image_dtype(example.pop("image"), tf.float32)
        return task.eval_examples(example, image, labels)

    return examples


def _no_detections() -> dict[str, np.ndarray]:
    return {
        "boxes": np.zeros([0, 4], np.float32),
        "classes": np.zeros([0], np.int32),
        "scores": np.zeros([0], np.float32),
    }


def _user_boxes(given: Sequence[Mapping[str, Any]], category_map: Any, name: str) -> dict:
    """COCO-style boxes ({"bbox": [x, y, w, h], "category_id" or "category", "score"?})
    → detections (ymin, xmin, ymax, xmax pixels, class ids, scores)."""
    by_name = dict(zip(category_map.names, category_map.dataset_ids, strict=True))
    boxes, ids, scores = [], [], []
    for k, box in enumerate(given):
        where = f"boxes of {name}, item {k}"
        try:
            x, y, w, h = (float(v) for v in box["bbox"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: needs 'bbox': [x, y, width, height] in pixels") from None
        if "category_id" in box:
            category = int(box["category_id"])
        elif box.get("category") in by_name:
            category = by_name[box["category"]]
        else:
            raise ValueError(f"{where}: needs 'category_id' or 'category', one of {list(by_name)}")
        boxes.append([y, x, y + h, x + w])
        ids.append(category)
        scores.append(float(box.get("score", 1.0)))
    if not boxes:
        return _no_detections()
    try:
        classes = category_map.to_class(np.array(ids))
    except ValueError as e:
        raise ValueError(f"boxes of {name}: {e}") from None
    return {
        "boxes": np.array(boxes, np.float32).reshape(-1, 4),
        "classes": np.asarray(classes, np.int32),
        "scores": np.array(scores, np.float32),
    }


def _box_records(detections: dict, category_map: Any) -> list[dict]:
    """Objects of an image from detections (for boxes given by the caller)."""
    names = dict(zip(category_map.class_ids, category_map.names, strict=True))
    out = []
    for (y0, x0, y1, x1), c, s in zip(
        detections["boxes"].tolist(), detections["classes"].tolist(),
        detections["scores"].tolist(), strict=True,
    ):  # fmt: skip
        out.append(
            {
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "category_id": int(category_map.to_dataset_id(np.array([c]))[0]),
                "category": names.get(c, str(c)),
                "score": s,
            }
        )
    return out


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    keys = rows[0].keys()
    return {k: np.concatenate([r[k] for r in rows]) for k in keys}


def _take(batch: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {k: v[start:stop] for k, v in batch.items()}


class _Runner:
    """One `predict_images` call: the tasks, their example functions and keys."""

    def __init__(self, predictor: Predictor, names: Sequence[str], settings: dict, seed: int):
        self.predictor = predictor
        self.labels = predictor.labels
        self.tasks = {n: predictor.with_task_settings(n, **settings.get(n, {})) for n in names}
        self.fns = {n: _examples_fn(t, self.labels) for n, t in self.tasks.items()}
        self.keys = {n: task_key(seed, t) for n, t in self.tasks.items()}
        config = predictor.config
        self.cap = int(config.eval.batch_size) if config is not None else 32
        self.cap = max(self.cap, predictor.rows_multiple)

    def rows(self, name: str, loaded: list[_Loaded], prompts: dict[int, dict]) -> dict | None:
        """Every example of the task for these images, stacked (None: none)."""
        rows = []
        for item in loaded:
            det = prompts.get(item.image_id, _no_detections())
            example = {
                "image": item.pixels,
                "image/id": np.int64(item.image_id),
                "detections/bbox": np.asarray(det["boxes"], np.float32).reshape(-1, 4),
                "detections/class": np.asarray(det["classes"], np.int32),
                "detections/score": np.asarray(det["scores"], np.float32),
            }
            out = {k: v.numpy() for k, v in self.fns[name](example).items()}
            if len(out["image"]):
                rows.append(out)
        return _stack(rows) if rows else None

    def results(self, name: str, batch: dict[str, np.ndarray]) -> list[list[dict]]:
        """The task's results of every row, sampled `cap` rows at a time."""
        task = self.tasks[name]
        per_row = self.predictor.sampler_options(task).num_samples
        out = []
        for start in range(0, len(batch["image"]), self.cap):
            chunk = _take(batch, start, start + self.cap)
            n = len(chunk["image"])
            size = bucket_rows(n, self.cap, self.predictor.rows_multiple)
            samples = self.predictor.sample(task, evaluate.padded(chunk, size), self.keys[name])
            samples = {k: v[: n * per_row] for k, v in samples.items()}
            if task.takes_boxes:
                # One result per prompted object, in row order (Task.results).
                for r in range(n):
                    row = _take(chunk, r, r + 1)
                    row_samples = {
                        k: v[r * per_row : (r + 1) * per_row] for k, v in samples.items()
                    }
                    out.append(task.results(row, row_samples, self.labels))
            else:
                out.append(task.results(chunk, samples, self.labels))
        return out


def _run_order(tasks: Mapping[str, Task]) -> list[str]:
    """Tasks that give boxes first: their detections prompt the tasks that take boxes."""
    return sorted(tasks, key=lambda n: (not tasks[n].gives_boxes, tasks[n].takes_boxes))


def _check_tasks(predictor: Predictor, names: Sequence[str], boxes: Any) -> None:
    unknown = [n for n in names if n not in predictor.tasks]
    if unknown:
        raise ValueError(
            f"tasks {unknown} were not trained in this run; it has {list(predictor.tasks)}"
        )
    givers = [n for n in names if predictor.tasks[n].gives_boxes]
    takers = [n for n in names if predictor.tasks[n].takes_boxes]
    if takers and not givers and boxes is None:
        raise ValueError(
            f"{takers} answer for boxes: add a task that gives boxes "
            f"({[n for n, t in predictor.tasks.items() if t.gives_boxes]}) or pass boxes="
        )


def predict_images(
    predictor: Predictor,
    sources: Sequence[Any],
    tasks: Sequence[str] | None = None,
    *,
    boxes: Sequence[Sequence[Mapping[str, Any]]] | None = None,
    detections_per_image: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int | None = None,
    image_ids: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    skip_errors: bool = False,
    max_pixels: int = images.MAX_PIXELS,
    with_pixels: bool = False,
) -> Iterator[dict]:
    """Yields one record per image, in order (module docstring).

    Args:
      predictor: a Predictor with its run's config and labels (`from_workdir`).
      sources: paths (local or gs://), PIL images or arrays, any size.
      tasks: task names; default: every task of the run.
      boxes: per image, COCO-style boxes `{"bbox": [x, y, w, h], "category_id"
        (or "category": name), "score" (optional)}` to prompt the tasks that
        take boxes instead of the detections.
      detections_per_image: prompt with the top N detections of each image
        by score (0 = all); default: each task's `detections_per_image`.
      batch_size: images per batch.
      seed: sampling seed; default: the one evaluation uses, so that
        predictions over a split equal its evaluation's.
      image_ids: the id of each image (its sampling keys and COCO results);
        default: its index in `sources`.
      names: display names; default: file names, or image_<index>.
      skip_errors: give unreadable images an error record instead of raising.
      max_pixels: larger images are refused (decompression bombs).
      with_pixels: add `pixels` (the uint8 image) to each record, for drawing.
    """
    names_run = list(predictor.tasks) if tasks is None else list(tasks)
    _check_tasks(predictor, names_run, boxes)
    if boxes is not None and len(boxes) != len(sources):
        raise ValueError(f"boxes has {len(boxes)} entries for {len(sources)} images")
    if image_ids is not None and len(image_ids) != len(sources):
        raise ValueError(f"image_ids has {len(image_ids)} entries for {len(sources)} images")
    if image_ids is not None and len(set(map(int, image_ids))) != len(image_ids):
        raise ValueError("image_ids repeat: each image needs its own id")
    settings = {}
    if detections_per_image is not None:
        settings = {
            n: {"detections_per_image": int(detections_per_image)}
            for n in names_run
            if predictor.tasks[n].takes_boxes
        }
    if seed is None:
        seed = sampling_seed(predictor.config) if predictor.config is not None else 1
    runner = _Runner(predictor, names_run, settings, seed)
    order = _run_order(runner.tasks)
    category_map = predictor.labels.category_map
    for start in range(0, len(sources), max(1, int(batch_size))):
        loaded, records, given_boxes = [], {}, {}
        for i in range(start, min(start + batch_size, len(sources))):
            name = names[i] if names is not None else images.image_name(sources[i], i)
            image_id = int(image_ids[i]) if image_ids is not None else i
            try:
                pixels = images.load_image(sources[i], name, max_pixels)
            except images.ImageError as e:
                if not skip_errors:
                    raise
                records[i] = {"image": name, "index": i, "error": str(e)}
                continue
            loaded.append(_Loaded(i, name, image_id, pixels))
            h, w = pixels.shape[:2]
            records[i] = {"image": name, "index": i, "image_id": image_id, "height": h, "width": w}
            if boxes is not None:
                given_boxes[image_id] = _user_boxes(boxes[i], category_map, name)
                records[i]["objects"] = _box_records(given_boxes[image_id], category_map)
        prompts = given_boxes if boxes is not None else None
        _predict_batch(runner, order, loaded, records, prompts)
        for i in sorted(records):
            if with_pixels and "error" not in records[i]:
                records[i]["pixels"] = next(x.pixels for x in loaded if x.index == i)
            yield records[i]


def _predict_batch(
    runner: _Runner,
    order: list[str],
    loaded: list[_Loaded],
    records: dict[int, dict],
    given: dict[int, dict] | None,
) -> None:
    """Fills the records of one batch of images, task after task.

    `given`: image id → the caller's boxes as detections, which prompt the
    tasks that take boxes; None: the detections prompt them.
    """
    by_id = {x.image_id: records[x.index] for x in loaded}
    category_map = runner.labels.category_map
    prompts: dict[int, dict] = dict(given or {})
    names = dict(zip(category_map.dataset_ids, category_map.names, strict=True))
    for name in order:
        task = runner.tasks[name]
        batch = runner.rows(name, loaded, prompts) if loaded else None
        results = runner.results(name, batch) if batch is not None else []
        flat = [r for group in results for r in group]
        if task.gives_boxes:
            for x in loaded:
                objects = [
                    {**_strip(r, ("image_id",)), "category": names.get(r["category_id"], "")}
                    for r in flat
                    if r["image_id"] == x.image_id
                ]
                if given is None:
                    by_id[x.image_id]["objects"] = objects
                else:
                    by_id[x.image_id][name] = objects
            if given is None:
                prompts = evaluate.detections_by_image(flat, category_map)
        elif task.takes_boxes:
            for row, group in zip(_row_keys(batch), results, strict=True):
                image_id, k = row
                (result,) = group
                by_id[image_id]["objects"][k][name] = _strip(result, _RESULT_KEYS_ELSEWHERE)
        else:
            for r in flat:
                by_id[int(r["image_id"])][name] = _strip(r, ("image_id",))


def _row_keys(batch: dict[str, np.ndarray] | None) -> list[tuple[int, int]]:
    if batch is None:
        return []
    return list(
        zip(batch["image/id"].astype(int).tolist(), batch["prompt/index"].tolist(), strict=True)
    )


def _strip(result: dict, keys: Sequence[str]) -> dict:
    return {k: v for k, v in result.items() if k not in keys}
