r"""Imports an official Pix2Seq TF2 checkpoint as a unified_seq run folder.

    python -m unified_seq.import_official \
        --checkpoint gs://pix2seq/multi_task/ckpt/vit_b_640x640 \
        --config configs/multitask_coco.py \
        --config.data.tokenizer_path=gs://pix2seq/multi_task/data/c4_en_32k_spm.model \
        --out /runs/pix2seq_vitb640

`--checkpoint` is a checkpoint prefix (`.../ckpt-92412`) or a folder (its
latest checkpoint). Only the `model/` variables are read, with
`tf.train.load_checkpoint` (no official code); the optimizer slots and step
counters of a trainer checkpoint are listed and left behind. Every model
variable maps to one of our parameters (official_names.py) or the import
fails naming it; every parameter of the model `--config` builds is filled or
the import fails naming it. Shapes must agree, except:
  * the decoder position table (`seq_pos_embedding`, one row per token
    position): cut or extended with fresh rows to this config's longest
    sequence, as in fine-tuning (init_from.resize_rows). The image size
    changes no parameter: both position codes of the image are computed
    sin-cos tables;
  * a detection checkpoint without text rows (vocab ≤ text_shift, e.g. the
    Objects365 ones with vocab 3000): its rows are kept and the text rows of
    the token embedding and output bias start fresh.

OUT then holds what a training run leaves, so `--mode eval --workdir OUT`,
`python -m unified_seq.predict --workdir OUT` and `--config.init_from=OUT`
read it:
  checkpoints/state/<step>/  the parameters (orbax), no optimizer state
  config.json        the config given (tokenizer path cleared: the copy below is used)
  categories.json    COCO's categories (class token = 100 + COCO id), or --categories
  tokenizer.model    a copy of config.data.tokenizer_path, when set
  import.json        source, step, each official key with its parameter and shape
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from unified_seq import official_names
from unified_seq.errors import CheckpointError, ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config the model is built from (its model and vocab blocks).", lock_config=True
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Official checkpoint prefix (.../ckpt-N) or folder (its latest)."
)
_OUT = flags.DEFINE_string("out", None, "Folder to write (local or gs://); must hold no run yet.")
_CATEGORIES = flags.DEFINE_string(
    "categories",
    "",
    "COCO-format JSON whose 'categories' the checkpoint was trained on; default: COCO's 80.",
)

# Our parameters whose leading axis is the vocabulary / the token position.
VOCAB_PARAMS = ("decoder/embed/embedding", "decoder/output_bias")
POSITION_PARAM = "decoder/pos_embed"


def find_prefix(path: str) -> str:
    """The checkpoint prefix at `path`: the prefix itself, or a folder's latest.

    Raises:
      FileNotFoundError: no `.index` file at the prefix and no checkpoint in the folder.
    """
    import tensorflow as tf

    path = path.rstrip("/")
    if tf.io.gfile.exists(path + ".index"):
        return path
    if tf.io.gfile.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest:
            return latest
        found = sorted(tf.io.gfile.glob(os.path.join(path, "*.index")))
        if found:
            return found[-1][: -len(".index")]
    raise FileNotFoundError(
        f"no TF checkpoint at {path}: give a prefix such as DIR/ckpt-1000 (DIR/ckpt-1000.index "
        "must exist) or a folder holding one"
    )


def read_checkpoint(prefix: str) -> tuple[dict[str, np.ndarray], list[str], int | None]:
    """The model's variables (official key → array), the other keys, and the global step."""
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        raise CheckpointError(f"cannot read the TF checkpoint {prefix}: {e}") from e
    keys = sorted(reader.get_variable_to_shape_map())
    model = {k: np.asarray(reader.get_tensor(k)) for k in keys if official_names.is_model_key(k)}
    if not model:
        raise CheckpointError(
            f"{prefix} holds no model/ variables (keys: {keys[:5]}...): not a Pix2Seq trainer "
            "checkpoint (tf.train.Checkpoint(model=...))"
        )
    others = [k for k in keys if k not in model]
    step = None
    for key in (
        "global_step/.ATTRIBUTES/VARIABLE_VALUE",
        "optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE",
    ):
        if key in keys:
            step = int(reader.get_tensor(key))
            break
    return model, others, step


def checkpoint_sizes(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Model sizes read off official shapes (names as in models/sizes.py); missing ones left out."""
    by_name = {official_names.strip(k): s for k, s in shapes.items()}
    found: dict[str, int] = {}

    def depth(prefix: str) -> int:
        indices = {k[len(prefix) :].split("/")[0] for k in by_name if k.startswith(prefix)}
        return len(indices)

    enc = "encoder/transformer_encoder/enc_layers/"
    dec = "decoder/decoder/dec_layers/"
    stem = by_name.get("encoder/stem_conv/kernel")
    if stem:
        found.update(patch_size=stem[0], enc_width=stem[-1])
    found["enc_depth"] = depth(enc)
    found["dec_depth"] = depth(dec)
    for side, prefix, attn in (("enc", enc, "mha"), ("dec", dec, "self_mha")):
        query = by_name.get(f"{prefix}0/{attn}/_query_dense/kernel")
        hidden = by_name.get(f"{prefix}0/mlp/mlp_layers/0/dense1/kernel")
        if query:
            found[f"{side}_heads"] = query[1]
            found.setdefault(f"{side}_width", query[0])
        if hidden:
            found[f"{side}_mlp_dim"] = hidden[1]
    return {k: int(v) for k, v in found.items() if v}


def _variant_hint(official: dict[str, tuple[int, ...]], model_cfg: Any) -> str:
    from unified_seq.models import sizes

    theirs = checkpoint_sizes(official)
    ours = sizes.resolve(model_cfg)
    differ = {k: v for k, v in theirs.items() if ours.get(k) != v}
    if not differ:
        return ""
    for name, table in sizes.SIZES.items():
        if all(table.get(k) == v for k, v in theirs.items()):
            return (
                f"the checkpoint is {name} ({_describe(theirs)}) and config.model builds "
                f"{_describe(ours)}: set --config.model.variant={name}"
            )
    overrides = " ".join(f"--config.model.{k}={v}" for k, v in sorted(differ.items()))
    return (
        f"the checkpoint's model is {_describe(theirs)}, config.model builds {_describe(ours)}: "
        f"set {overrides}"
    )


def _describe(s: dict[str, Any]) -> str:
    return (
        f"encoder {s.get('enc_depth')} × {s.get('enc_width')} (mlp {s.get('enc_mlp_dim')}, "
        f"{s.get('enc_heads')} heads, patch {s.get('patch_size')}), decoder {s.get('dec_depth')} × "
        f"{s.get('dec_width')} (mlp {s.get('dec_mlp_dim')}, {s.get('dec_heads')} heads)"
    )


def plan(
    official: dict[str, tuple[int, ...]],
    ours: dict[str, tuple[int, ...]],
    config: Any,
    source: str = "the checkpoint",
) -> dict[str, Any]:
    """Matches official model variables to our parameters, by name and shape.

    Args:
      official: official model key → shape (`model/` keys only).
      ours: our parameter path → shape, for the model `config` builds.
      config: the run config (model and vocab blocks, for the messages).
      source: the checkpoint's name, for the messages.

    Returns:
      {"names": ours → official key, "resized": [our paths of the position
      table, when its length differs], "grown": [our vocabulary paths that
      gain fresh text rows]}.

    Raises:
      CheckpointError: official variables with no counterpart here.
      ConfigError: our parameters the checkpoint lacks, or shapes that differ
        (the message says which config fields to set).
    """
    from unified_seq import vocab

    names, unmapped = {}, []
    for key in sorted(official):
        path = official_names.to_ours(key)
        if path is None or path in names:
            unmapped.append(key)
        else:
            names[path] = key
    if unmapped:
        listed = "; ".join(
            f"{official_names.strip(k)} ({official_names.why_unsupported(k)})" for k in unmapped[:8]
        )
        raise CheckpointError(
            f"{source}: {len(unmapped)} model variables have no unified_seq parameter: {listed}"
        )
    hint = _variant_hint(official, config.model)
    missing = sorted(set(ours) - set(names))
    extra = sorted(set(names) - set(ours))
    if missing or extra:
        what = []
        if missing:
            what.append(
                f"{len(missing)} parameters of config.model are not in {source}: "
                f"{', '.join(missing[:6])}"
            )
        if extra:
            what.append(
                f"{len(extra)} of its variables have no place in config.model's model: "
                f"{', '.join(official_names.strip(names[p]) for p in extra[:6])}"
            )
        fix = hint or (
            "config.model.stem must be 'patch' (the official patch projection)"
            if any("conv_stem" in m for m in missing)
            else "use the checkpoint's sizes"
        )
        raise ConfigError(f"{'; '.join(what)}. {fix}")
    space = vocab.TokenSpace.from_config(config.vocab)
    resized, grown, wrong = [], [], []
    for path, shape in sorted(ours.items()):
        theirs = tuple(official[names[path]])
        if theirs == tuple(shape):
            continue
        if theirs[1:] != tuple(shape[1:]):
            wrong.append(
                f"{path} ({official_names.strip(names[path])}): {theirs} vs {tuple(shape)}"
            )
        elif path == POSITION_PARAM:
            resized.append(path)
        elif path in VOCAB_PARAMS and theirs[0] <= space.text_shift < shape[0]:
            grown.append(path)  # a detection checkpoint: no text rows to keep
        elif path in VOCAB_PARAMS:
            raise ConfigError(
                f"{source} has {theirs[0]} tokens ({official_names.strip(names[path])}) and "
                f"config.vocab gives {shape[0]} (text_shift {space.text_shift} + text_vocab_size "
                f"{space.text_vocab_size}): set --config.vocab.text_vocab_size="
                f"{theirs[0] - space.text_shift} (the official multi-task models: 32000)"
            )
        else:
            wrong.append(
                f"{path} ({official_names.strip(names[path])}): {theirs} vs {tuple(shape)}"
            )
    if wrong:
        raise ConfigError(
            f"{len(wrong)} shapes differ between {source} and config.model ({'; '.join(wrong[:4])})"
            + (f". {hint}" if hint else "")
        )
    return {"names": names, "resized": resized, "grown": grown}


def convert(
    official: dict[str, np.ndarray], abstract: Any, config: Any, fresh: Any = None, source: str = ""
) -> tuple[Any, dict[str, Any]]:
    """Our parameter tree, filled from the official arrays.

    Args:
      official: official model key → array.
      abstract: our parameters' tree (ShapeDtypeStructs or arrays).
      config: the run config.
      fresh: a freshly initialised tree like `abstract`, or a callable giving
        one; read only when rows are added (position table, text rows).
      source: the checkpoint's name, for the messages.

    Returns:
      (tree of float32 numpy arrays like `abstract`, the plan of `plan`).
    """
    import jax

    from unified_seq.init_from import by_name, resize_rows

    named = by_name(abstract)
    paths = list(named)
    ours = {p: tuple(x.shape) for p, x in named.items()}
    matched = plan(
        {k: v.shape for k, v in official.items()}, ours, config, source or "the checkpoint"
    )
    fresh_flat = None
    if matched["resized"] or matched["grown"]:
        tree = fresh() if callable(fresh) else fresh
        if tree is None:
            raise ValueError("rows must be added, and no fresh parameters were given")
        fresh_flat = by_name(tree)
    leaves = []
    for path in paths:
        array = np.asarray(official[matched["names"][path]], np.float32)
        if path in matched["resized"] or path in matched["grown"]:
            array = np.asarray(resize_rows(array, np.asarray(fresh_flat[path], np.float32)))
        leaves.append(array)
    treedef = jax.tree_util.tree_structure(abstract)
    return jax.tree_util.tree_unflatten(treedef, leaves), matched


def coco_categories() -> list[dict]:
    """COCO's 80 categories (ids 1..90 with gaps), the person with its 17 keypoint names."""
    from unified_seq.data.synthetic import KEYPOINT_NAMES
    from unified_seq.data.tfds_source import COCO_80_CATEGORIES

    return [
        {**c, "keypoints": list(KEYPOINT_NAMES)} if c["name"] == "person" else dict(c)
        for c in COCO_80_CATEGORIES
    ]


def _read_categories(path: str) -> list[dict]:
    import tensorflow as tf

    from unified_seq.data.errors import DataError

    with tf.io.gfile.GFile(path) as f:
        content = json.load(f)
    categories = content.get("categories") if isinstance(content, dict) else content
    if not categories:
        raise DataError(path, "no 'categories' list", "give a COCO annotation file")
    return categories


def import_checkpoint(
    checkpoint: str, config: Any, out: str, categories_path: str = ""
) -> dict[str, Any]:
    """Reads an official checkpoint and writes the run folder `out` (module docstring).

    Returns:
      The report written to `out/import.json`.
    """
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    import tensorflow as tf

    from unified_seq import checkpoint as checkpoint_lib
    from unified_seq import train, vocab
    from unified_seq.data.categories import CategoryMap
    from unified_seq.init_from import by_name
    from unified_seq.tasks.tokenizer import CaptionTokenizer

    train.check_fields(config, training=False)
    try:
        checkpoint_lib.locate(out)
    except FileNotFoundError:
        pass
    else:
        raise ConfigError(f"--out {out} already holds a run's checkpoints; choose a new folder")
    prefix = find_prefix(checkpoint)
    print(f"reading {prefix}", flush=True)
    official, others, step = read_checkpoint(prefix)
    space = vocab.TokenSpace.from_config(config.vocab)
    model = train.build_model(config, space)
    size = int(config.data.image_size)
    seq_len = max(train.sequence_lengths(config).values())

    def init(rng):
        images = jnp.zeros([1, size, size, 3], jnp.float32)
        return model.init(rng, images, jnp.zeros([1, seq_len], jnp.int32), train=False)["params"]

    rng = jax.random.key(int(config.seed))
    params, matched = convert(
        official, jax.eval_shape(init, rng), config, lambda: jax.jit(init)(rng), prefix
    )
    tokenizer_path = config.data.get("tokenizer_path", "")
    tokenizer = None
    if tokenizer_path:
        tokenizer = CaptionTokenizer.load(tokenizer_path)
        if tokenizer.vocab_size > space.text_vocab_size:
            raise ConfigError(
                f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} pieces but "
                f"config.vocab.text_vocab_size={space.text_vocab_size}"
            )
    categories = _read_categories(categories_path) if categories_path else coco_categories()
    category_map = CategoryMap.build(categories, space, categories_path or "COCO categories")

    tf.io.gfile.makedirs(out)
    step = 0 if step is None else step
    manager = ocp.CheckpointManager(
        os.path.join(out, "checkpoints", "state"), options=ocp.CheckpointManagerOptions(create=True)
    )
    # As jax.Arrays, so that the checkpoint reads back like a training run's.
    params = jax.device_put(params, jax.devices()[0])
    manager.save(step, args=ocp.args.StandardSave({"params": params}))
    manager.wait_until_finished()
    manager.close()
    saved = config.copy_and_resolve_references()
    with saved.unlocked():
        saved.init_from = ""
        if tokenizer is not None:
            saved.data.tokenizer_path = ""
    with tf.io.gfile.GFile(os.path.join(out, "config.json"), "w") as f:
        f.write(saved.to_json_best_effort(indent=2))
    category_map.save(os.path.join(out, "categories.json"))
    if tokenizer is not None:
        tokenizer.save(os.path.join(out, "tokenizer.model"))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    shapes = {p: x.shape for p, x in by_name(params).items()}
    report = {
        "source": prefix,
        "step": step,
        "parameters": count,
        "variables": {
            official_names.strip(key): {"parameter": path, "shape": list(official[key].shape)}
            for path, key in sorted(matched["names"].items(), key=lambda kv: kv[1])
        },
        "resized": {
            p: [official[matched["names"][p]].shape[0], shapes[p][0]] for p in matched["resized"]
        },
        "fresh_text_rows": matched["grown"],
        "left_behind": others,
        "tokenizer": tokenizer_path or None,
        "categories": categories_path or "COCO 80",
    }
    with tf.io.gfile.GFile(os.path.join(out, "import.json"), "w") as f:
        f.write(json.dumps(report, indent=1))
    print(
        f"imported {len(matched['names'])} variables ({count:,} parameters) from {prefix} "
        f"(step {step}) into {out}; left behind {len(others)} non-model keys (optimizer, "
        "counters)",
        flush=True,
    )
    for path, (rows, now) in report["resized"].items():
        print(f"  {path}: {rows} rows -> {now}; the first {min(rows, now)} are the checkpoint's")
    for path in matched["grown"]:
        print(f"  {path}: text rows from {space.text_shift} on start fresh", flush=True)
    if "captioning" in config.tasks and tokenizer is None:
        logging.warning(
            "captioning: no tokenizer imported; for the official models set "
            "--config.data.tokenizer_path=gs://pix2seq/multi_task/data/c4_en_32k_spm.model"
        )
    return report


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for flag, value in (
        ("--config", _CONFIG.value),
        ("--checkpoint", _CHECKPOINT.value),
        ("--out", _OUT.value),
    ):
        if not value:
            raise app.UsageError(f"{flag} is required (see --help)")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from unified_seq.data.errors import DataError

    try:
        import_checkpoint(_CHECKPOINT.value, _CONFIG.value, _OUT.value, _CATEGORIES.value)
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, ConfigError) else 1)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with `--help` exiting 0 (absl's own exits 1)."""
    if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv[1:]):
        print(__doc__)
        print(flags.FLAGS.module_help(sys.modules[__name__]))
        sys.exit(0)
    return flags.FLAGS(argv)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
