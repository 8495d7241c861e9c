"""A training run, top to bottom: inputs, model, sharding, step, checkpoints, loop.

Batch mixing (Pix2Seq v2, Algorithm 2): every step draws one batch per task,
each with its own augmentation and tokenization, and takes one gradient of
`Σ_t λ_t L_t`, where `L_t` is the token-weighted cross-entropy of task t.
Data mixing (Algorithm 1, `train.mixing=data`) instead concatenates fixed
shares of every task's examples into one batch with one loss.

The step is a pure function of (state, batches): its randomness is
`fold_in(seed, step)`, so a resumed run needs no stored RNG.

Faults: the step reports whether its loss, gradients and new parameters are
finite; a non-finite step stops the run before anything of it is saved
(`NonFiniteError` names the step and the last good checkpoint). SIGTERM
saves the state at the next step boundary and stops (`Preempted`). Resuming
restores the newest readable, finite checkpoint (checkpoint.py).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers

from unified_seq import checkpoint, evaluate, init_from, optim, preemption, sharding, vocab
from unified_seq import workdir as workdir_lib
from unified_seq.data import inputs, pipeline
from unified_seq.errors import CheckpointError, ConfigError, NonFiniteError, Preempted
from unified_seq.loss import hidden_token_loss
from unified_seq.models import sizes
from unified_seq.progress import format_eta, say
from unified_seq.tasks import build_tasks

MIXINGS = ("batch", "data")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def sequence_lengths(config: Any) -> dict[str, int]:
    """Decoder input length of every configured task."""
    return {name: task.sequence_length for name, task in build_tasks(config).items()}


def build_model(config: Any, space: vocab.TokenSpace):
    """The model for `config.model`, long enough for every task's sequences."""
    return sizes.build_model(
        config.model,
        space.vocab_size,
        max(sequence_lengths(config).values()),
        coord_range=(space.coord_shift, space.bins),
    )


def task_losses(
    params: Any,
    model: Any,
    batches: Mapping[str, Mapping[str, jax.Array]],
    rng: jax.Array,
    *,
    train: bool = True,
    label_smoothing: float = 0.0,
    normalizers: Mapping[str, jax.Array] | None = None,
    projected: Mapping[str, float] | None = None,
    loss_groups: int = 1,
) -> dict[str, jax.Array]:
    """Loss of each task's batch; each task encodes its own images.

    `normalizers[task]` replaces the batch's own `Σ w` (see `token_loss`).
    `projected[task]` < 1 projects only the weighted positions of the task's
    batch, in `loss_groups` groups of rows (`loss.hidden_token_loss`): the
    same loss, fewer FLOPs; a task not in `projected` projects every position.
    """
    losses = {}
    for i, task in enumerate(sorted(batches)):
        batch = batches[task]
        model_args = (batch["image"], batch["input_seq"])
        rngs = {"dropout": jax.random.fold_in(rng, i)}
        normalizer = None if normalizers is None else normalizers[task]
        hidden = model.apply(
            {"params": params}, *model_args, train=train, rngs=rngs, method="hidden"
        )
        losses[task] = hidden_token_loss(
            lambda h, t: model.apply(
                {"params": params}, h, t, label_smoothing, method="token_cross_entropy"
            ),
            hidden,
            batch["target_seq"],
            batch["token_weights"],
            fraction=(projected or {}).get(task, 1.0),
            groups=loss_groups,
            normalizer=normalizer,
        )
    return losses


def mixed_loss(
    params: Any,
    model: Any,
    batches: Mapping[str, Mapping[str, jax.Array]],
    rng: jax.Array,
    weights: Mapping[str, float],
    label_smoothing: float = 0.0,
    normalizers: Mapping[str, jax.Array] | None = None,
    projected: Mapping[str, float] | None = None,
    loss_groups: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`Σ_t λ_t L_t` and the per-task losses (the options: see `task_losses`)."""
    losses = task_losses(
        params,
        model,
        batches,
        rng,
        label_smoothing=label_smoothing,
        normalizers=normalizers,
        projected=projected,
        loss_groups=loss_groups,
    )
    total = sum(weights[t] * losses[t] for t in losses)
    return total, losses


def make_train_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    weights: Mapping[str, float],
    *,
    seed: int,
    label_smoothing: float = 0.0,
    microbatches: int = 1,
    projected: Mapping[str, float] | None = None,
    loss_groups: int = 1,
) -> Callable:
    """The pure step `(state, batches) → (state, metrics)`; jit it with shardings.

    `microbatches` k > 1 (`train.microbatches`) splits every task's batch
    into k along its batch axis and adds up their gradients before one
    update, so only one micro-batch's activations are alive at a time. Each
    task's loss is divided by its whole batch's `Σ w`, so the micro-batches'
    losses and gradients add up to the whole batch's: the same update
    (dropout aside: each micro-batch draws its own masks).
    `projected` and `loss_groups`: see `task_losses`.
    """
    projection = {"projected": projected, "loss_groups": loss_groups}
    grad_fn = functools.partial(jax.value_and_grad(mixed_loss, has_aux=True), **projection)

    def split(x: jax.Array) -> jax.Array:
        # [B, ...] → [k, B / k, ...], micro-batch j holding rows j, j + k, …:
        # strided, so each device's rows (a contiguous block of the batch
        # axis) stay on it in every micro-batch and splitting moves no data.
        if x.shape[0] % microbatches:
            raise ValueError(
                f"a batch of {x.shape[0]} does not split into train.microbatches="
                f"{microbatches}; choose a divisor of every task's batch per device"
            )
        x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
        return jnp.moveaxis(x, 1, 0)

    def accumulated_grads(params: Any, batches: Mapping[str, Any], rng: jax.Array):
        normalizers = {t: jnp.sum(b["token_weights"]) for t, b in batches.items()}

        def add(carry, xs):
            j, batch = xs
            rng_j = jax.random.fold_in(rng, j)
            out = grad_fn(params, model, batch, rng_j, weights, label_smoothing, normalizers)
            return jax.tree_util.tree_map(jnp.add, carry, out), None

        # Losses and gradients accumulate in float32.
        zeros = (
            (jnp.zeros([]), {t: jnp.zeros([]) for t in batches}),
            jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        )
        micro = jax.tree_util.tree_map(split, batches)
        out, _ = jax.lax.scan(add, zeros, (jnp.arange(microbatches), micro))
        return out

    def step(state: TrainState, batches: Mapping[str, Any]) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        if microbatches > 1:
            (loss, losses), grads = accumulated_grads(state.params, batches, rng)
        else:
            (loss, losses), grads = grad_fn(
                state.params, model, batches, rng, weights, label_smoothing
            )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        # One flag for the host: is anything this step made NaN or inf? A
        # finite loss can still give inf parameters (a huge learning rate).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        for leaf in jax.tree_util.tree_leaves(params):
            finite &= jnp.all(jnp.isfinite(leaf))
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "finite": finite,
            "learning_rate": schedule(state.step),
            **{f"loss/{t}": v for t, v in losses.items()},
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def task_weights(config: Any) -> dict[str, float]:
    """λ_t of every task (batch mixing), or {"mixed": 1} (data mixing)."""
    if config.train.mixing == "data":
        return {"mixed": 1.0}
    return {t: float(config.tasks[t].weight) for t in config.tasks}


def projected_fractions(config: Any) -> dict[str, float]:
    """`tasks.<t>.projected_fraction` of every task (batch mixing; 1 = every position)."""
    if config.train.mixing == "data":
        return {}
    return {t: float(config.tasks[t].get("projected_fraction", 1.0)) for t in config.tasks}


def task_batch_sizes(config: Any) -> dict[str, int]:
    """Global batch of each task in batch mixing: `tasks.<t>.batch_size`, else `train.batch_size`.

    A cheap task (detection's short sequences) can see more images per step
    than an expensive one (segmentation's long polygons) at little cost.
    """
    default = int(config.train.batch_size)
    return {t: int(config.tasks[t].get("batch_size", 0) or default) for t in config.tasks}


def data_mixing_shares(config: Any) -> dict[str, int]:
    """Examples of each task in one data-mixing batch, in proportion to λ_t."""
    total = int(config.train.batch_size)
    weights = {t: float(config.tasks[t].weight) for t in config.tasks}
    norm = sum(weights.values())
    shares = {t: max(1, round(total * w / norm)) for t, w in weights.items()}
    largest = max(shares, key=shares.get)
    shares[largest] += total - sum(shares.values())
    return shares


def mix_examples(batches: Mapping[str, Mapping[str, np.ndarray]], length: int) -> dict:
    """Concatenates task batches into one, sequences zero-padded to `length`."""
    out: dict[str, list] = {"image": [], "input_seq": [], "target_seq": [], "token_weights": []}
    for task in sorted(batches):
        b = batches[task]
        out["image"].append(b["image"])
        for key in ("input_seq", "target_seq", "token_weights"):
            x = b[key]
            if x.ndim == 3:  # [B, 1, L] rows (validate allows one): one sequence per image
                x = x[:, 0]
            out[key].append(np.pad(x, [(0, 0), (0, length - x.shape[-1])]))
    return {k: np.concatenate(v, axis=0) for k, v in out.items()}


def check_fields(config: Any, training: bool = True) -> None:
    """ConfigError, naming the field, on values no run can use; needs no device or data."""
    try:
        sizes.resolve(config.model)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if training and int(config.train.steps) < 1:
        raise ConfigError(
            f"config.train.steps={config.train.steps}: a training run needs at least 1 step "
            "(to evaluate a trained run, use --mode eval)"
        )
    if int(config.train.batch_size) < 1:
        raise ConfigError(f"config.train.batch_size={config.train.batch_size}: must be >= 1")
    for task in config.tasks:
        own = int(config.tasks[task].get("batch_size", 0) or 0)
        if own < 0:
            raise ConfigError(
                f"config.tasks.{task}.batch_size={own}: must be >= 1 (0 = train.batch_size)"
            )
    if int(config.train.checkpoint_every) < 0 or int(config.train.keep_checkpoints) < 1:
        raise ConfigError(
            f"config.train.checkpoint_every={config.train.checkpoint_every} must be >= 0 and "
            f"config.train.keep_checkpoints={config.train.keep_checkpoints} >= 1"
        )
    if config.train.mixing not in MIXINGS:
        raise ConfigError(f"config.train.mixing={config.train.mixing!r}; choose one of {MIXINGS}")


def validate(config: Any, training: bool = True) -> None:
    """Fails early, naming the field, on settings the run cannot honour."""
    check_fields(config, training)
    tasks = build_tasks(config)
    source = config.data.source
    if source not in inputs.SOURCES:
        raise ValueError(f"config.data.source={source!r}; choose one of {inputs.SOURCES}")
    held = inputs.SOURCE_ANNOTATIONS[source]
    lacking = {name: [a for a in task.annotations if a not in held] for name, task in tasks.items()}
    lacking = {name: kinds for name, kinds in lacking.items() if kinds}
    if lacking:
        needs = "; ".join(f"config.tasks.{n} needs {k}" for n, k in lacking.items())
        raise ValueError(
            f"data.source={source} holds only {list(held)}: {needs}. Use data.source=coco_json, "
            "or remove those tasks from config.tasks"
        )
    evaluate.check_prompt_boxes(config, tasks)
    sharding.mesh_from_config(config)  # raises, naming config.mesh, when it does not fit
    sharding.rules_from_config(config)
    own = [t for t in config.tasks if config.tasks[t].get("batch_size", 0)]
    if own and config.train.mixing == "data":
        raise ValueError(
            f"config.tasks.{own[0]}.batch_size is for train.mixing=batch; data mixing splits "
            "train.batch_size by the task weights"
        )
    check_batch_sizes(config)
    for name, fraction in projected_fractions(config).items():
        if not 0 < fraction <= 1:
            raise ValueError(
                f"config.tasks.{name}.projected_fraction={fraction}: a share of the sequence "
                "positions, in (0, 1] (1 projects every position)"
            )
    if config.train.mixing == "data":
        for name, task in tasks.items():
            if len(task.sequence_shape) > 1 and task.sequence_shape[0] != 1:
                raise ValueError(
                    f"train.mixing=data trains one sequence per image, but config.tasks.{name} "
                    f"gives {task.sequence_shape[0]} (set its captions_per_image or "
                    "instances_per_image to 1)"
                )


def check_batch_sizes(config: Any) -> None:
    """Every global batch must split evenly over the devices and the processes.

    A batch is split along its leading axis over every device of the mesh, and
    each process feeds the rows of its own devices.
    """
    devices, processes = jax.device_count(), jax.process_count()
    where = f"{devices} devices" + (f" on {processes} processes" if processes > 1 else "")
    if config.train.mixing == "data":
        total = int(config.train.batch_size)
        if total % devices:
            raise ValueError(
                f"config.train.batch_size={total} does not split over {where}; use a multiple "
                f"of {devices}, e.g. --config.train.batch_size={_round_up(total, devices)}"
            )
        for task, share in data_mixing_shares(config).items():
            if share % processes:
                raise ValueError(
                    f"data mixing gives {task} {share} of train.batch_size={total} examples, "
                    f"which do not split over {processes} processes; change train.batch_size or "
                    "the task weights"
                )
        return
    micro = int(config.train.get("microbatches", 1))
    for task, size in task_batch_sizes(config).items():
        if micro < 1 or (size // devices) % micro:
            raise ValueError(
                f"config.train.microbatches={micro} must divide {task}'s batch per device "
                f"({size} over {where})"
            )
        if size % devices:
            field = (
                f"tasks.{task}.batch_size"
                if config.tasks[task].get("batch_size", 0)
                else "train.batch_size"
            )
            raise ValueError(
                f"config.{field}={size} (the global batch of {task}) does not split over "
                f"{where}; use a multiple of {devices}, e.g. "
                f"--config.{field}={_round_up(size, devices)}"
            )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def create_state(
    model: Any, optimizer: optax.GradientTransformation, config: Any, mesh: Any, seq_len: int
) -> tuple[TrainState, Any]:
    """Initialises parameters already sharded; returns the state and its shardings."""
    size = int(config.data.image_size)

    def init(rng):
        images = jnp.zeros([1, size, size, 3], jnp.float32)
        tokens = jnp.zeros([1, seq_len], jnp.int32)
        params = model.init(rng, images, tokens, train=False)["params"]
        return TrainState(jnp.zeros([], jnp.int32), params, optimizer.init(params))

    rng = jax.random.key(int(config.seed))
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.tree_shardings(abstract, mesh, sharding.rules_from_config(config))
    state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings


class _Inputs:
    """Per-task tf.data iterators of this process, yielding numpy batches.

    By default `data` is the whole split on every process and each process
    fills its rows of the global batch (the same batches for any process
    count). With `data.shard_annotations` each process holds only its share of
    the split (less memory at start-up) and draws its own order from it.
    """

    def __init__(self, config: Any, data: inputs.SplitData):
        self.data = data
        self.mixing = config.train.mixing
        n, i = jax.process_count(), jax.process_index()
        if self.mixing == "data":
            batch = {t: s // n for t, s in data_mixing_shares(config).items()}
        else:
            batch = {t: s // n for t, s in task_batch_sizes(config).items()}
        sharded = bool(config.data.get("shard_annotations", False))
        tasks = build_tasks(config)
        self.length = max(task.sequence_length for task in tasks.values())
        self.iterators = {}
        for k, (name, task) in enumerate(tasks.items()):
            ds = pipeline.train_dataset(
                task,
                data.examples,
                data,
                config,
                batch_size=max(batch[name], 1),
                seed=int(config.seed) * 100 + k + (7919 * i if sharded else 0),
                process_index=0 if sharded else i,
                process_count=1 if sharded else n,
            )
            self.iterators[name] = iter(ds)
        self.truncated: dict[str, int] = {}

    def next(self) -> dict[str, dict[str, np.ndarray]]:
        batches = {t: inputs.next_numpy(it, self.data) for t, it in self.iterators.items()}
        for task, b in batches.items():
            # Objects (detection) or polygon points (segmentation) that did not
            # fit the sequence: counted, reported, never a crash.
            for key in [k for k in b if k.startswith("num_truncated")]:
                name = f"truncated/{task}"
                self.truncated[name] = self.truncated.get(name, 0) + int(b.pop(key).sum())
        if self.mixing == "data":
            return {"mixed": mix_examples(batches, self.length)}
        return batches


def train(
    config: Any, workdir: str, evaluate_fn: Callable[[int, Any, Any], Any] | None = None
) -> tuple[TrainState, Any]:
    """Trains (or resumes) the run in `workdir`; returns the final state and model.

    `evaluate_fn(step, params, model)` runs every `train.eval_every` steps
    (0 = never) during training.
    """
    validate(config)
    # --- Logging.
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True
    )
    space = vocab.TokenSpace.from_config(config.vocab)
    total_steps = int(config.train.steps)

    # --- Mesh and input.
    mesh = sharding.mesh_from_config(config)
    share = {}
    if config.data.get("shard_annotations", False):
        share = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    say(f"loading the {config.data.train_split} split ({config.data.source})")
    data = inputs.load_split(config, config.data.train_split, space, workdir=workdir, **share)
    # Every task without a usable image is named now, not as a StopIteration later.
    inputs.check_task_examples(config, data)
    if jax.process_index() == 0:
        data.category_map.save(os.path.join(workdir, "categories.json"))
    feed = _Inputs(config, data)

    # --- Model, optimizer and state, created sharded.
    model = build_model(config, space)
    schedule = optim.schedule(config.optim, total_steps)
    optimizer = optim.make_optimizer(config.optim, total_steps)
    state, state_shardings = create_state(model, optimizer, config, mesh, feed.length)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    say(
        f"training on {data.num_images} images, tasks {', '.join(config.tasks)}; model "
        f"{config.model.variant}: {n_params / 1e6:.2f}M parameters"
    )

    # --- Checkpoint: resume from the latest step in the workdir, else start from
    # config.init_from's parameters if set.
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        every=int(config.train.checkpoint_every),
        keep=int(config.train.keep_checkpoints),
    )
    # Into this run's mesh and shardings, whatever the saving run's were.
    restored, start = ckpt.restore_latest(state, lambda: _config_changes(config, workdir))
    start = start or 0
    if start:
        state = restored
        ckpt.restore_inputs(start, feed.iterators)
        say(f"resumed from step {start} ({ckpt.directory})")
        if config.get("init_from"):
            logging.info("config.init_from=%s ignored: resuming this run", config.init_from)
    elif config.get("init_from"):
        # Parameters only: the step stays 0 and the optimizer state is made for
        # the loaded values (adamw's depends only on shapes, others may not).
        params = init_from.load_initial_params(config.init_from, state.params, config)
        opt_state = jax.jit(optimizer.init, out_shardings=state_shardings.opt_state)(params)
        state = state.replace(params=params, opt_state=opt_state)

    # --- The update step.
    step_fn = make_train_step(
        model,
        optimizer,
        schedule,
        task_weights(config),
        seed=int(config.seed),
        label_smoothing=float(config.optim.label_smoothing),
        microbatches=int(config.train.get("microbatches", 1)),
        projected=projected_fractions(config),
        # One group of rows per device: the batch is split over every device.
        loss_groups=mesh.size,
    )
    step_fn = jax.jit(
        step_fn,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )

    # --- Loop. Steps run asynchronously: while step t computes, the host builds
    # batch t+1 and copies it to the devices. Checkpoints are saved before the
    # next batch is drawn, so the saved input position is exactly step t's.
    log_every = max(int(config.train.log_every), 1)
    tic, tic_step = time.perf_counter(), start
    if start < total_steps:
        say(f"training steps {start + 1}-{total_steps} (the first step compiles)")
        batches = sharding.to_global(feed.next(), mesh)
    watch = preemption.PreemptionWatch()
    try:
        for step in range(start + 1, total_steps + 1):
            state, metrics = step_fn(state, batches)
            saved = ckpt.should_save(step, total_steps)
            if saved:
                _check_finite(metrics, step, ckpt)  # never save a non-finite state
                ckpt.save(step, state, feed.iterators)
            if watch.reached(step):
                if not saved:
                    _check_finite(metrics, step, ckpt)
                    ckpt.save(step, state, feed.iterators)
                ckpt.wait()
                writer.flush()
                raise Preempted(step, ckpt.directory)
            if step < total_steps:
                batches = sharding.to_global(feed.next(), mesh)
            if step % log_every == 0 or step == total_steps:
                metrics = jax.device_get(metrics)
                _check_finite(metrics, step, ckpt)
                ckpt.check()  # a failed asynchronous save stops the run here
                rate = (step - tic_step) / (time.perf_counter() - tic)
                _log_step(writer, step, total_steps, metrics, feed.truncated, rate)
                tic, tic_step = time.perf_counter(), step
            eval_every = int(config.train.get("eval_every", 0))
            if evaluate_fn and eval_every and step % eval_every == 0 and step != total_steps:
                evaluate_fn(step, state.params, model)
                tic, tic_step = time.perf_counter(), step
    except BaseException:
        # A save in flight is the last good checkpoint: let it commit first.
        try:
            ckpt.wait()
        except CheckpointError as e:
            logging.error("%s", e)
        # Their threads would outlive the run while the error is handled.
        ckpt.close()
        writer.close()
        feed.iterators.clear()
        raise
    finally:
        watch.close()
    ckpt.wait()
    ckpt.close()
    writer.flush()
    if any(feed.truncated.values()) and jax.process_index() == 0:
        print(f"Did not fit the sequences (counted, trained without): {feed.truncated}", flush=True)
    return state, model


def _log_step(
    writer: Any, step: int, total: int, metrics: dict, truncated: dict, rate: float
) -> None:
    scalars = {k: v for k, v in metrics.items() if k != "finite"}
    writer.write_scalars(step, {**scalars, **truncated, "steps_per_s": rate})
    eta = format_eta((total - step) / rate if rate > 0 else float("inf"))
    per_task = " ".join(f"{k[5:]} {v:.3f}" for k, v in scalars.items() if k.startswith("loss/"))
    say(
        f"step {step}/{total} | loss {scalars['loss']:.4f} ({per_task}) | "
        f"|g| {scalars['grad_norm']:.2f} | lr {scalars['learning_rate']:.2e} | "
        f"{rate:.2f} steps/s | ETA {eta}"
    )


def _config_changes(config: Any, workdir: str) -> list[str]:
    stored = workdir_lib.read_config(workdir)
    if stored is None:
        return []
    return workdir_lib.config_changes(stored, json.loads(config.to_json_best_effort()))


def _check_finite(metrics: Any, step: int, ckpt: checkpoint.Checkpointer) -> None:
    finite, loss = jax.device_get((metrics["finite"], metrics["loss"]))
    if bool(finite):
        return
    last = ckpt.latest_step()
    where = f"step {last} in {ckpt.directory}" if last is not None else "none was saved yet"
    raise NonFiniteError(
        f"the loss ({float(loss)}) or the parameters became NaN/inf at step {step}; the run "
        f"stopped before saving it. The last good checkpoint: {where}. Lower "
        "config.optim.learning_rate (or raise warmup), then run the same command to resume "
        "from it"
    )


def restore_params(config: Any, workdir: str) -> tuple[Any, Any, int]:
    """Parameters of the latest checkpoint in `workdir` (for `--mode eval`).

    Only the parameters are read, into the run's shardings: no optimizer
    state is built or read, so a parameters-only checkpoint (import_official)
    evaluates too.
    """
    space = vocab.TokenSpace.from_config(config.vocab)
    mesh = sharding.mesh_from_config(config)
    model = build_model(config, space)
    total_steps = int(config.train.steps)
    optimizer = optim.make_optimizer(config.optim, total_steps)
    seq_len = max(sequence_lengths(config).values())
    abstract = jax.eval_shape(lambda: create_state(model, optimizer, config, mesh, seq_len)[0])
    shardings = sharding.tree_shardings(abstract, mesh, sharding.rules_from_config(config))
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract.params,
        shardings.params,
    )
    try:
        item, step = checkpoint.locate(workdir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; train first (--mode train) or fix --workdir") from e
    checkpoint.check_shapes(item, params, step, lambda: _config_changes(config, workdir))
    params = checkpoint.restore_params(item, params)
    checkpoint.check_finite_params(params, step, os.path.dirname(os.path.dirname(item)))
    return params, model, step
