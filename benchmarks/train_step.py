r"""Cost of the batch-mixing train step, whole and task by task.

    python benchmarks/train_step.py [--config configs/multitask_synthetic.py] \
        [--set train.batch_size=8 --set tasks.object_detection.batch_size=16] \
        [--out train_step_b8.json]

Times the jitted step of a config on random inputs of the config's shapes
(each task's own batch size and sequence length): the full step, then a step
with one task's batch alone. The per-task figures show where a step's time
goes when choosing batch sizes and sequence lengths for a time budget; the
input pipeline is not included. Prints medians of 10 steps and writes
benchmarks/results/<--out> (default train_step.json).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from bench_config import load_config, override
from timing import median_seconds

from unified_seq import optim, train, vocab
from unified_seq.tasks import build_tasks

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _random_batches(config, space: vocab.TokenSpace, rng: np.random.Generator) -> dict:
    size = int(config.data.image_size)
    tasks = build_tasks(config)
    batches = {}
    for task, batch in train.task_batch_sizes(config).items():
        shape = [batch, *tasks[task].sequence_shape]
        tokens = rng.integers(0, space.vocab_size, shape).astype(np.int32)
        batches[task] = {
            "image": rng.random([batch, size, size, 3], np.float32),
            "input_seq": tokens,
            "target_seq": np.roll(tokens, -1, axis=-1),
            "token_weights": np.ones(shape, np.float32),
        }
    return batches


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/multitask_synthetic.py")
    parser.add_argument("--set", action="append", default=[], help="field.path=value")
    parser.add_argument("--out", default="train_step.json")
    args = parser.parse_args()

    config = load_config(args.config)
    for assignment in args.set:
        override(config, assignment)
    space = vocab.TokenSpace.from_config(config.vocab)
    model = train.build_model(config, space)
    steps = int(config.train.steps)
    optimizer = optim.make_optimizer(config.optim, steps)
    weights = train.task_weights(config)
    seq_len = max(train.sequence_lengths(config).values())
    size = int(config.data.image_size)
    params = model.init(
        jax.random.key(0),
        jnp.zeros([1, size, size, 3]),
        jnp.zeros([1, seq_len], jnp.int32),
    )["params"]
    state = train.TrainState(jnp.zeros([], jnp.int32), params, optimizer.init(params))
    batches = _random_batches(config, space, np.random.default_rng(0))

    def timed(tasks):
        step = jax.jit(
            train.make_train_step(
                model,
                optimizer,
                optim.schedule(config.optim, steps),
                {t: weights[t] for t in tasks},
                seed=0,
            )
        )
        subset = {t: batches[t] for t in tasks}
        return median_seconds(lambda: step(state, subset)[1]["loss"], 10)

    result = {
        "device": jax.devices()[0].device_kind,
        "config": args.config,
        "overrides": args.set,
        "batch_sizes": train.task_batch_sizes(config),
        "sequence_lengths": train.sequence_lengths(config),
        "step_s": round(timed(sorted(batches)), 4),
    }
    result["task_alone_s"] = {t: round(timed([t]), 4) for t in sorted(batches)}
    print(json.dumps(result, indent=2))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, args.out), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
