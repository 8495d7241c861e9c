"""Evaluation: sample every task's answers, turn them into results, score them.

For each configured task (tasks/task.py): its evaluation examples go through
the model in batches (`predictor.Predictor`, with the task's sampler options), the
task turns the sampled tokens into COCO-format results and scores them
against the split's ground truth. Tasks that give boxes (detection) run
first; with `eval.prompt_boxes=detections`, tasks that take boxes
(segmentation, keypoints) are then prompted by those detections instead of
the ground-truth boxes.

Writes `WORKDIR/<task>_results.json` (COCO result format, original pixels and
dataset category ids) and `WORKDIR/eval_results.json` (DESIGN §7).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from absl import logging
from clu import metric_writers
from jax.experimental import multihost_utils

from unified_seq import coco_metrics, progress, sharding, vocab
from unified_seq.data import inputs, pipeline
from unified_seq.predictor import Predictor, sampling_seed, task_key
from unified_seq.tasks import build_tasks
from unified_seq.tasks.task import Task

PROMPT_BOXES = ("gt", "detections")

# (task, batch, task key) → sampled answers of the batch (Predictor.sample).
SampleFn = Callable[[Task, dict[str, np.ndarray], jax.Array], dict[str, np.ndarray]]


def eval_batch_size(config: Any, rows_multiple: int = 1) -> int:
    """This process's evaluation batch: `eval.batch_size` (global) split over the
    processes, rounded up to a multiple of its devices."""
    size = max(1, -(-int(config.eval.batch_size) // jax.process_count()))
    rounded = -(-size // rows_multiple) * rows_multiple
    if rounded != size:
        logging.warning(
            "eval.batch_size=%s gives %d rows per process; rounded up to %d to split over "
            "its %d devices",
            config.eval.batch_size,
            size,
            rounded,
            rows_multiple,
        )
    return rounded


def padded(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads a partial last batch to `size` rows (one compile for every batch)."""
    n = len(batch["image"])
    if n == size:
        return batch
    return {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in batch.items()}


def _filler(task: Task, config: Any, size: int) -> dict[str, np.ndarray]:
    """A batch of `size` blank rows, for a process whose shard ran out first."""
    side = int(config.data.image_size)
    return {
        "image": np.zeros([size, side, side, 3], np.float32),
        "prompt": np.full([size, task.prompt_length], task.prompt_token, np.int32),
    }


def _in_step(batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray] | None]:
    """This process's batches, then None until every process has run out.

    Sampling is a collective over all devices, so every process must call it
    equally often: shards with fewer examples pad with blank batches instead
    of leaving the others waiting forever.
    """
    for batch in batches:
        if jax.process_count() > 1:
            multihost_utils.process_allgather(np.ones([], np.int32))
        yield batch
    if jax.process_count() == 1:
        return
    while multihost_utils.process_allgather(np.zeros([], np.int32)).any():
        yield None


def _trimmed(samples: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The first `rows` rows of every per-row sampler output."""
    return {k: v[:rows] if np.ndim(v) else v for k, v in samples.items()}


def eval_batches(
    task: Task,
    data: inputs.SplitData,
    config: Any,
    detections: dict | None = None,
    batch_size: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's evaluation batches of `task` as numpy (the last one partial).

    Args:
      detections: image id → boxes, classes, scores (`pipeline.attach_detections`)
        to prompt a task that takes boxes; None: ground-truth boxes.
      batch_size: rows per batch; default: this process's share of eval.batch_size.
    """
    max_examples = int(config.eval.max_examples)
    examples = data.examples
    if detections is not None:
        examples = pipeline.attach_detections(examples, detections, max_examples)
        max_examples = 0
    ds = pipeline.eval_dataset(
        task,
        examples,
        data,
        config,
        batch_size=batch_size or eval_batch_size(config),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        max_examples=max_examples,
    )
    yield from inputs.numpy_batches(ds, data)


def task_results(
    task: Task,
    data: inputs.SplitData,
    config: Any,
    sample: SampleFn,
    rng: jax.Array,
    detections: dict | None = None,
    rows_multiple: int = 1,
    images: int = 0,
) -> list[dict]:
    """Every process's results of `task` (each samples its own shard of the split).

    `rows_multiple`: a process's batch must be a multiple of it (its devices).
    `images`: how many images the split holds, for the progress lines' ETA.
    """
    per_example = task.sampler_options(data).num_samples
    size = eval_batch_size(config, rows_multiple)
    results = []
    # Progress in images, the unit every task shares (segmentation and
    # keypoints sample several instances of one image).
    meter = progress.Meter(f"eval {task.name}", -(-images // jax.process_count()), "images")
    seen: set[int] = set()
    batches = eval_batches(task, data, config, detections, batch_size=size)
    for batch in _in_step(batches):
        if batch is None:
            sample(task, _filler(task, config, size), rng)
            continue
        n = len(batch["image"])
        samples = sample(task, padded(batch, size), rng)
        results += task.results(batch, _trimmed(samples, n * per_example), data)
        # A task of one's own may carry no image ids: then rows stand in.
        ids = batch.get("image/id", range(len(seen), len(seen) + n))
        seen.update(int(i) for i in ids)
        meter.update(len(seen))
    return _gather(results)


def detections_by_image(results: list[dict], category_map: Any) -> dict[int, dict]:
    """COCO `bbox` results → image id → boxes (ymin, xmin, ymax, xmax pixels), classes, scores."""
    rows: dict[int, list[dict]] = {}
    for r in results:
        rows.setdefault(int(r["image_id"]), []).append(r)
    out = {}
    for image_id, dets in rows.items():
        xywh = np.array([d["bbox"] for d in dets], np.float32).reshape(-1, 4)
        out[image_id] = {
            "boxes": np.stack(
                [xywh[:, 1], xywh[:, 0], xywh[:, 1] + xywh[:, 3], xywh[:, 0] + xywh[:, 2]], 1
            ),
            "classes": category_map.to_class(np.array([d["category_id"] for d in dets])),
            "scores": np.array([d["score"] for d in dets], np.float32),
        }
    return out


def check_prompt_boxes(config: Any, tasks: Mapping[str, Task]) -> None:
    """Raises ValueError when `eval.prompt_boxes` cannot be honoured by these tasks."""
    choice = config.eval.prompt_boxes
    if choice not in PROMPT_BOXES:
        raise ValueError(f"config.eval.prompt_boxes={choice!r}; choose one of {PROMPT_BOXES}")
    takers = [n for n, t in tasks.items() if t.takes_boxes]
    if choice == "detections" and takers and not any(t.gives_boxes for t in tasks.values()):
        raise ValueError(
            f"config.eval.prompt_boxes=detections: {takers} would be prompted by detections, but "
            "no configured task gives boxes; add object_detection to config.tasks or use "
            "eval.prompt_boxes=gt"
        )


def evaluate_tasks(
    tasks: Mapping[str, Task],
    data: inputs.SplitData,
    config: Any,
    sample: SampleFn,
    seed: int,
    workdir: str | None = None,
    rows_multiple: int = 1,
) -> dict[str, Any]:
    """Evaluates `tasks` on `data`: results files (with a workdir) and scores.

    Tasks that give boxes go first, so that with `eval.prompt_boxes=detections`
    their results prompt the tasks that take boxes.

    Args:
      tasks: the tasks by name.
      data: the evaluation split.
      config: run config (`eval`, `data` blocks).
      sample: draws the answers of a batch (`Predictor.sample`).
      seed: task t samples with `predictor.task_key(seed, t)`.
      workdir: where process 0 writes `<task>_results.json`; None: nowhere.
      rows_multiple: a process's batch must be a multiple of this
        (`Predictor.rows_multiple`).

    Returns:
      task name → its scores.
    """
    check_prompt_boxes(config, tasks)
    image_ids = data.examples.map(lambda ex: ex["image/id"])
    if int(config.eval.max_examples):
        image_ids = image_ids.take(int(config.eval.max_examples))
    ids = [int(i) for i in image_ids.as_numpy_iterator()]
    truth = coco_metrics.GroundTruth(inputs.coco_dir(config), config.data.eval_split, ids)
    use_detections = config.eval.prompt_boxes == "detections"
    detections = None
    report = {}
    for name in sorted(tasks, key=lambda n: not tasks[n].gives_boxes):
        task = tasks[name]
        tic = time.perf_counter()
        prompts = detections if task.takes_boxes and use_detections else None
        results = task_results(
            task, data, config, sample, task_key(seed, task), prompts, rows_multiple, len(ids)
        )
        if task.gives_boxes and detections is None:
            detections = detections_by_image(results, data.category_map)
        if workdir is not None and jax.process_index() == 0:
            with tf.io.gfile.GFile(os.path.join(workdir, f"{name}_results.json"), "w") as f:
                json.dump(results, f)
        report[name] = task.metric(results, truth)
        seconds = time.perf_counter() - tic
        progress.say(f"eval {name}: {json.dumps(report[name])} in {seconds:.1f} s")
    return report


def evaluate(
    config: Any,
    workdir: str | None,
    params: Any,
    model: Any,
    step: int,
    read_from: str | None = None,
) -> dict:
    """Evaluates every configured task; writes result files and eval_results.json.

    Args:
      workdir: where the files go; None writes nothing (a read-only run).
      read_from: the run's folder (its tokenizer), when not `workdir`.
    """
    if config.data.source == "tfds":
        raise ValueError(
            "evaluation reads COCO JSON ground truth: use data.source=coco_json (tfds coco/2017 "
            "has no masks, keypoints or captions to score against)"
        )
    tasks = build_tasks(config)
    space = vocab.TokenSpace.from_config(config.vocab)
    data = inputs.load_split(config, config.data.eval_split, space, workdir=read_from or workdir)
    predictor = Predictor(model, params, sharding.mesh_from_config(config), labels=data)
    tic = time.perf_counter()
    scores = evaluate_tasks(
        tasks, data, config, predictor.sample, sampling_seed(config), workdir,
        predictor.rows_multiple,
    )  # fmt: skip
    report: dict[str, Any] = {"step": int(step), **scores}
    report["seconds"] = round(time.perf_counter() - tic, 1)
    if workdir is not None and jax.process_index() == 0:
        with tf.io.gfile.GFile(os.path.join(workdir, "eval_results.json"), "w") as f:
            json.dump(report, f, indent=2)
        # Every evaluation of the run, one JSON line each: the learning curve.
        # Rewritten whole: cloud storage cannot append.
        history = os.path.join(workdir, "eval_history.jsonl")
        lines = tf.io.gfile.GFile(history).read() if tf.io.gfile.exists(history) else ""
        line = json.dumps({**report, "wall_time": round(time.time(), 1)})
        with tf.io.gfile.GFile(history, "w") as f:
            f.write(lines + line + "\n")
        write_scalars(workdir, report)
    logging.info("Evaluation at step %d: %s", step, report)
    return report


def metric_scalars(report: Mapping[str, Any]) -> dict[str, float]:
    """`{"object_detection": {"AP": x}}` → `{"object_detection/AP": x}`: each task's metrics."""
    return {
        f"{task}/{name}": float(value)
        for task, metrics in report.items()
        if isinstance(metrics, Mapping)
        for name, value in metrics.items()
        if isinstance(value, int | float)
    }


def write_scalars(workdir: str, report: Mapping[str, Any]) -> None:
    """Adds the report's metrics at its step to TensorBoard, in the run's `eval` folder.

    Beside the training losses (the run's own folder), one chart per task and
    metric shows which task lags while the run goes on (`train.eval_every`).
    """
    writer = metric_writers.create_default_writer(os.path.join(workdir, "eval"))
    writer.write_scalars(int(report["step"]), metric_scalars(report))
    writer.close()


def _gather(results: list[dict]) -> list[dict]:
    """Every process's results, on every process (each evaluated its own shard)."""
    if jax.process_count() == 1:
        return results
    blob = np.frombuffer(json.dumps(results).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([blob.size]))
    padded = np.zeros([int(sizes.max())], np.uint8)
    padded[: blob.size] = blob
    blobs = multihost_utils.process_allgather(padded)
    merged = []
    for row, size in zip(blobs, sizes.reshape(-1), strict=True):
        merged += json.loads(bytes(row[: int(size)]).decode())
    return merged
