"""A trained model's sampler as `jax.export` programs: run it with only jax and numpy.

    python -m unified_seq.export --workdir /tmp/us --out /tmp/us_export

For each task, the whole of `Predictor.sample`'s device work (encode the
images, repeat them for the task's samples, decode with the key/value cache,
the task's answer grammar and per-row keys) is exported for a fixed batch
of B rows and the run's image size S:

    OUT/<task>.jaxexport   a serialized `jax.export.Exported`
    OUT/params.npz         the parameters, p0000, p0001, ... in `jax.tree.leaves` order
    OUT/manifest.json      input and output shapes, sampling settings, token
                           space, categories, how to call
    OUT/tokenizer.model    the caption tokenizer (SentencePiece) and its .vocab
                           listing, with captioning

Each program is `f(params, images, prompts, ids, seed) -> outputs`:

    params   list of the arrays of params.npz, in order
    images   float32[B, S, S, 3] in [0, 1]: resized to fit, padded bottom/right
    prompts  int32[B, P]: the task's prompt (manifest: tasks.<task>.prompt)
    ids      uint32[B, 3]: each row's identity (image id low and high 32 bits,
             prompt index); a row samples with its own key from seed and ids,
             so its answer does not depend on the rest of the batch
    seed     uint32[2]: threefry key data (manifest: tasks.<task>.eval_seed
             reproduces the run's evaluation)
    outputs  tokens int32[B·N, T], length int32[B·N], done bool[B·N],
             token_logprob float32[B·N, T], and range_probs or logits when the
             task reads them; rows b·N … b·N + N - 1 are the N samples of row b

Parameters are an argument rather than constants folded into the program:
the programs stay a few hundred kilobytes and one parameter file serves
every task (and a fine-tuned copy can replace it).

Standalone use, with nothing of unified_seq installed:

    import json
    import jax
    import numpy as np

    out = "/tmp/us_export"
    with open(f"{out}/manifest.json") as f:
        manifest = json.load(f)
    spec = manifest["tasks"]["object_detection"]
    with open(f"{out}/{spec['file']}", "rb") as f:
        exp = jax.export.deserialize(bytearray(f.read()))
    with np.load(f"{out}/{manifest['params']['file']}") as npz:
        params = [npz[name] for name in manifest["params"]["names"]]
    b, s = spec["batch_size"], spec["image_size"]
    images = np.full([b, s, s, 3], manifest["image"]["pad_value"], np.float32)
    prompts = np.full([b, spec["prompt_length"]], spec["prompt_token"], np.int32)
    ids = np.stack([np.arange(b), np.zeros(b), np.zeros(b)], axis=1).astype(np.uint32)
    seed = np.asarray(spec["eval_seed"], np.uint32)
    answers = exp.call(params, images, prompts, ids, seed)
    answers["tokens"]  # int32[b * num_samples, max_len]; token meanings: manifest["vocab"]

Calling a program compiles it once for the machine at hand; `platforms`
at export chooses which backends it can run on.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from unified_seq import vocab
from unified_seq.predictor import Predictor, sample_fn, sampling_seed, task_key
from unified_seq.tasks.task import Task

FORMAT = "unified_seq.export/1"
# Named, not the default implementation: the seed's layout is part of the format.
KEY_IMPL = "threefry2x32"
PARAMS_FILE = "params.npz"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_LISTING = "tokenizer.vocab"
INPUT_NAMES = ("params", "images", "prompts", "ids", "seed")


def param_leaves(predictor: Predictor) -> list[jax.Array]:
    """The model's variables as the flat list a program takes (`jax.tree.leaves` order)."""
    return jax.tree.leaves(predictor.variables)


def seed_key(seed: Any) -> jax.Array:
    """The key an exported program builds from uint32[2] `seed`; for live sampling to match."""
    return jax.random.wrap_key_data(jnp.asarray(seed, jnp.uint32), impl=KEY_IMPL)


def _task(predictor: Predictor, task_name: str) -> Task:
    if predictor.config is None:
        raise ValueError("exporting needs the run's config: Predictor(..., config=config)")
    if task_name not in predictor.tasks:
        raise ValueError(f"task {task_name!r} is not in the run; it has {sorted(predictor.tasks)}")
    return predictor.tasks[task_name]


def export_task(
    predictor: Predictor,
    task_name: str,
    batch_size: int,
    *,
    platforms: Sequence[str] | None = None,
) -> jax.export.Exported:
    """Exports the task's sampler for batches of `batch_size` rows at the run's image size.

    Args:
      predictor: the model, its parameters, labels and config.
      task_name: one of the run's tasks.
      batch_size: rows B of every call (the program's shapes are fixed).
      platforms: backends the program can run on, e.g. ("cpu", "cuda",
        "tpu"); None: the backend JAX runs on here.

    Returns:
      the program `(params, images, prompts, ids, seed) -> outputs` (module
      docstring); parameters are inputs, not constants.
    """
    task = _task(predictor, task_name)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    run = sample_fn(predictor.model, predictor.sampler_options(task))
    leaves = param_leaves(predictor)
    treedef = jax.tree.structure(predictor.variables)

    def sample(params, images, prompts, ids, seed):
        variables = jax.tree.unflatten(treedef, params)
        return run(variables, images, prompts, ids, seed_key(seed))

    size = int(predictor.config.data.image_size)
    # Shapes only: an argument's sharding would tie the program to a device count.
    args = (
        [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
        jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
        jax.ShapeDtypeStruct((batch_size, task.prompt_length), jnp.int32),
        jax.ShapeDtypeStruct((batch_size, 3), jnp.uint32),
        jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    exporter = jax.export.export(jax.jit(sample), platforms=tuple(platforms) if platforms else None)
    return exporter(*args)


def _array_spec(name: str, aval: Any) -> dict:
    return {"name": name, "shape": list(aval.shape), "dtype": str(aval.dtype)}


def _prompt_layout(task: Task) -> str:
    if task.takes_boxes:
        return (
            "[prompt_token, ymin, xmin, ymax, xmax, 100 + class_id]: an object's box "
            "normalised to the canvas, each coordinate as coord_shift + round(c * (bins - 1))"
        )
    return "[prompt_token]"


def _eval_seed(predictor: Predictor, task: Task) -> list[int] | None:
    """Seed data of the run's own evaluation sampling; None unless JAX's keys are threefry."""
    key = task_key(sampling_seed(predictor.config), task)
    if str(jax.random.key_impl(key)) != KEY_IMPL:
        return None
    return [int(v) for v in np.asarray(jax.random.key_data(key))]


def _task_entry(predictor: Predictor, task: Task, exported: jax.export.Exported) -> dict:
    opts = predictor.sampler_options(task)
    in_avals = exported.in_avals
    num_params = len(in_avals) - (len(INPUT_NAMES) - 1)
    arrays = dict(zip(INPUT_NAMES[1:], in_avals[num_params:], strict=True))
    outputs = jax.tree.unflatten(exported.out_tree, exported.out_avals)
    size = int(predictor.config.data.image_size)
    return {
        "file": f"{task.name}.jaxexport",
        "batch_size": int(arrays["images"].shape[0]),
        "image_size": size,
        "prompt_length": int(task.prompt_length),
        "prompt_token": int(task.prompt_token),
        "prompt": _prompt_layout(task),
        # With crop_to_box a row's image is a crop around its prompt's box, crop_scale x its side.
        "crop_to_box": bool(task.cfg.get("crop_to_box", False)),
        "crop_scale": float(task.cfg.get("crop_scale", 1.0)),
        "num_samples": int(opts.num_samples),
        "max_len": int(opts.max_len),
        "temperature": float(opts.temperature),
        "top_k": int(opts.top_k),
        "top_p": float(opts.top_p),
        "constrained": opts.grammar is not None,
        "logits_range": list(opts.logits_range) if opts.logits_range else None,
        "eval_seed": _eval_seed(predictor, task),
        "platforms": list(exported.platforms),
        "inputs": [
            {"name": "params", "leaves": num_params, "file": PARAMS_FILE},
            *(_array_spec(name, aval) for name, aval in arrays.items()),
        ],
        "outputs": [_array_spec(name, aval) for name, aval in sorted(outputs.items())],
    }


def _write_bytes(path: str, data: bytes) -> None:
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(data)


def _vocab_entry(config: Any) -> dict:
    space = vocab.TokenSpace.from_config(config.vocab)
    return {
        "coord_shift": space.coord_shift,
        "bins": space.bins,
        "text_shift": space.text_shift,
        "text_vocab_size": space.text_vocab_size,
        "vocab_size": space.vocab_size,
        "eos": vocab.EOS,
        "padding": vocab.PADDING,
        "fake_class": vocab.FAKE_CLASS,
        "separator": vocab.SEPARATOR,
        "invisible": vocab.INVISIBLE,
        "class_shift": vocab.CLASS_SHIFT,
        "task_prompts": dict(vocab.TASK_PROMPTS),
        "coordinate": "(token - coord_shift) / (bins - 1): normalised to the canvas, y before x",
        "text": "SentencePiece piece = token - text_shift (tokenizer.model)",
    }


def _categories_entry(labels: Any) -> dict:
    cmap = labels.category_map
    return {
        "categories": [
            {
                "dataset_id": int(d),
                "name": str(n),
                "class_id": int(c),
                "token": vocab.CLASS_SHIFT + int(c),
            }
            for d, n, c in zip(cmap.dataset_ids, cmap.names, cmap.class_ids, strict=True)
        ],
        "keypoint_names": list(cmap.keypoint_names),
    }


def save_export(
    predictor: Predictor,
    out_dir: str,
    tasks: Sequence[str] | None = None,
    batch_size: int = 8,
    platforms: Sequence[str] | None = None,
) -> dict:
    """Exports every task (or `tasks`) and writes the files of the module docstring.

    `out_dir` may be any tf.io.gfile path (local, gs://). The parameters are
    written once, whatever the number of tasks.

    Returns:
      the manifest, as written, with `files`: name → size in bytes.
    """
    config = predictor.config
    names = list(tasks) if tasks else sorted(predictor.tasks)
    for name in names:
        _task(predictor, name)
    if predictor.labels is None:
        raise ValueError("exporting needs the run's labels (category map, tokenizer)")
    tf.io.gfile.makedirs(out_dir)
    files = {}
    entries = {}
    for name in names:
        exported = export_task(predictor, name, batch_size, platforms=platforms)
        entries[name] = _task_entry(predictor, predictor.tasks[name], exported)
        blob = bytes(exported.serialize())
        _write_bytes(os.path.join(out_dir, entries[name]["file"]), blob)
        files[entries[name]["file"]] = len(blob)

    leaves = [np.asarray(jax.device_get(x)) for x in param_leaves(predictor)]
    param_names = [f"p{i:04d}" for i in range(len(leaves))]
    buffer = io.BytesIO()
    np.savez(buffer, **dict(zip(param_names, leaves, strict=True)))
    _write_bytes(os.path.join(out_dir, PARAMS_FILE), buffer.getvalue())
    files[PARAMS_FILE] = buffer.getbuffer().nbytes

    tokenizer = getattr(predictor.labels, "tokenizer", None)
    if tokenizer is not None and "captioning" in names:
        # Writes the model and its human-readable `.vocab` listing beside it.
        tokenizer.save(os.path.join(out_dir, TOKENIZER_FILE))
        for name in (TOKENIZER_FILE, TOKENIZER_LISTING):
            files[name] = tf.io.gfile.stat(os.path.join(out_dir, name)).length

    manifest = {
        "format": FORMAT,
        "step": predictor.step,
        "jax_version": jax.__version__,
        "key_impl": KEY_IMPL,
        "call": "jax.export.deserialize(bytearray(file)).call(params, images, prompts, ids, seed)",
        "params": {
            "file": PARAMS_FILE,
            "names": param_names,
            "values": sum(int(x.size) for x in leaves),
        },
        "image": {
            "size": int(config.data.image_size),
            "range": [0.0, 1.0],
            "pad_value": float(config.data.pad_value),
            "layout": "RGB, resized keeping its aspect ratio to fit, at the top left, padded",
        },
        "vocab": _vocab_entry(config),
        **_categories_entry(predictor.labels),
        "tokenizer": TOKENIZER_FILE if TOKENIZER_FILE in files else None,
        "tasks": entries,
        "files": files,
    }
    _write_bytes(os.path.join(out_dir, MANIFEST_FILE), json.dumps(manifest, indent=2).encode())
    return manifest


def _define_flags() -> None:
    # Defined only when run as a program: main.py defines --workdir too, and
    # both modules may be imported in one process (tests).
    flags.DEFINE_string("workdir", None, "Folder of the training run.", required=True)
    flags.DEFINE_string(
        "out", None, "Folder to write the export to (local or gs://).", required=True
    )
    flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
    flags.DEFINE_list("tasks", None, "Tasks to export; default: all of the run's.")
    flags.DEFINE_integer("batch_size", 8, "Rows per call of every exported program.")
    flags.DEFINE_list("platforms", None, "Backends, e.g. cpu,cuda,tpu; default: this one.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    # TensorFlow only reads files here; it must not claim the accelerators.
    tf.config.set_visible_devices([], "GPU")
    f = flags.FLAGS
    predictor = Predictor.from_workdir(f.workdir, f.step)
    manifest = save_export(predictor, f.out, f.tasks, f.batch_size, f.platforms)
    print(f"Exported step {manifest['step']} of {f.workdir} to {f.out}:")
    for name, size in manifest["files"].items():
        print(f"  {name:32s} {size:>12,d} bytes")
    print(f"  {MANIFEST_FILE}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
