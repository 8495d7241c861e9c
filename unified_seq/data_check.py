"""`--mode data`: build every task's training input, time it, and draw it.

The pictures are made from the *tokens* the model is trained on, decoded back
with the task codecs, so they show exactly what a model will be taught:
a wrong bin, axis or class shows up as a misplaced box or point.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import tensorflow as tf
from absl import logging

from unified_seq import train, visualize, vocab
from unified_seq.data import inputs, pipeline
from unified_seq.tasks import build_tasks
from unified_seq.tasks.task import Labels, Task


def preview(task: Task, batch: dict, labels: Labels, count: int = 8):
    """Pictures of the first `count` examples of a training batch, from their target tokens."""
    pictures = [
        task.preview({k: v[i] for k, v in batch.items()}, labels)
        for i in range(min(count, len(batch["image"])))
    ]
    return visualize.grid(pictures, columns=4)


def run(config: Any, workdir: str, num_batches: int = 5) -> dict:
    """Builds each task's training pipeline, measures it, writes previews.

    Returns:
      per task: batch shapes, examples per second, truncation counts.
    """
    tasks = build_tasks(config)
    space = vocab.TokenSpace.from_config(config.vocab)
    start = time.perf_counter()
    data = inputs.load_split(config, config.data.train_split, space, workdir=workdir)
    inputs.check_task_examples(config, data, tasks)
    logging.info(
        "Loaded %d training images in %.1f s: %s",
        data.num_images,
        time.perf_counter() - start,
        data.stats,
    )
    out_dir = os.path.join(workdir, "data_preview")
    tf.io.gfile.makedirs(out_dir)
    summary = {"images": data.num_images, "stats": data.stats, "tasks": {}}
    batch_sizes = train.task_batch_sizes(config)
    for name, task in tasks.items():
        batch_size = batch_sizes[name]
        ds = pipeline.train_dataset(
            task, data.examples, data, config, batch_size=batch_size, seed=config.seed
        )
        batches = inputs.numpy_batches(ds, data)
        first = next(batches)
        tic = time.perf_counter()
        truncated = 0
        for _ in range(num_batches):
            batch = next(batches)
            # Objects (detection) or polygon points (segmentation) cut to fit.
            counts = [v for k, v in batch.items() if k.startswith("num_truncated")]
            truncated += sum(int(v.sum()) for v in counts)
        rate = num_batches * batch_size / (time.perf_counter() - tic)
        path = os.path.join(out_dir, f"{name}.png")
        visualize.save_png(preview(task, first, data), path)
        shapes = {k: list(v.shape) for k, v in first.items()}
        summary["tasks"][name] = {
            "examples_per_s": round(rate, 1),
            "shapes": shapes,
            "truncated_in_sample": truncated,
        }
        print(f"{name:24s} {rate:8.1f} examples/s  {shapes}  preview: {path}", flush=True)
    with tf.io.gfile.GFile(os.path.join(workdir, "data_summary.json"), "w") as f:
        f.write(json.dumps(summary, indent=2, default=str))
    return summary
