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

import numpy as np
from absl import logging

from unified_seq import visualize, vocab
from unified_seq.data import inputs, pipeline
from unified_seq.tasks import captioning, detection, instance_segmentation, keypoints


def _canvas_frame(size: int) -> np.ndarray:
    """Frame mapping normalised coordinates to canvas pixels."""
    return np.array([size, size, 0, 0], np.float32)


def preview(
    task: str, batch: dict, config: Any, space: vocab.TokenSpace, tokenizer: Any, count: int = 8
):
    """Pictures of the first `count` examples of a training batch, from their target tokens."""
    cfg = config.tasks[task]
    frame = _canvas_frame(int(config.data.image_size))
    pictures = []
    for i in range(min(count, len(batch["image"]))):
        image = batch["image"][i]
        target = batch["target_seq"][i]
        if task == "object_detection":
            pred = detection.decode(target, None, frame, space, cfg)
            names = [str(c) for c in pred["classes"]]
            pic = visualize.draw(image, pred["boxes"], names, pred["classes"])
        elif task == "instance_segmentation":
            polys = instance_segmentation.decode_polygons(target[5:], frame, space)
            pic = visualize.draw(image, polygons=[polys])
        elif task == "keypoint_detection":
            pred = keypoints.decode(target[5:], None, frame, space, cfg)
            pic = visualize.draw(image, keypoints=pred["keypoints"][None])
        else:
            text = captioning.decode(target[0], tokenizer, space)
            pic = visualize.draw(image, caption=text)
        pictures.append(pic)
    return visualize.grid(pictures, columns=4)


def run(config: Any, workdir: str, num_batches: int = 5) -> dict:
    """Builds each task's training pipeline, measures it, writes previews.

    Returns:
      per task: batch shapes, examples per second, truncation counts.
    """
    space = vocab.TokenSpace.from_config(config.vocab)
    start = time.perf_counter()
    data = inputs.load_split(config, config.data.train_split, space)
    logging.info(
        "Loaded %d training images in %.1f s: %s",
        data.num_images,
        time.perf_counter() - start,
        data.stats,
    )
    flip_perm = data.category_map.flip_permutation(int(config.data.num_keypoints))
    out_dir = os.path.join(workdir, "data_preview")
    os.makedirs(out_dir, exist_ok=True)
    summary = {"images": data.num_images, "stats": data.stats, "tasks": {}}
    batch_size = int(config.train.batch_size)
    for task in config.tasks:
        ds = pipeline.train_dataset(
            task, data.examples, config, space, batch_size=batch_size, seed=config.seed,
            flip_perm=flip_perm,
        )  # fmt: skip
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
        path = os.path.join(out_dir, f"{task}.png")
        preview(task, first, config, space, data.tokenizer).save(path)
        shapes = {k: list(v.shape) for k, v in first.items()}
        summary["tasks"][task] = {
            "examples_per_s": round(rate, 1),
            "shapes": shapes,
            "truncated_in_sample": truncated,
        }
        print(f"{task:24s} {rate:8.1f} examples/s  {shapes}  preview: {path}", flush=True)
    with open(os.path.join(workdir, "data_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return summary
