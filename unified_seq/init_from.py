"""Fine-tuning: a new run starts from the parameters of another run (`config.init_from`).

Only the parameters are read: the optimizer state and the step of the source
stay behind, so the new run warms up and decays its own learning rate from
step 0. Its own checkpoints then take over: `train.train` resumes from them
and ignores `init_from` once one exists.

What may differ between the two runs:
  * `data.image_size`: the encoder and bridge add a computed sin-cos code
    for whatever grid the image gives (models/vit.py, encoder_decoder.py),
    so no parameter depends on the image size. There is no learned 2-D
    position table to interpolate.
  * the longest task sequence: the decoder's learned `pos_embed`
    [max_len, width] keeps the source's rows and takes this run's fresh rows
    beyond them (`resize_rows`).
Anything else (the vocabulary, the model sizes) must be the source's; a
difference fails before anything is read, naming the parameters.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from unified_seq import checkpoint, vocab

# Parameters whose leading axis is the vocabulary (models/decoder.py).
VOCAB_PARAMS = ("decoder/embed/embedding", "decoder/output_bias")
# Learned tables indexed by token position, whose length follows the longest sequence.
POSITION_TABLES = ("decoder/pos_embed",)
VOCAB_FIELDS = ("coord_shift", "bins", "text_shift", "text_vocab_size")


def resize_rows(table: Any, fresh: Any) -> jax.Array:
    """`table` cut or extended along its leading axis to the length of `fresh`.

    Shared rows are `table`'s, unchanged; rows past its end are `fresh`'s.
    Rows of a position table are absolute token positions, so they are kept
    rather than interpolated: stretching the table would move what the
    source learned for position t onto another position. New positions get
    the same initialisation as a run from scratch.

    Args:
      table: float[N, ...], the source's rows (numpy or jax).
      fresh: float[M, ...], this run's freshly initialised table (numpy or jax).

    Returns:
      float[M, ...] with `fresh`'s dtype.
    """
    if table.shape[1:] != fresh.shape[1:]:
        raise ValueError(
            f"cannot resize rows of shape {table.shape[1:]} into rows of shape {fresh.shape[1:]}"
        )
    n = min(table.shape[0], fresh.shape[0])
    fresh = jnp.asarray(fresh)
    return fresh.at[:n].set(table[:n].astype(fresh.dtype))


def load_initial_params(path: str, params: Any, config: Any) -> Any:
    """The parameters saved at `path`, adapted to this run and placed as `params`.

    Same-shape parameters are read straight into the shardings of `params`
    (no host copy of the whole model, any mesh); a position table that
    changes length is read replicated, resized, then sharded as `params`.

    Args:
      path: `config.init_from`: a run's workdir, its checkpoints folder, or
        one step's folder (checkpoint.locate).
      params: this run's freshly initialised parameters (sharded
        jax.Arrays); they give the shapes, shardings and any new rows.
      config: this run's config, for the messages.

    Returns:
      A tree like `params`, with the same shardings.

    Raises:
      FileNotFoundError: nothing saved at `path`.
      ValueError: the vocabulary or the architecture differs.
    """
    item, step = checkpoint.locate(path)
    saved_tree = checkpoint.params_shapes(item)
    saved = by_name(saved_tree)
    wanted = by_name(params)
    source_config = _source_config(item)
    _check_names(saved, wanted, item, config)
    _check_vocab(saved, wanted, item, config, source_config)
    resized = _check_shapes(saved, wanted, item, config)

    def abstract(key_path: Any, shape: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        target = wanted[param_name(key_path)]
        same = shape.shape == target.shape
        where = target.sharding if same else _replicated(target.sharding)
        return jax.ShapeDtypeStruct(shape.shape, target.dtype, sharding=where)

    restored = checkpoint.restore_params(
        item, jax.tree_util.tree_map_with_path(abstract, saved_tree)
    )
    restored = by_name(restored)

    def adapt(key_path: Any, target: jax.Array) -> jax.Array:
        name = param_name(key_path)
        if name not in resized:
            return restored[name]
        resize = jax.jit(resize_rows, out_shardings=target.sharding)
        return resize(restored[name], target)

    loaded = jax.tree_util.tree_map_with_path(adapt, params)
    count = sum(int(np.prod(x.shape)) for x in wanted.values())
    changes = ", ".join(f"{n} {saved[n].shape} -> {wanted[n].shape}" for n in resized)
    logging.info(
        "Initialised from %s (step %d): %d parameters in %d arrays; resized: %s",
        item,
        step,
        count,
        len(wanted),
        changes or "none",
    )
    _warn_tokenizer(item, config)
    return loaded


def param_name(key_path: Any) -> str:
    """ "decoder/pos_embed" for a parameter's tree path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def by_name(tree: Any) -> dict[str, Any]:
    """A parameter tree's leaves keyed by `param_name`, in tree order."""
    return {param_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _replicated(sharding: Any) -> Any:
    # A resized table is read whole on every device, since the saved shape does
    # not fit the target's partitioning; single-device shardings already are whole.
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    return sharding


def _source_workdir(item: str) -> str | None:
    """WORKDIR of an item folder WORKDIR/checkpoints/state/<step>/default, else None."""
    state = os.path.dirname(os.path.dirname(item))
    folder = os.path.dirname(state)
    if os.path.basename(state) == "state" and os.path.basename(folder) == "checkpoints":
        return os.path.dirname(folder)
    return None


def _source_config(item: str) -> tuple[str, dict] | None:
    """(path, contents) of the source run's config.json (main.py writes it), if any."""
    workdir = _source_workdir(item)
    if workdir is None:
        return None
    path = os.path.join(workdir, "config.json")
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return path, json.load(f)


def _architecture_hint(config: Any) -> str:
    return (
        f"the architectures differ: config.model (variant {config.model.get('variant')!r}) must "
        "build the source run's model; use the source's config.model settings"
    )


def _check_names(saved: dict, wanted: dict, item: str, config: Any) -> None:
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if missing or extra:
        raise ValueError(
            f"config.init_from: {_architecture_hint(config)}. The checkpoint {item} lacks "
            f"{missing or 'nothing'} and holds parameters this model does not have: "
            f"{extra or 'none'}"
        )


def _vocab_settings(block: Any) -> str:
    return ", ".join(f"{k}={block.get(k)}" for k in VOCAB_FIELDS)


def _check_vocab(
    saved: dict, wanted: dict, item: str, config: Any, source_config: tuple[str, dict] | None
) -> None:
    """The token space must be the source's: every row of the embedding is one token."""
    space = vocab.TokenSpace.from_config(config.vocab)
    source_vocab = source_config[1].get("vocab") if source_config else None
    differs = [n for n in VOCAB_PARAMS if n in saved and saved[n].shape[0] != wanted[n].shape[0]]
    # The same size laid out differently would load silently with tokens swapped.
    if not differs and not (source_vocab and vocab.TokenSpace.from_config(source_vocab) != space):
        return
    if differs:
        what = (
            f"{differs[0]} of {item} has {saved[differs[0]].shape[0]} tokens (the source's "
            f"vocab size) and this config's has {wanted[differs[0]].shape[0]}"
        )
    else:
        what = (
            f"the source's token layout differs from this config's (vocab size {space.vocab_size})"
        )
    if source_vocab:
        overrides = " ".join(f"--config.vocab.{k}={source_vocab.get(k)}" for k in VOCAB_FIELDS)
        fix = f"the source run's ({source_config[0]}: {json.dumps(source_vocab)}), e.g. {overrides}"
    else:
        fix = "the source run's (vocab size = text_shift + text_vocab_size; no config.json found)"
    raise ValueError(
        f"config.init_from: {what}; config.vocab is {_vocab_settings(config.vocab)} "
        f"(vocab size {space.vocab_size}). Set config.vocab to {fix}"
    )


def _check_shapes(saved: dict, wanted: dict, item: str, config: Any) -> list[str]:
    """Names of the position tables to resize; raises on any other difference."""
    resized, wrong = [], []
    for name, target in wanted.items():
        shape = saved[name].shape
        if shape == target.shape:
            continue
        if name in POSITION_TABLES and shape[1:] == target.shape[1:]:
            resized.append(name)
        else:
            wrong.append(f"{name}: saved {shape}, this model {target.shape}")
    if wrong:
        raise ValueError(
            f"config.init_from: {_architecture_hint(config)}. Shapes differ from {item}: "
            + "; ".join(wrong)
        )
    return resized


def _warn_tokenizer(item: str, config: Any) -> None:
    # Text tokens are SentencePiece ids: the source's embedding rows mean its
    # own tokenizer's pieces, and this run trains its own unless told.
    workdir = _source_workdir(item)
    if "captioning" not in config.tasks or config.data.get("tokenizer_path") or workdir is None:
        return
    source = os.path.join(workdir, "tokenizer.model")
    if tf.io.gfile.exists(source):
        logging.warning(
            "config.init_from: captioning uses this run's tokenizer; unless it was trained on "
            "the same captions as the source's, set --config.data.tokenizer_path=%s",
            source,
        )
