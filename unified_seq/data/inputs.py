"""From `config.data` to a dataset of examples: the one entry to data sources.

`load_split` reads a split from the configured source (the embedded synthetic
set, COCO JSON, or tensorflow-datasets), adds caption token ids, and handles
unreadable images as `data.on_bad_image` says. `numpy_batches` iterates a
pipeline and turns TensorFlow's decode failures into a DataError that names
the file.
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
from unified_seq.data import coco, synthetic, tfds_source
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
    """

    examples: tf.data.Dataset
    category_map: CategoryMap
    num_images: int
    stats: dict
    image_files: list[str]
    tokenizer: CaptionTokenizer | None


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


def find_undecodable(files: Sequence[str]) -> list[str]:
    """Image files that TensorFlow cannot decode, found in one parallel pass."""
    if not files:
        return []

    def probe(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return path, tf.shape(image)

    ds = tf.data.Dataset.from_tensor_slices(list(files)).map(
        probe, num_parallel_calls=tf.data.AUTOTUNE
    )
    ds = ds.ignore_errors()
    good = {p.decode() for p, _ in ds.as_numpy_iterator()}
    return [f for f in files if f not in good]


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
            )
            return [c for ex in examples for c in ex["captions"]]

        captions = (captions_fn or train_captions)()
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

    Returns:
      the split's examples (this process's share) and metadata; `num_images`,
      `stats` and `image_files` count this process's images.
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

    examples, category_map, stats = coco.load_coco_json(
        coco_dir(config),
        split,
        space,
        num_keypoints=num_keypoints,
        on_bad_image=policy,
        process_index=process_index,
        process_count=process_count,
    )
    files = [ex["image/filename"] for ex in examples]
    if policy == "skip":
        bad = set(find_undecodable(files))
        if bad:
            logging.warning("Skipping %d undecodable images, e.g. %s", len(bad), sorted(bad)[:3])
            examples = [ex for ex in examples if ex["image/filename"] not in bad]
            files = [f for f in files if f not in bad]
        stats["skipped_images"] = stats.get("skipped_images", 0) + len(bad)
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
    return SplitData(ds, category_map, len(examples), stats, files, tokenizer)


def _empty_caption_ids() -> tf.RaggedTensor:
    return tf.RaggedTensor.from_row_lengths(tf.zeros([0], tf.int32), tf.zeros([0], tf.int64))


def next_numpy(iterator: Any, data: SplitData) -> dict[str, np.ndarray]:
    """Next batch of a tf.data iterator as numpy; an undecodable image raises DataError.

    Raises StopIteration at the end of the data.
    """
    try:
        batch = next(iterator)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        bad = find_undecodable(data.image_files)
        where = bad[0] if bad else "input pipeline"
        first_line = e.message.splitlines()[0] if e.message else type(e).__name__
        raise DataError(
            where,
            f"image cannot be decoded ({len(bad)} such files in the split; TF said: {first_line})",
            "replace or remove it, or set --config.data.on_bad_image=skip to skip and count",
        ) from e
    return tf.nest.map_structure(lambda t: t.numpy(), batch)


def numpy_batches(dataset: tf.data.Dataset, data: SplitData) -> Iterator[dict[str, np.ndarray]]:
    """Iterates a pipeline as numpy batches; see `next_numpy`."""
    iterator = iter(dataset)
    while True:
        try:
            yield next_numpy(iterator, data)
        except StopIteration:
            return
