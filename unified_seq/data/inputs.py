"""From `config.data` to a dataset of examples: the one entry to data sources.

`load_split` reads a split from the configured source (the embedded synthetic
set, COCO JSON, or tensorflow-datasets), adds caption token ids, and handles
unreadable images as `data.on_bad_image` says. `check_task_examples` counts
the images each task can train on. `numpy_batches` iterates a pipeline and
turns TensorFlow's decode failures into a one-line DataError that names the
file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from unified_seq import cache, vocab
from unified_seq.data import checks, coco, image_decode, synthetic, tfds_source
from unified_seq.data.categories import CategoryMap
from unified_seq.data.errors import DataError
from unified_seq.tasks.task import ANNOTATIONS
from unified_seq.tasks.tokenizer import CaptionTokenizer

SOURCES = ("synthetic", "coco_json", "tfds")
# The annotation kinds each source holds; tfds coco/2017 has boxes only.
SOURCE_ANNOTATIONS = {"synthetic": ANNOTATIONS, "coco_json": ANNOTATIONS, "tfds": ("boxes",)}
WORKDIR_TOKENIZER = "tokenizer.model"
BAD_IMAGE_POLICIES = ("fail", "skip")


@dataclasses.dataclass
class SplitData:
    """One split of the configured data source.

    Attributes:
      examples: tf.data.Dataset of TF examples (unified_seq/data/example.py)
        plus `captions/ids` int32 ragged [C, None].
      category_map: dataset category ids ↔ class ids.
      num_images: images in the split (after skipped ones).
      stats: counts from loading (objects, crowd, skipped images, ...).
      image_files: image paths, to name a file that fails to decode.
      tokenizer: the caption tokenizer, or None.
      annotation_files: annotation kind (coco.KINDS) → the path it is read
        from, whether it exists or not; empty for tfds.
    """

    examples: tf.data.Dataset
    category_map: CategoryMap
    num_images: int
    stats: dict
    image_files: list[str]
    tokenizer: CaptionTokenizer | None
    annotation_files: dict[str, str] = dataclasses.field(default_factory=dict)


def coco_dir(config: Any) -> str:
    """Root of the COCO layout this run reads (generated for `synthetic`)."""
    source = config.data.source
    if source not in SOURCES:
        raise ValueError(f"config.data.source={source!r}; choose one of {SOURCES}")
    if source == "synthetic":
        return synthetic.ensure_synthetic(config.data.synthetic)
    if source == "coco_json" and not config.data.coco_dir:
        raise ValueError(
            "config.data.coco_dir is empty; pass --config.data.coco_dir=ROOT where ROOT holds "
            "annotations/ and train2017/, val2017/"
        )
    return config.data.coco_dir


def _max_pixels(config: Any) -> int:
    return int(config.data.get("max_image_pixels", image_decode.DEFAULT_MAX_PIXELS))


def _bad_images_error(report: image_decode.ProbeReport, total: int, max_pixels: int) -> DataError:
    bad = report.bad
    first = bad[0]
    if first in report.too_large:
        h, w = report.too_large[first]
        problem = f"image declares {h}x{w} pixels, more than data.max_image_pixels={max_pixels}"
    else:
        problem = f"image cannot be decoded ({report.undecodable[first]})"
    if len(bad) > 1:
        shown = ", ".join(bad[1:11]) + (", ..." if len(bad) > 11 else "")
        problem += f"; {len(bad) - 1} more of the split's {total} images cannot be used: {shown}"
    them = "them" if len(bad) > 1 else "it"
    fix = f"replace or remove {them}, or set --config.data.on_bad_image=skip to skip and count"
    if report.too_large:
        fix = "raise --config.data.max_image_pixels (0 = no limit), " + fix
    return DataError(first, problem, fix)


def check_images(
    examples: list[dict], policy: str, max_pixels: int
) -> tuple[list[dict], dict[str, int]]:
    """Reads and decodes every image of the examples once (images over `max_pixels` are not
    decoded), before any pipeline.

    Args:
      examples: coco.load_coco_json examples.
      policy: `fail`: a DataError naming every bad image at once; `skip`:
        bad images are dropped.
      max_pixels: the most pixels an image's header may declare (0: no limit).

    Returns:
      the examples kept, and counts: undecodable_images, too_large_images
      (dropped under `skip`), and size_mismatch, the images whose decoded
      (upright) size differs from the height and width in the annotation
      files; the decoded size is the one used.
    """
    files = [ex["image/filename"] for ex in examples]
    report = image_decode.probe_images(files, max_pixels)
    if report.bad and policy == "fail":
        logging.error("Images that cannot be used: %s", report.bad)
        raise _bad_images_error(report, len(files), max_pixels)
    if report.bad:
        logging.warning("Skipping %d unusable images, e.g. %s", len(report.bad), report.bad[:3])
    mismatched = []
    for ex in examples:
        size = report.sizes.get(ex["image/filename"])
        listed = tuple(int(v) for v in ex["image/size"])
        if size is not None and size != listed:
            mismatched.append(
                f"{ex['image/filename']} ({size[0]}x{size[1]}, annotated {listed[0]}x{listed[1]})"
            )
    if mismatched:
        logging.warning(
            "%d images differ in size from the height and width in the annotation files; "
            "the decoded size is used, e.g. %s",
            len(mismatched),
            "; ".join(mismatched[:3]),
        )
    bad = set(report.bad)
    kept = [ex for ex in examples if ex["image/filename"] not in bad] if bad else examples
    counts = {
        "undecodable_images": len(report.undecodable),
        "too_large_images": len(report.too_large),
        "size_mismatch": len(mismatched),
    }
    return kept, counts


def _no_captions_error(config: Any) -> DataError:
    path = coco.annotation_path(coco_dir(config), "captions", config.data.train_split)
    if tf.io.gfile.exists(path):
        problem = "no non-empty caption to train the caption tokenizer on"
    else:
        problem = "does not exist: no caption to train the caption tokenizer on"
    return DataError(
        path, problem, "add captions, or pass --config.data.tokenizer_path=<SentencePiece model>"
    )


def trained_tokenizer_path(captions: Sequence[str], vocab_size: int) -> str:
    """Cache path of the tokenizer trained on exactly these captions (content-addressed)."""
    digest = hashlib.sha256()
    digest.update(f"{vocab_size}\n".encode())
    for caption in captions:
        digest.update(caption.encode("utf-8") + b"\n")
    return cache.cache_dir("tokenizers", f"spm{vocab_size}-{digest.hexdigest()[:16]}.model")


def load_tokenizer(
    config: Any,
    space: vocab.TokenSpace,
    captions_fn: Callable[[], list[str]] | None = None,
    workdir: str | None = None,
) -> CaptionTokenizer:
    """The caption tokenizer of a run.

    In order: `data.tokenizer_path`; the run's own copy `WORKDIR/tokenizer.model`
    (a resumed or evaluated run reads what it trained with); else one trained
    on the training captions, kept in the cache under a name derived from
    those captions (so it is reused only for the same captions) and copied to
    the workdir. Nothing is written next to the data, which may be read-only.

    Args:
      config: run config (`data` block).
      space: token space; the tokenizer must fit its text range.
      captions_fn: the training captions, when a tokenizer must be trained;
        by default they are read from the training split.
      workdir: the run's folder, or None.
    """
    path = config.data.tokenizer_path
    own = os.path.join(workdir, WORKDIR_TOKENIZER) if workdir else ""
    if path:
        if not tf.io.gfile.exists(path):
            raise DataError(path, "tokenizer model not found", "fix data.tokenizer_path")
        tokenizer = CaptionTokenizer.load(path)
    elif own and tf.io.gfile.exists(own):
        path = own
        tokenizer = CaptionTokenizer.load(own)
    else:

        def train_captions():
            examples, _, _ = coco.load_coco_json(
                coco_dir(config),
                config.data.train_split,
                space,
                num_keypoints=int(config.data.num_keypoints),
                on_bad_image="skip",
                kinds=("captions",),
                max_annotation_bytes=_max_annotation_bytes(config),
            )
            return [c for ex in examples for c in ex["captions"]]

        captions = (captions_fn or train_captions)()
        if not captions:  # blank captions are dropped when read
            raise _no_captions_error(config)
        path = trained_tokenizer_path(captions, space.text_vocab_size)
        tokenizer = CaptionTokenizer.load_or_train(path, lambda: captions, space.text_vocab_size)
        if own and jax.process_index() == 0:  # one writer per run
            tokenizer.save(own)
    if tokenizer.vocab_size > space.text_vocab_size:
        raise ValueError(
            f"tokenizer {path} has {tokenizer.vocab_size} pieces but vocab.text_vocab_size="
            f"{space.text_vocab_size}; raise vocab.text_vocab_size"
        )
    return tokenizer


def _max_annotation_bytes(config: Any) -> int:
    return int(config.data.get("max_annotation_bytes", coco.DEFAULT_MAX_ANNOTATION_BYTES))


def _caption_ids(captions: list[list[str]], tokenizer: CaptionTokenizer) -> tf.RaggedTensor:
    """int32 ragged [images, captions, pieces], built from flat arrays (fast on COCO)."""
    ids = tokenizer.encode_batch([c for caps in captions for c in caps])
    piece_lengths = np.array([len(row) for row in ids], np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(piece_lengths.sum()))
    caption_counts = np.array([len(caps) for caps in captions], np.int64)
    return tf.RaggedTensor.from_nested_row_lengths(flat, [caption_counts, piece_lengths])


def load_split(
    config: Any,
    split: str,
    space: vocab.TokenSpace,
    tokenizer: CaptionTokenizer | None = None,
    workdir: str | None = None,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> SplitData:
    """Reads one split (`train` or `val`) of the configured source, or one process's share.

    Args:
      config: run config; uses the `data` block.
      split: split name as in the COCO file names (`train`, `val`).
      space: token space (class ids must fit, or are remapped).
      tokenizer: caption tokenizer; by default `load_tokenizer` (trained from
        this split's captions when it is the training split and no model exists).
      workdir: the run's folder, where the tokenizer it uses is kept.
      process_index, process_count: with process_count n > 1, only this
        process's share of the images is read: for COCO JSON the images
        `process_index::n` in image-id order (see `coco.load_coco_json`), for
        tfds an even slice of the split. Do not shard the examples again.

    Images are checked before use (`check_images`: decoded once, sizes
    compared) under `on_bad_image=skip`, and for COCO JSON also under `fail`
    unless `data.check_images` is off; images over `data.max_image_pixels`
    are bad images.

    Returns:
      the split's examples (this process's share) and metadata; `num_images`,
      `stats` and `image_files` count this process's images. `stats` holds
      coco.load_coco_json's counts and, when images were checked,
      undecodable_images, too_large_images and size_mismatch;
      skipped_images counts every image dropped.
    """
    policy = config.data.on_bad_image
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"config.data.on_bad_image={policy!r}; choose one of {BAD_IMAGE_POLICIES}")
    num_keypoints = int(config.data.num_keypoints)
    if config.data.source == "tfds":
        if process_count > 1:
            split = tfds.even_splits(split, n=process_count)[process_index]
        ds, category_map = tfds_source.load_tfds(
            split, config.data.tfds_data_dir, space, num_keypoints=num_keypoints
        )
        ds = ds.map(lambda ex: {**ex, "captions/ids": _empty_caption_ids()})
        if policy == "skip":
            ds = ds.ignore_errors()
        return SplitData(ds, category_map, -1, {}, [], tokenizer)

    root = coco_dir(config)
    examples, category_map, stats = coco.load_coco_json(
        root,
        split,
        space,
        num_keypoints=num_keypoints,
        on_bad_image=policy,
        process_index=process_index,
        process_count=process_count,
        max_annotation_bytes=_max_annotation_bytes(config),
    )
    # Synthetic images are written by us: checking them would only slow every run.
    if policy == "skip" or (
        config.data.source == "coco_json" and config.data.get("check_images", True)
    ):
        examples, counts = check_images(examples, policy, _max_pixels(config))
        stats.update(counts)
        stats["skipped_images"] += counts["undecodable_images"] + counts["too_large_images"]
    files = [ex["image/filename"] for ex in examples]
    if tokenizer is None:

        def split_captions():
            return [c for ex in examples for c in ex["captions"]]

        # A tokenizer is trained on the whole split's captions, the same in every process.
        own = split == config.data.train_split and process_count == 1
        tokenizer = load_tokenizer(config, space, split_captions if own else None, workdir)
    ds = coco.examples_to_dataset(examples, num_keypoints)
    ids = _caption_ids([ex["captions"] for ex in examples], tokenizer)
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.from_tensor_slices(ids))
    ds = ds.map(lambda ex, cap: {**ex, "captions/ids": cap})
    annotation_files = {kind: coco.annotation_path(root, kind, split) for kind in coco.KINDS}
    return SplitData(ds, category_map, len(examples), stats, files, tokenizer, annotation_files)


def check_task_examples(config: Any, data: SplitData, tasks: dict | None = None) -> dict[str, int]:
    """Images of the split each configured task can train on; a DataError for a task with none.

    One pass over the annotations (no image is read) with each task's
    `has_training_target`; the counts go to data.stats["usable_images/<task>"]
    (and are logged). For tfds, whose size is not known up front, a task is
    only checked to have one usable image, and nothing is counted.

    Args:
      config: run config; its tasks are built unless `tasks` is given.
      data: the training split (`load_split`).
      tasks: name → Task, as `unified_seq.tasks.build_tasks(config)` gives.

    Returns:
      task name → usable images (-1 where not counted).

    Raises:
      DataError: a task that no image of the split can train, saying why.
    """
    if tasks is None:
        from unified_seq.tasks import build_tasks  # the tasks import this package

        tasks = build_tasks(config)
    if data.num_images >= 0:
        counts = checks.usable_counts(tasks, data.examples)
    else:
        counts = {
            name: -1 if checks.has_any(data.examples.filter(t.has_training_target)) else 0
            for name, t in tasks.items()
        }
    for name, count in counts.items():
        if count >= 0:
            data.stats[f"usable_images/{name}"] = count
    empty = [tasks[name] for name, count in counts.items() if count == 0]
    if empty:
        raise checks.no_target_error(empty, data.stats, data.annotation_files)
    logging.info("Images each task can train on: %s of %d", counts, data.num_images)
    return counts


def _empty_caption_ids() -> tf.RaggedTensor:
    return tf.RaggedTensor.from_row_lengths(tf.zeros([0], tf.int32), tf.zeros([0], tf.int64))


def pipeline_error(error: tf.errors.OpError, data: SplitData) -> DataError:
    """A one-line DataError naming the image a pipeline failed on.

    An image over `data.max_image_pixels` is named by the error itself; for
    other errors the split's files are probed in order up to the first that
    cannot be used.
    """
    too_large = image_decode.parse_too_large(error.message or "")
    if too_large:
        name, h, w, limit = too_large
        return DataError(
            name,
            f"image declares {h}x{w} pixels, more than data.max_image_pixels={limit}",
            "raise --config.data.max_image_pixels (0 = no limit), or set "
            "--config.data.on_bad_image=skip to skip and count",
        )
    reason = image_decode.first_line(error.message or "") or type(error).__name__
    # No pixel limit: an image over it would have been named by the error itself.
    report = image_decode.probe_images(data.image_files, max_pixels=0, stop_at_first=True)
    if not report.bad:
        return DataError("input pipeline", f"TensorFlow error: {reason}")
    where = report.bad[0]
    return DataError(
        where,
        f"image cannot be decoded (TF said: {report.undecodable.get(where, reason)})",
        "replace or remove it, or set --config.data.on_bad_image=skip to skip and count",
    )


def next_numpy(iterator: Any, data: SplitData) -> dict[str, np.ndarray]:
    """Next batch of a tf.data iterator as numpy; an unusable image raises a one-line DataError.

    Raises StopIteration at the end of the data.
    """
    try:
        batch = next(iterator)
    except (
        tf.errors.InvalidArgumentError,
        tf.errors.NotFoundError,
        tf.errors.DataLossError,
    ) as e:
        raise pipeline_error(e, data) from e
    return tf.nest.map_structure(lambda t: t.numpy(), batch)


def numpy_batches(dataset: tf.data.Dataset, data: SplitData) -> Iterator[dict[str, np.ndarray]]:
    """Iterates a pipeline as numpy batches; see `next_numpy`."""
    iterator = iter(dataset)
    while True:
        try:
            yield next_numpy(iterator, data)
        except StopIteration:
            return
