"""The trained model as a sampler: jitted encoding and constrained cached decoding.

    predictor = Predictor.from_workdir("/tmp/us")          # latest checkpoint
    records = predictor.predict(["a.jpg", "b.png"])        # all the run's tasks
    records[0]["objects"][0]    # box, category, score, mask, keypoints
    records[0]["captioning"]    # {"caption": ...}

`Predictor.sample` is what evaluation and prediction share: a batch of one
task's prompts and images in, the task's sampled answers out, data-parallel
over a device mesh. Every row draws with its own key, made from the task,
the image id and the prompt's index within the image (`row_ids`), so the
answers of an image do not depend on the batch it was sampled in:
`predict` over a split's images writes the very results that evaluation
scores, given the same seed.

`predict` (prediction.py) runs detection first and prompts segmentation and
keypoints with its top detections, all instances of a batch of images
together.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from unified_seq import checkpoint, decoding, defaults, sharding, vocab
from unified_seq.data.categories import CategoryMap
from unified_seq.models import sizes
from unified_seq.tasks import build_tasks
from unified_seq.tasks.task import SamplerOptions, Task
from unified_seq.tasks.tokenizer import CaptionTokenizer


def sampling_seed(config: Any) -> int:
    """The seed evaluation and prediction sample with (training's dropout uses config.seed)."""
    return int(config.seed) + 1


def task_key(seed: int, task: Task) -> jax.Array:
    """The base key of a task's answers; rows fold in their identity (`row_ids`)."""
    return jax.random.fold_in(jax.random.key(seed), task.prompt_token)


def row_ids(batch: dict[str, np.ndarray]) -> np.ndarray:
    """uint32[n, 3] identity of each row: image id (low and high 32 bits), prompt index.

    Rows without an image id (blank filler rows) are all zeros.
    """
    n = len(batch["image"])
    image_id = np.asarray(batch.get("image/id", np.zeros([n], np.int64)), np.int64).reshape(n)
    index = np.asarray(batch.get("prompt/index", np.zeros([n], np.int64)), np.int64).reshape(n)
    as_u64 = image_id.astype(np.uint64)
    return np.stack(
        [as_u64 & 0xFFFFFFFF, as_u64 >> np.uint64(32), index.astype(np.uint64)], axis=1
    ).astype(np.uint32)


@dataclasses.dataclass
class RunLabels:
    """What tasks need to know of the trained run's data (`tasks.task.Labels`)."""

    category_map: CategoryMap
    tokenizer: CaptionTokenizer | None


def _overlay(base: ml_collections.ConfigDict, values: dict) -> None:
    """Writes saved `values` over `base`: fields a newer version added keep their defaults."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(base.get(key), ml_collections.ConfigDict):
            _overlay(base[key], value)
        elif isinstance(base.get(key), tuple) and isinstance(value, list):
            base[key] = tuple(value)
        else:
            # A field this version lacks, or a type the saved run wrote differently.
            with base.ignore_type():
                base[key] = value


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run trained with, from `WORKDIR/config.json`.

    The saved values are laid over today's defaults, so a run saved by an
    older version (missing newer fields) still loads.
    """
    path = os.path.join(workdir, "config.json")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path} not found: --workdir must be the folder of a training run "
            "(python -m unified_seq.main ... --workdir DIR writes DIR/config.json)"
        )
    with tf.io.gfile.GFile(path) as f:
        saved = json.load(f)
    base = ml_collections.ConfigDict(
        {
            "seed": 0,
            "vocab": defaults.vocab_config(),
            "data": defaults.data_config(),
            "tasks": {
                name: block
                for name, block in defaults.task_configs().items()
                if name in saved.get("tasks", {})
            },
            "model": sizes.model_config(saved.get("model", {}).get("variant", "tiny")),
            "optim": defaults.optim_config(),
            "train": defaults.train_config(),
            "eval": defaults.eval_config(),
            "mesh": defaults.mesh_config(),
            "sharding_rules": ".*=replicate",
        }
    )
    _overlay(base, saved)
    return base


def load_labels(workdir: str, config: Any) -> RunLabels:
    """The run's category map (`categories.json`) and caption tokenizer (`tokenizer.model`)."""
    categories = os.path.join(workdir, "categories.json")
    if not tf.io.gfile.exists(categories):
        raise FileNotFoundError(
            f"{categories} not found: it is written when training starts; is {workdir} a run?"
        )
    tokenizer = None
    if "captioning" in config.tasks:
        path = config.data.tokenizer_path or os.path.join(workdir, "tokenizer.model")
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(
                f"{path} not found: captioning needs the run's SentencePiece model (an imported "
                "run: import again with --config.data.tokenizer_path=<its .model file>)"
            )
        tokenizer = CaptionTokenizer.load(path)
    return RunLabels(CategoryMap.load(categories), tokenizer)


def default_mesh(config: Any) -> Mesh:
    """The run's mesh when it fits these devices, else data parallel over all of them."""
    try:
        return sharding.mesh_from_config(config)
    except ValueError as e:
        logging.warning("config.mesh=%s does not fit here (%s); using data:-1", config.mesh, e)
        return sharding.make_mesh([("data", -1)])


class Predictor:
    """Jitted encoding and cached sampling, data-parallel over a device mesh.

    One compile per task and batch shape. Each process passes its own rows;
    they are split over every device of the mesh (parameters keep their own
    sharding, replicated or split across hosts) and each process gets back
    the answers of its own rows.

    Args:
      model: the EncoderDecoder.
      params: its parameters.
      mesh: devices to decode on; default: every device, data parallel.
      labels: the data set's category map and tokenizer (grammars, results).
      config: the run's config, when built from a workdir.
    """

    def __init__(
        self,
        model: Any,
        params: Any,
        mesh: Mesh | None = None,
        labels: Any = None,
        config: Any = None,
    ):
        self.model = model
        self.variables = {"params": params}
        self.mesh = mesh if mesh is not None else sharding.make_mesh([("data", -1)])
        self.labels = labels
        self.config = config
        self.step: int | None = None
        self.tasks: dict[str, Task] = build_tasks(config) if config is not None else {}
        self._samplers: dict[str, Any] = {}

    @classmethod
    def from_workdir(
        cls, workdir: str, step: int | None = None, mesh: Mesh | None = None
    ) -> Predictor:
        """The model of a training run: its config, labels and saved parameters.

        Args:
          workdir: the run's folder (local or gs://).
          step: which checkpoint; None: the latest.
          mesh: devices to run on; default: the run's mesh if it fits, else
            data parallel over every device.
        """
        config = load_run_config(workdir)
        labels = load_labels(workdir, config)
        item, found_step = checkpoint.locate(workdir, step)
        mesh = mesh if mesh is not None else default_mesh(config)
        space = vocab.TokenSpace.from_config(config.vocab)
        # Imported here: train imports evaluation, which imports this module.
        from unified_seq import train

        model = train.build_model(config, space)
        shapes = checkpoint.params_shapes(item)
        shardings = sharding.tree_shardings(shapes, mesh, sharding.rules_from_config(config))
        abstract = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        )
        params = checkpoint.restore_params(item, abstract)
        checkpoint.check_finite_params(params, found_step, workdir)
        predictor = cls(model, params, mesh, labels, config)
        predictor.step = found_step
        logging.info("Loaded %s at step %d", workdir, found_step)
        return predictor

    @property
    def rows_multiple(self) -> int:
        """A process's batch must be a multiple of this: its devices on the mesh."""
        return max(1, self.mesh.devices.size // jax.process_count())

    def sampler_options(self, task: Task) -> SamplerOptions:
        return task.sampler_options(self.labels)

    def _sampler(self, task: Task):
        if task.name not in self._samplers:
            opts = self.sampler_options(task)
            self._samplers[task.name] = jax.jit(
                sample_fn(self.model, opts), out_shardings=sharding.batch_sharding(self.mesh)
            )
        return self._samplers[task.name]

    def compiled_shapes(self, task: Task) -> int:
        """How many batch shapes the task's sampler has compiled for (bucketing check)."""
        sampler = self._samplers.get(task.name)
        return 0 if sampler is None else sampler._cache_size()

    def sample(self, task: Task, batch: dict[str, np.ndarray], rng: jax.Array) -> dict:
        """Answers for this process's rows; rows b·S … b·S+S-1 are the S samples of row b.

        Every process calls it together. `rng` is the task's key (`task_key`);
        each row draws with it folded with the row's identity (`row_ids`).
        """
        n = len(batch["image"])
        if n % self.rows_multiple:
            raise ValueError(
                f"a batch of {n} rows per process does not split over this process's "
                f"{self.rows_multiple} devices; see eval.batch_size"
            )
        local = {
            "image": np.asarray(batch["image"], np.float32),
            "prompt": np.asarray(batch["prompt"], np.int32),
            "ids": row_ids(batch),
        }
        g = sharding.to_global(local, self.mesh)
        out = self._sampler(task)(self.variables, g["image"], g["prompt"], g["ids"], rng)
        local_out = multihost_utils.global_array_to_host_local_array(
            out, self.mesh, sharding.batch_sharding(self.mesh).spec
        )
        return jax.device_get(local_out)

    def predict(
        self,
        images: Sequence[Any],
        tasks: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> list[dict]:
        """Predictions for every image: detections with their masks and keypoints, a caption.

        See `prediction.predict_images` for the arguments and the record format.
        """
        return list(self.iter_predict(images, tasks, **kwargs))

    def iter_predict(
        self, images: Sequence[Any], tasks: Sequence[str] | None = None, **kwargs: Any
    ) -> Iterator[dict]:
        """`predict`, one record at a time as batches finish (for progress and streaming)."""
        from unified_seq import prediction

        yield from prediction.predict_images(self, images, tasks, **kwargs)

    def with_task_settings(self, name: str, **settings: Any) -> Task:
        """The task `name` with some config fields changed (e.g. detections_per_image)."""
        task = self.tasks[name]
        if not settings:
            return task
        cfg = copy.deepcopy(task.cfg)
        with cfg.unlocked():
            cfg.update(settings)
        return type(task)(name, cfg, task.run)


def sample_fn(model: Any, opts: SamplerOptions) -> Callable[..., dict[str, jax.Array]]:
    """encode → repeat for the samples → cached sampling, with per-row keys.

    Returns `run(variables, images, prompts, ids, rng)`, traceable and free of
    host state, so `Predictor` jits it and `export.py` exports it.
    """

    def run(variables, images, prompts, ids, rng):
        encoded = model.apply(variables, images, method=model.encode)
        keys = decoding.row_keys(rng, ids)
        if opts.num_samples > 1:
            # Sample s of row b is row b·S + s: it stays on b's device.
            encoded = jnp.repeat(encoded, opts.num_samples, axis=0)
            prompts = jnp.repeat(prompts, opts.num_samples, axis=0)
            samples = jnp.tile(jnp.arange(opts.num_samples, dtype=jnp.uint32), len(ids))
            keys = jax.vmap(jax.random.fold_in)(jnp.repeat(keys, opts.num_samples), samples)
        out = decoding.sample_sequences(
            model,
            variables,
            encoded,
            prompts,
            keys,
            max_len=opts.max_len,
            temperature=opts.temperature,
            top_k=opts.top_k,
            top_p=opts.top_p,
            logits_range=opts.logits_range,
            return_logits=opts.return_logits,
            grammar=opts.grammar,
        )
        out.pop("num_steps")
        return out

    return run
