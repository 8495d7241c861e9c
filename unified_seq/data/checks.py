"""Whether a split can train each configured task, and, when it cannot, why.

A task trains on the images its `has_training_target` accepts. A split where
it accepts none would make the task's pipeline end at once (StopIteration)
or, repeated, never yield; these checks turn that into a DataError that says
which annotations are missing, from the load counts (coco.load_coco_json's
stats) and the annotation files. Only annotations are read, never an image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import tensorflow as tf

from unified_seq.data.errors import DataError
from unified_seq.tasks.task import Task

# The annotation file (coco.KINDS) each kind of annotation (task.ANNOTATIONS) comes from.
KIND_FILES = {
    "boxes": "instances",
    "polygons": "instances",
    "keypoints": "person_keypoints",
    "captions": "captions",
}


def usable_counts(tasks: Mapping[str, Task], examples: tf.data.Dataset) -> dict[str, int]:
    """Images of `examples` each task can train on, counted in one pass over the annotations."""
    names = list(tasks)
    if not names:
        return {}

    def flags(example):
        return tf.stack([tf.cast(tasks[n].has_training_target(example), tf.int64) for n in names])

    ds = examples.map(flags, num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
    totals = ds.reduce(tf.zeros([len(names)], tf.int64), lambda acc, f: acc + tf.reduce_sum(f, 0))
    return dict(zip(names, (int(n) for n in totals.numpy()), strict=True))


def has_any(targets: tf.data.Dataset) -> bool:
    """Whether a dataset yields anything; reads up to its first element."""
    return bool(targets.take(1).reduce(tf.constant(0), lambda count, _: count + 1) > 0)


def _missing_file(kind: str, files: Mapping[str, str]) -> str:
    path = files.get(KIND_FILES[kind], "")
    if path and not tf.io.gfile.exists(path):
        return f" ({path} does not exist)"
    return ""


def no_target_reason(task: Task, stats: Mapping[str, int], files: Mapping[str, str]) -> str:
    """Why no image of a split can train `task`, from the split's load counts.

    Args:
      task: the task.
      stats: the split's counts (coco.load_coco_json, inputs.load_split);
        a count that is absent is not used.
      files: annotation kind (coco.KINDS) → the path it is read from.
    """
    kinds = task.annotations
    reasons = []
    if "keypoints" in kinds and stats.get("with_keypoints", -1) == 0:
        reasons.append("no instance has labelled keypoints" + _missing_file("keypoints", files))
    if "polygons" in kinds and stats.get("with_masks", -1) == 0:
        dropped = stats.get("dropped_polygons", 0)
        shorter = f"; {dropped} shorter or broken polygons were dropped" if dropped else ""
        reasons.append(
            "no instance has a polygon of >= 3 points" + shorter + _missing_file("polygons", files)
        )
    if "captions" in kinds and stats.get("captions", -1) == 0:
        empty = stats.get("empty_captions", 0)
        blank = f"; {empty} empty captions were dropped" if empty else ""
        reasons.append(
            "no image has a non-empty caption" + blank + _missing_file("captions", files)
        )
    if "boxes" in kinds and stats.get("objects", -1) - stats.get("crowd", 0) == 0:
        dropped = stats.get("dropped_boxes/empty", 0) + stats.get("dropped_boxes/outside", 0)
        lost = f"; {dropped} boxes without area in the image were dropped" if dropped else ""
        reasons.append("no object outside crowd regions" + lost + _missing_file("boxes", files))
    if not reasons:
        reasons.append(
            f"no image passes its has_training_target; check config.tasks.{task.name} "
            "against the annotations (e.g. class ids)"
        )
    return "; ".join(reasons)


def no_target_error(
    tasks: Sequence[Task], stats: Mapping[str, int], files: Mapping[str, str]
) -> DataError:
    """The DataError of tasks that no image of the split can train, each with its reason."""
    kinds = sorted({KIND_FILES[a] for task in tasks for a in task.annotations})
    paths = [files[k] for k in kinds if k in files]
    where = os.path.dirname(paths[0]) if paths else "training split"
    problems = [
        f"{task.name}: no image can train this task: {no_target_reason(task, stats, files)}"
        for task in tasks
    ]
    names = ", ".join(f"config.tasks.{task.name}" for task in tasks)
    return DataError(
        where, " | ".join(problems), f"add the annotations they need, or remove {names}"
    )
