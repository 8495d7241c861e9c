r"""Input speed: each task's tf.data examples/s against what the train step consumes.

    python -m benchmarks.input --config configs/multitask_synthetic.py [--set a.b=v ...]

Builds every task's training pipeline on the config's data (the embedded set
by default), as a run does, and draws batches from it after a warm-up: each
task alone (examples/s), then all tasks in turn (the input of whole steps,
steps/s). The train step is timed in the same run on batches from those
pipelines (benchmarks.train). `headroom` is the input's rate over the
step's consumption (`batch × steps/s`); below 1 the accelerator waits for
data. On a CPU both share the same cores during training, so the figures
bound what a run can reach rather than predict it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from benchmarks.bench_config import load_config, override
from benchmarks.common import report
from benchmarks.train import measure, pipeline_batches, pipeline_iterators
from unified_seq import train


def _rate(draw: Any, count: int, repeats: int) -> float:
    """Median calls per second of `draw()` over `repeats` rounds of `count` calls."""
    rates = []
    for _ in range(repeats):
        tic = time.perf_counter()
        for _ in range(count):
            draw()
        rates.append(count / (time.perf_counter() - tic))
    return statistics.median(rates)


def measure_input(config: Any, warmup: int, count: int, repeats: int) -> dict[str, Any]:
    """Examples/s of each task's pipeline alone and steps/s of all of them in turn."""
    batch_sizes = train.task_batch_sizes(config)
    draw, iterators = pipeline_iterators(config)
    for iterator in iterators.values():
        for _ in range(warmup):  # tracing, the first files, the buffers filling
            draw(iterator)
    per_task = {}
    for name, iterator in iterators.items():
        rate = _rate(lambda it=iterator: draw(it), count, repeats)
        per_task[name] = {
            "batch": batch_sizes[name],
            "examples_per_s": round(rate * batch_sizes[name], 1),
        }

    def whole_step() -> None:
        for iterator in iterators.values():
            draw(iterator)

    return {"tasks": per_task, "steps_per_s": round(_rate(whole_step, count, repeats), 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/multitask_synthetic.py")
    parser.add_argument("--set", action="append", default=[], help="field.path=value")
    parser.add_argument("--warmup", type=int, default=5, help="batches drawn before timing")
    parser.add_argument("--batches", type=int, default=20, help="batches per timed round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step_repeats", type=int, default=10, help="train steps timed")
    parser.add_argument("--results", default="", help="results file (default results.jsonl)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    for assignment in args.set:
        override(config, assignment)
    given = measure_input(config, args.warmup, args.batches, args.repeats)
    lengths = train.sequence_lengths(config)
    step = measure(config, lengths, args.step_repeats, 512, pipeline_batches(config, 4))
    steps_per_s = step["steps_per_s"]
    for row in given["tasks"].values():
        row["consumed_per_s"] = round(row["batch"] * steps_per_s, 1)
        row["headroom"] = round(row["examples_per_s"] / row["consumed_per_s"], 2)
    figures = {
        "tasks": given["tasks"],
        "input_steps_per_s": given["steps_per_s"],
        "train_steps_per_s": steps_per_s,
        "headroom": round(given["steps_per_s"] / steps_per_s, 2),
    }
    return report("input", {"config": args.config, "set": args.set}, figures, args.results)


if __name__ == "__main__":
    main()
