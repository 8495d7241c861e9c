"""tf.data pipelines, one per task: decode → augment → tokenize → batch.

Input is a dataset of TF examples (unified_seq/data/example.py, as tensors,
plus `captions/ids` for captioning). Training pipelines shard by process,
shuffle, repeat and augment; evaluation pipelines keep the order, resize to
fit, and carry the `frame` that maps predictions back to original pixels.

Determinism: every random choice is stateless, seeded by
`(seed, example counter)`, so a pipeline with a given seed yields the same
batches whatever the parallelism.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from unified_seq import vocab
from unified_seq.data import transforms
from unified_seq.tasks import captioning, detection, instance_segmentation, keypoints, prompts

AUTOTUNE = tf.data.AUTOTUNE


def decode_image(example: dict) -> tf.Tensor:
    """float32[h, w, 3] in [0, 1] from `image/encoded` or `image/filename`."""
    data = tf.cond(
        tf.strings.length(example["image/encoded"]) > 0,
        lambda: example["image/encoded"],
        lambda: tf.io.read_file(example["image/filename"]),
    )
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image = tf.ensure_shape(image, [None, None, 3])
    return tf.image.convert_image_dtype(image, tf.float32)


def _normalised(example: dict, image: tf.Tensor) -> dict:
    """Pixel annotations → coordinates normalised to the decoded image."""
    hw = transforms.image_hw(image)
    kp = example["objects/keypoints"]
    return {
        "boxes": example["objects/bbox"] / tf.tile(hw, [2]),
        "keypoints": tf.concat([kp[..., :2] / hw, kp[..., 2:]], axis=-1),
        "polygons": example["objects/polygons"] / hw,
    }


def _target_objects(example: dict) -> tf.Tensor:
    """bool[N]: objects that may be targets (not crowd, positive box)."""
    return tf.logical_not(example["objects/is_crowd"]) & transforms.valid_boxes(
        example["objects/bbox"]
    )


def _candidates(task: str, example: dict, cfg: Any) -> tf.Tensor:
    """bool[N]: the instances a per-instance task can prompt with."""
    ok = _target_objects(example)
    if task == "instance_segmentation":
        return ok & (example["objects/polygons"].row_lengths() > 0)
    person = example["objects/class"] == cfg.person_class
    labelled = tf.reduce_any(example["objects/keypoints"][..., 2] > 0, axis=-1)
    return ok & person & labelled


def _frame(region: tf.Tensor, unpadded: tf.Tensor, size: int) -> tf.Tensor:
    """TF twin of `frame.make_frame`: float32[4] canvas → original pixels."""
    return tf.concat([size * region[2:] / unpadded, region[:2]], axis=0)


def _augment(f: dict, seeds: tf.Tensor, cfg: Any, size: int, flip_perm: Any) -> dict:
    """Scale jitter, random crop and (optionally) flip; seeds int32[3, 2]."""
    f = transforms.scale_jitter(f, seeds[0], size, *cfg.scale_jitter)
    f = transforms.random_crop(f, seeds[1], size)
    if cfg.flip:
        f = transforms.random_horizontal_flip(f, seeds[2], flip_perm)
    return f


def _pick(candidates: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Index of one uniformly chosen True entry of a non-empty bool[N]."""
    idx = tf.where(candidates)[:, 0]
    j = tf.random.stateless_uniform([], seed, 0, tf.shape(idx)[0], dtype=tf.int32)
    return tf.cast(idx[j], tf.int32)


def _train_example(task: str, example: dict, seed: tf.Tensor, ctx: dict) -> dict:
    """One augmented, tokenized training example of `task`."""
    cfg, space, size = ctx["cfg"], ctx["space"], ctx["size"]
    seeds = tf.random.experimental.stateless_split(seed, 6)
    image = decode_image(example)
    if task == "object_detection":
        keep = _target_objects(example)
        boxes = example["objects/bbox"] / tf.tile(transforms.image_hw(image), [2])
        f = {"image": image, "boxes": tf.boolean_mask(boxes, keep)}
        classes = tf.boolean_mask(example["objects/class"], keep)
        f["class"] = classes
        f = _augment(f, seeds[:3], cfg, size, None)
        valid = transforms.valid_boxes(f["boxes"])
        f = transforms.pad_to_square(f, size, ctx["pad_value"])
        seq = detection.encode(
            tf.boolean_mask(f["boxes"], valid),
            tf.boolean_mask(f["class"], valid),
            seeds[3],
            cfg,
            space,
            training=True,
            # Noise boxes stay inside the image, not on the padding.
            extent=f["unpadded_size"] / size,
        )
        return {"image": f["image"], **seq}
    if task == "captioning":
        f = _augment({"image": image}, seeds[:3], cfg, size, None)
        if cfg.color_jitter > 0:
            f["image"] = transforms.color_jitter(f["image"], seeds[4], cfg.color_jitter)
        f = transforms.pad_to_square(f, size, ctx["pad_value"])
        seq = captioning.encode(example["captions/ids"], seeds[3], cfg, space, training=True)
        return {"image": f["image"], **seq}
    # Only the per-instance tasks need polygons and keypoints normalised.
    norm = _normalised(example, image)
    i = _pick(_candidates(task, example, cfg), seeds[5])
    cls = example["objects/class"][i]
    f = {"image": image, "boxes": norm["boxes"][i][None]}
    if task == "instance_segmentation":
        f["points"] = norm["polygons"][i]
    else:
        f["keypoints"] = norm["keypoints"][i]
    if cfg.crop_to_box:
        f = transforms.crop_to_box(f, f["boxes"][0], cfg.crop_scale)
        del f["region"]
    f = _augment(f, seeds[:3], cfg, size, ctx["flip_perm"])
    f = transforms.pad_to_square(f, size, ctx["pad_value"])
    box = f["boxes"][0]
    if task == "instance_segmentation":
        seq = instance_segmentation.encode(
            box, cls, f["points"], seeds[3], cfg, space, training=True
        )
    else:
        seq = keypoints.encode(box, cls, f["keypoints"], seeds[3], cfg, space, training=True)
    return {"image": f["image"], **seq}


def _has_training_target(task: str, cfg: Any):
    def predicate(example: dict) -> tf.Tensor:
        if task == "object_detection":
            # Official: images without objects are not trained for detection.
            return tf.reduce_any(_target_objects(example))
        if task == "captioning":
            return tf.size(example["captions/ids"].flat_values) > 0
        return tf.reduce_any(_candidates(task, example, cfg))

    return predicate


def _context(task: str, config: Any, space: vocab.TokenSpace, flip_perm: Any) -> dict:
    return {
        "cfg": config.tasks[task],
        "space": space,
        "size": int(config.data.image_size),
        "pad_value": float(config.data.pad_value),
        "flip_perm": None if flip_perm is None else tf.constant(flip_perm, tf.int32),
    }


def _options(config: Any) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    threads = int(config.data.get("threads", 0))
    if threads:
        options.threading.private_threadpool_size = threads
    return options


def train_dataset(
    task: str,
    examples: tf.data.Dataset,
    config: Any,
    space: vocab.TokenSpace,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    flip_perm: Any = None,
) -> tf.data.Dataset:
    """Endless batches of augmented, tokenized examples of one task.

    Args:
      task: task name (a key of `config.tasks`).
      examples: TF examples of the whole split (not sharded).
      config: run config (`data` and `tasks` blocks).
      space: token space.
      batch_size: examples per batch on this process.
      seed: pipeline seed; the process index is folded in.
      process_index, process_count: this host's slice of the data.
      flip_perm: int[K] keypoint left/right permutation for flips.

    Returns:
      dataset of dicts: `image` float32[B, S, S, 3], `input_seq`,
      `target_seq` int32[B, L] (captioning [B, C, L]), `token_weights`.
    """
    ctx = _context(task, config, space, flip_perm)
    ds = examples.shard(process_count, process_index)
    ds = ds.filter(_has_training_target(task, ctx["cfg"]))
    ds = ds.shuffle(int(config.data.shuffle_buffer), seed=seed + 7919 * process_index)
    ds = ds.repeat()
    seeds = tf.data.Dataset.random(seed=seed * 1000003 + process_index).batch(2)
    ds = tf.data.Dataset.zip(ds, seeds)
    ds = ds.map(
        lambda ex, s: _train_example(task, ex, tf.cast(s, tf.int64), ctx),
        num_parallel_calls=int(config.data.num_parallel_calls),
    )
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.prefetch(int(config.data.prefetch))
    return ds.with_options(_options(config))


def _eval_view(image: tf.Tensor, region: tf.Tensor, size: int, pad_value: float) -> tuple:
    """Resizes `image` to fit the canvas and pads it; returns (canvas, frame)."""
    f = transforms.resize_to_fit({"image": image}, size)
    f = transforms.pad_to_square(f, size, pad_value)
    return f["image"], _frame(region, f["unpadded_size"], size)


def _eval_image_example(example: dict, ctx: dict) -> dict:
    image = decode_image(example)
    hw = transforms.image_hw(image)
    canvas, frame = _eval_view(image, tf.concat([[0.0, 0.0], hw], 0), ctx["size"], ctx["pad_value"])
    return {
        "image": canvas,
        "frame": frame,
        "image/id": example["image/id"],
        "image/size": tf.cast(hw, tf.int32),
    }


def _eval_instance_examples(task: str, example: dict, ctx: dict) -> tf.data.Dataset:
    """One example per instance to prompt: ground truth, or detections when given."""
    cfg, space, size = ctx["cfg"], ctx["space"], ctx["size"]
    image = decode_image(example)
    hw = transforms.image_hw(image)
    boxes = example["objects/bbox"] / tf.tile(hw, [2])
    if "detections/bbox" in example:
        boxes = example["detections/bbox"] / tf.tile(hw, [2])
        classes = example["detections/class"]
        scores = example["detections/score"]
        ids = tf.zeros_like(classes, tf.int64)
        keep = transforms.valid_boxes(example["detections/bbox"])
        if task == "keypoint_detection":
            keep &= classes == cfg.person_class
    else:
        classes = example["objects/class"]
        scores = tf.ones_like(example["objects/area"])
        ids = example["objects/id"]
        keep = _candidates(task, example, cfg)
    pixel_boxes = boxes * tf.tile(hw, [2])
    idx = tf.cast(tf.where(keep)[:, 0], tf.int32)

    def one(i):
        f = {"image": image, "boxes": boxes[i][None]}
        region = tf.concat([[0.0, 0.0], hw], 0)
        if cfg.crop_to_box:
            f = transforms.crop_to_box(f, f["boxes"][0], cfg.crop_scale)
            region = f.pop("region")
        f = transforms.resize_to_fit(f, size)
        f = transforms.pad_to_square(f, size, ctx["pad_value"])
        prompt = prompts.build_prompt(vocab.TASK_PROMPTS[task], f["boxes"][0], classes[i], space)
        return {
            "image": f["image"],
            "frame": _frame(region, f["unpadded_size"], size),
            "prompt": tf.cast(prompt, tf.int32),
            "prompt_box": f["boxes"][0],
            "class": classes[i],
            "score": tf.cast(scores[i], tf.float32),
            "box": pixel_boxes[i],
            "object/id": ids[i],
            "image/id": example["image/id"],
            "image/size": tf.cast(hw, tf.int32),
        }

    return tf.data.Dataset.from_tensor_slices(idx).map(one)


def attach_detections(
    examples: tf.data.Dataset, detections: dict[int, dict], max_examples: int = 0
) -> tf.data.Dataset:
    """Adds `detections/{bbox,class,score}` (pixels) to each example by image id.

    Args:
      examples: TF examples in their evaluation order.
      detections: image id → {"boxes": float[M, 4] pixels, "classes": int[M],
        "scores": float[M]}; images without an entry get none.
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
    task: str,
    examples: tf.data.Dataset,
    config: Any,
    space: vocab.TokenSpace,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_examples: int = 0,
) -> tf.data.Dataset:
    """Evaluation batches of one task, in source order, last batch partial.

    Detection and captioning yield one example per image; segmentation and
    keypoints one per ground-truth instance (prompted by its box), each with
    `image`, `frame` float32[4] and ids to write COCO results.
    """
    ctx = _context(task, config, space, None)
    ds = examples
    if max_examples:
        # Examples with attached detections were already cut to max_examples.
        ds = ds.take(max_examples)
    ds = ds.shard(process_count, process_index)
    if task in ("object_detection", "captioning"):
        ds = ds.map(lambda ex: _eval_image_example(ex, ctx), num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.flat_map(lambda ex: _eval_instance_examples(task, ex, ctx))
    ds = ds.batch(batch_size).prefetch(int(config.data.prefetch))
    return ds.with_options(_options(config))
