r"""Train-step speed: steps/s, images/s, FLOPs per step and model FLOPs utilisation.

    python -m benchmarks.train --shared            # the side-by-side config (below)
    python -m benchmarks.train --config configs/multitask_synthetic.py [--set a.b=v ...]

`--shared` is the config timed against the official TF2 Pix2Seq: image 224,
patch 16, encoder and decoder 4 × 256 (mlp 1024, 4 heads), vocab 35000,
sequence 128, batch 8, float32, dropout 0, every token weight 1 (the same
math on both sides), one detection batch per step. `--config` times a
config's own batch-mixing step on random tokens of its shapes.

`--real` times batches drawn from the config's training pipelines on the
embedded set instead (`--shared --real`: detection at the shared sizes,
25 objects per sequence), where padding and the coordinates of noise objects
carry weight 0: with `--set tasks.object_detection.projected_fraction=0.4`
only the weighted positions are projected onto the vocabulary (loss.py).

FLOPs per step come from XLA's cost analysis of the compiled step, next to an
analytic count of the model's matmuls (3 × forward); MFU is the analytic
count per second over the float32 matmul peak (benchmarks.peak) timed
between the steps. Prints one JSON line and appends it to results.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks.bench_config import load_config, override
from benchmarks.common import median_seconds, report
from unified_seq import defaults, optim, train, vocab
from unified_seq.data import inputs, pipeline
from unified_seq.models import sizes
from unified_seq.tasks import build_tasks

SHARED = dict(image=224, patch=16, depth=4, width=256, mlp=1024, heads=4, seq=128, batch=8)
# Detection sequences of the pipeline at the shared length: 25 objects × 5
# tokens, the prompt and EOS (127 tokens).
SHARED_REAL_OBJECTS = 25
REAL_BATCHES = 4  # pipeline batches the timed steps take in turn


def shared_model_config(s: dict[str, int]) -> ml_collections.ConfigDict:
    """The `config.model` block of the side-by-side sizes `s` (see SHARED), dropout off."""
    return sizes.model_config(
        "tiny",
        patch_size=s["patch"],
        enc_depth=s["depth"],
        enc_width=s["width"],
        enc_mlp_dim=s["mlp"],
        enc_heads=s["heads"],
        dec_depth=s["depth"],
        dec_width=s["width"],
        dec_mlp_dim=s["mlp"],
        dec_heads=s["heads"],
        dropout=0.0,
        drop_path=0.0,
    )


def shared_config(s: dict[str, int] | None = None) -> ml_collections.ConfigDict:
    """The side-by-side config: one detection task, official vocabulary (35000 tokens).

    `s`: the sizes (default SHARED).
    """
    s = s or SHARED
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.vocab = defaults.vocab_config()
    config.data = defaults.data_config()
    config.data.image_size = s["image"]
    config.tasks = ml_collections.ConfigDict(
        {"object_detection": defaults.task_configs().object_detection}
    )
    config.tasks.object_detection.batch_size = s["batch"]
    config.tasks.object_detection.weight = 1.0
    config.model = shared_model_config(s)
    config.optim = defaults.optim_config()
    config.train = defaults.train_config()
    config.train.batch_size = s["batch"]
    return config


def analytic_flops(config: Any, image: int, lengths: dict[str, int], batches: dict) -> float:
    """Matmul FLOPs of one training step (forward × 3), summed over the tasks' batches."""
    m = sizes.resolve(config.model)
    space = vocab.TokenSpace.from_config(config.vocab)
    n = (image // m["patch_size"]) ** 2
    we, wd, me, md = m["enc_width"], m["dec_width"], m["enc_mlp_dim"], m["dec_mlp_dim"]
    encoder = 2 * n * m["patch_size"] ** 2 * 3 * we + m["enc_depth"] * (
        2 * n * 4 * we * we + 2 * n * 2 * we * me + 4 * n * n * we
    )
    bridge = 2 * n * we * wd + 2 * n * 2 * wd * (me // we * wd)
    total = 0.0
    for task, batch in batches.items():
        rows = int(np.prod(batch["input_seq"].shape[:-1]))
        t = lengths[task]
        images = batch["image"].shape[0]
        layer = (
            2 * t * 4 * wd * wd  # self-attention projections
            + 2 * t * 2 * wd * wd  # cross-attention query and output
            + 2 * n * 2 * wd * wd  # cross-attention keys and values of the image
            + 4 * t * t * wd  # self-attention scores and mixing
            + 4 * t * n * wd  # cross-attention scores and mixing
            + 2 * t * 2 * wd * md  # MLP
        )
        decoder = m["dec_depth"] * layer + 2 * t * wd * space.vocab_size
        total += images * (encoder + bridge) + rows * decoder
    return 3.0 * total


def _random_batches(config: Any, space: vocab.TokenSpace, lengths: dict, seed: int = 0) -> dict:
    r = np.random.default_rng(seed)
    size = int(config.data.image_size)
    out = {}
    for task, batch in train.task_batch_sizes(config).items():
        shape = [batch, lengths[task]]
        tokens = r.integers(0, space.vocab_size, shape).astype(np.int32)
        out[task] = {
            "image": r.random([batch, size, size, 3], np.float32),
            "input_seq": tokens,
            "target_seq": np.roll(tokens, -1, axis=-1),
            "token_weights": np.ones(shape, np.float32),
        }
    return out


def pipeline_iterators(config: Any) -> tuple[Callable[[Any], dict], dict[str, Any]]:
    """(next numpy batch of an iterator, every task's training-batch iterator)."""
    space = vocab.TokenSpace.from_config(config.vocab)
    data = inputs.load_split(config, config.data.train_split, space)
    batch_sizes = train.task_batch_sizes(config)
    iterators = {}
    for k, (name, task) in enumerate(build_tasks(config).items()):
        ds = pipeline.train_dataset(
            task, data.examples, data, config, batch_size=batch_sizes[name], seed=k
        )
        iterators[name] = iter(ds)
    return lambda iterator: inputs.next_numpy(iterator, data), iterators


def pipeline_batches(config: Any, count: int) -> list[dict]:
    """`count` training batches of every task, drawn from its tf.data pipeline."""
    draw, iterators = pipeline_iterators(config)
    streams = {name: [draw(it) for _ in range(count)] for name, it in iterators.items()}
    batches = [{t: s[i] for t, s in streams.items()} for i in range(count)]
    # Only the model's inputs (the pipeline also counts truncated objects).
    keys = ("image", "input_seq", "target_seq", "token_weights")
    return [{t: {k: b[k] for k in keys} for t, b in step.items()} for step in batches]


def weighted_share(batches: list[dict]) -> dict[str, float]:
    """Share of each task's sequence positions with loss weight > 0, over `batches`."""
    tasks = batches[0]
    return {
        t: round(float(np.mean([np.mean(b[t]["token_weights"] != 0) for b in batches])), 3)
        for t in tasks
    }


@dataclasses.dataclass
class CompiledStep:
    """A config's compiled train step, ready to time on its batches."""

    run: Callable[[dict], Any]  # one step on a batch; returns its loss (not yet ready)
    batches: list[dict]
    parameters: int
    xla_flops: float
    analytic_flops: float  # every position projected (the official step's FLOPs)
    images: int  # per step


def compile_step(
    config: Any, lengths: dict[str, int], batches: list[dict] | None = None
) -> CompiledStep:
    """Builds and compiles the batch-mixing step of `config` for sequences of `lengths`.

    `batches`: the steps' inputs (default: one batch of random tokens, every
    position weighted).
    """
    space = vocab.TokenSpace.from_config(config.vocab)
    model = sizes.build_model(
        config.model,
        space.vocab_size,
        max(lengths.values()),
        coord_range=(space.coord_shift, space.bins),
    )
    steps = int(config.train.steps)
    optimizer = optim.make_optimizer(config.optim, steps)
    size = int(config.data.image_size)
    # Jitted: run eagerly, initialisation compiles one program per operation.
    params = jax.jit(model.init, static_argnames="train")(
        jax.random.key(0),
        jnp.zeros([1, size, size, 3]),
        jnp.zeros([1, max(lengths.values())], jnp.int32),
        train=False,
    )["params"]
    state = train.TrainState(jnp.zeros([], jnp.int32), params, jax.jit(optimizer.init)(params))
    batches = batches or [_random_batches(config, space, lengths)]
    # The state is donated and carried from step to step, as the training
    # loop runs it: each step updates the parameters and moments in place
    # (a step that writes fresh buffers is ~1% slower here).
    step = jax.jit(
        train.make_train_step(
            model,
            optimizer,
            optim.schedule(config.optim, steps),
            train.task_weights(config),
            seed=0,
            projected=train.projected_fractions(config),
            loss_groups=jax.device_count(),
        ),
        donate_argnums=0,
    )
    compiled = step.lower(state, batches[0]).compile()  # compiled once: counted and timed
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    parameters = int(sum(x.size for x in jax.tree.leaves(params)))
    carried = [state]

    def run(batch: dict) -> jax.Array:
        carried[0], metrics = compiled(carried[0], batch)
        return metrics["loss"]

    return CompiledStep(
        run=run,
        batches=batches,
        parameters=parameters,
        xla_flops=float(cost.get("flops", 0.0)),
        analytic_flops=analytic_flops(config, size, lengths, batches[0]),
        images=sum(b["image"].shape[0] for b in batches[0].values()),
    )


def measure(
    config: Any,
    lengths: dict[str, int],
    repeats: int = 10,
    peak_size: int = 2048,
    batches: list[dict] | None = None,
) -> dict[str, Any]:
    """Times the jitted step of `config` with sequences of `lengths`.

    `batches`: the steps' inputs, in turn (`compile_step`). MFU: the analytic
    FLOPs per second over the float32 matmul peak of a [peak_size]² product
    timed between the steps.
    """
    step = compile_step(config, lengths, batches)
    # The step and the matmul peak alternate, so that both see the same
    # machine: a shared CPU's speed moves within minutes.
    product = peak_product(peak_size)
    step_times, peak_times = [], []
    for i in range(repeats):
        batch = step.batches[i % len(step.batches)]
        step_times.append(median_seconds(lambda: step.run(batch), 1))  # noqa: B023
        peak_times.append(median_seconds(product, 1))
    seconds = statistics.median(step_times)
    peak = 2 * peak_size**3 / statistics.median(peak_times) / 1e9
    flops = step.analytic_flops
    return {
        "step_s": round(seconds, 4),
        "steps_per_s": round(1 / seconds, 3),
        "images_per_s": round(step.images / seconds, 2),
        "xla_gflops_per_step": round(step.xla_flops / 1e9, 2),
        "analytic_gflops_per_step": round(flops / 1e9, 2),
        "achieved_gflops": round(flops / seconds / 1e9, 1),
        "parameters": step.parameters,
        "float32_gflops": round(peak, 1),
        "mfu": round(flops / seconds / 1e9 / peak, 3),
        "weighted_share": weighted_share(step.batches),
        "projected_fraction": train.projected_fractions(config),
    }


def peak_product(size: int = 2048) -> Callable[[], jax.Array]:
    """A jitted float32 [size]² product to time between steps (2·size³ FLOPs)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    product = jax.jit(jnp.matmul)
    return lambda: product(a, a)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", action="store_true", help="the side-by-side config")
    parser.add_argument("--config", default="configs/multitask_synthetic.py")
    parser.add_argument("--set", action="append", default=[], help="field.path=value")
    parser.add_argument("--real", action="store_true", help="batches from the pipelines")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak_size", type=int, default=2048)
    parser.add_argument("--results", default="", help="results file (default results.jsonl)")
    args = parser.parse_args(argv)
    config = shared_config() if args.shared else load_config(args.config)
    if args.shared and args.real:
        config.data.source = "synthetic"
        config.tasks.object_detection.max_instances = SHARED_REAL_OBJECTS
    for assignment in args.set:
        override(config, assignment)
    lengths = train.sequence_lengths(config)
    if args.shared and not args.real:
        lengths = {"object_detection": SHARED["seq"]}
    batches = pipeline_batches(config, REAL_BATCHES) if args.real else None
    figures = measure(config, lengths, args.repeats, args.peak_size, batches)
    name = {"shared": args.shared, "config": None if args.shared else args.config, "set": args.set}
    name["real"] = args.real
    return report("train", name, figures, args.results)


if __name__ == "__main__":
    main()
