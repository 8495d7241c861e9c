"""tf.data pipelines, one per task: decode → the task's examples → batch.

Input is a dataset of TF examples (unified_seq/data/example.py, as tensors,
plus `captions/ids`). The task object decides everything task-specific
(tasks/task.py): which images it trains on, how an image visit becomes
training examples, and which evaluation examples an image gives. Training
pipelines shard by process, shuffle, repeat and augment; evaluation pipelines
keep the order and carry the `frame` that maps predictions back to original
pixels.

Determinism: every random choice is stateless, seeded by
`(seed, example counter)`, so a pipeline with a given seed yields the same
batches whatever the parallelism.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from unified_seq.data import checks, image_decode, views
from unified_seq.tasks.task import Labels, Task

AUTOTUNE = tf.data.AUTOTUNE


def _options(config: Any) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # A saved iterator holds where it is in the data (and the shuffle buffer of
    # annotations), not the decoded images in flight: at COCO shapes those are
    # gigabytes per checkpoint (benchmarks/input_state.py).
    options.experimental_symbolic_checkpoint = True
    options.experimental_optimization.map_parallelization = True
    threads = int(config.data.get("threads", 0))
    if threads:
        options.threading.private_threadpool_size = threads
    return options


def _max_pixels(config: Any) -> int:
    return int(config.data.get("max_image_pixels", image_decode.DEFAULT_MAX_PIXELS))


def train_dataset(
    task: Task,
    examples: tf.data.Dataset,
    labels: Labels,
    config: Any,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """Endless batches of augmented, tokenized examples of one task.

    The order of image visits (shuffle, repeat, augmentation seeds) is drawn
    the same way on every process, over the whole split: it costs only
    annotations. Process i of n then decodes and augments only the visits
    that fill its rows of each global batch, so a step's global batch is the
    same for any number of processes (exactly so when a visit gives one
    example; tasks that crop every instance of an image give a varying count).

    Args:
      task: the task.
      examples: TF examples of the whole split (not sharded).
      labels: the split's category map and tokenizer.
      config: run config (`data` block).
      batch_size: examples per batch on this process (the global batch / n).
      seed: pipeline seed.
      process_index, process_count: this process's rows of the global batch.

    Returns:
      dataset of dicts: `image` float32[B, S, S, 3], `input_seq`,
      `target_seq` int32[B, *task.sequence_shape], `token_weights`, and the
      task's `num_truncated*` counts.

    Raises:
      DataError: no image of `examples` can train the task (it would never
        yield a batch); found by reading annotations up to the first usable one.
    """
    ds = examples.filter(task.has_training_target)
    if not checks.has_any(ds):
        raise checks.no_target_error(
            [task], getattr(labels, "stats", {}), getattr(labels, "annotation_files", {})
        )
    ds = ds.shuffle(int(config.data.shuffle_buffer), seed=seed)
    ds = ds.repeat()
    seeds = tf.data.Dataset.random(seed=seed * 1000003).batch(2)
    ds = tf.data.Dataset.zip(ds, seeds)
    if process_count > 1:
        # Visit k fills row k mod (n·B) of a global batch; rows i·B … i·B+B-1 are ours.
        rows = batch_size * process_count
        ds = ds.enumerate().filter(lambda k, _: (k % rows) // batch_size == process_index)
        ds = ds.map(lambda _, visit: visit)
    max_pixels = _max_pixels(config)
    ds = ds.map(
        lambda visit, s: task.train_examples(
            visit, views.decode_image(visit, max_pixels), tf.cast(s, tf.int64), labels
        ),
        num_parallel_calls=int(config.data.num_parallel_calls),
    )
    # A visit yields one example, or one per instance for tasks that crop.
    ds = ds.unbatch()
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.prefetch(int(config.data.prefetch))
    return ds.with_options(_options(config))


def attach_detections(
    examples: tf.data.Dataset, detections: dict[int, dict], max_examples: int = 0
) -> tf.data.Dataset:
    """Adds `detections/{bbox,class,score}` (pixels) to each example by image id.

    Tasks that take boxes then prompt with these instead of the ground truth.

    Args:
      examples: TF examples in their evaluation order.
      detections: image id → {"boxes": float[M, 4] (ymin, xmin, ymax, xmax)
        pixels, "classes": int[M] class ids, "scores": float[M]}; images
        without an entry get none.
      max_examples: as in `eval_dataset`.
    """
    ids = examples.map(lambda ex: ex["image/id"])
    if max_examples:
        ids = ids.take(max_examples)
    order = [int(i) for i in ids.as_numpy_iterator()]
    empty = {"boxes": np.zeros([0, 4], np.float32), "classes": np.zeros([0], np.int32),
             "scores": np.zeros([0], np.float32)}  # fmt: skip
    rows = [detections.get(i, empty) for i in order]

    def ragged(key, dtype, inner=None):
        values = [
            np.asarray(r[key], dtype).reshape([-1] + ([inner] if inner else [])) for r in rows
        ]
        flat = (
            np.concatenate(values) if values else np.zeros([0] + ([inner] if inner else []), dtype)
        )
        return tf.RaggedTensor.from_row_lengths(flat, [len(v) for v in values])

    det = tf.data.Dataset.from_tensor_slices(
        {
            "detections/bbox": ragged("boxes", np.float32, 4),
            "detections/class": ragged("classes", np.int32),
            "detections/score": ragged("scores", np.float32),
        }
    )
    if max_examples:
        examples = examples.take(max_examples)
    return tf.data.Dataset.zip(examples, det).map(lambda ex, d: {**ex, **d})


def eval_dataset(
    task: Task,
    examples: tf.data.Dataset,
    labels: Labels,
    config: Any,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_examples: int = 0,
) -> tf.data.Dataset:
    """Evaluation batches of one task, in source order, last batch partial.

    Each image gives the task's `eval_examples`: one per image (detection,
    captioning) or one per instance to prompt, each with `image`, `prompt`,
    `frame` float32[4] and the ids its results need.
    """
    ds = examples
    if max_examples:
        # Examples with attached detections were already cut to max_examples.
        ds = ds.take(max_examples)
    ds = ds.shard(process_count, process_index)
    max_pixels = _max_pixels(config)
    ds = ds.map(
        lambda ex: task.eval_examples(ex, views.decode_image(ex, max_pixels), labels),
        num_parallel_calls=AUTOTUNE,
    )
    ds = ds.unbatch()
    ds = ds.batch(batch_size).prefetch(int(config.data.prefetch))
    return ds.with_options(_options(config))
