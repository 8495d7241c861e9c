r"""Our train step against the official TF2 Pix2Seq's, alternating in one run.

    python -m benchmarks.side_by_side --pix2seq ~/scratch/pix2seq --tf_python ~/tf215/bin/python

Needs, outside the project (never commit them): a checkout of
github.com/google-research/pix2seq (`--pix2seq`) and a Python with its
dependencies (`--tf_python`: tensorflow 2.15 and tensorflow-addons 0.23 on
Python 3.11, plus ml_collections, einops and matplotlib). The official step
runs there (benchmarks/official_step.py); ours runs in this process.

Both sides use the `--shared` config of benchmarks.train (17,191,352
parameters each, float32). Each round times `--steps` steps of, in turn:
the official step (every position projected and scored), ours on the same
math (random tokens, every weight 1), ours on real detection batches from
the embedded set's pipeline (25 objects per 127-token sequence; padding and
noise-object coordinates weigh 0, and `--fraction` sets the share of
positions projected), and a float32 2048² matmul for the peak. Medians over
all rounds; a shared CPU's speed drifts, so only ratios from one run compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import jax

from benchmarks import train as bench_train
from benchmarks.common import report

TINY = dict(bench_train.SHARED, depth=1, width=64, mlp=128, heads=2, image=64, seq=32, batch=2)
OFFICIAL_STEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_step.py")


class Official:
    """The official step in its own Python, driven over stdin/stdout (official_step.py)."""

    def __init__(self, tf_python: str, pix2seq: str, sizes: dict[str, int]):
        cmd = [tf_python, OFFICIAL_STEP, "--pix2seq", pix2seq, "--sizes", json.dumps(sizes)]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        # It builds while ours compile; `ready` waits for it.
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.parameters = 0

    def ready(self) -> None:
        self.parameters = int(self._answer()["parameters"])

    def _answer(self) -> dict[str, Any]:
        # Skips anything the official code prints that is not our protocol.
        while True:
            line = self.process.stdout.readline()
            if not line:
                code = self.process.wait()
                raise RuntimeError(f"{OFFICIAL_STEP} exited with {code}; its errors are above")
            if line.startswith("{"):
                return json.loads(line)

    def time(self, steps: int) -> list[float]:
        self.process.stdin.write(f"go {steps}\n")
        self.process.stdin.flush()
        return self._answer()["times"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def check_paths(pix2seq: str, tf_python: str) -> None:
    """Raises SystemExit naming what is missing and how to get it."""
    if not os.path.isfile(os.path.join(pix2seq, "models", "ar_model.py")):
        raise SystemExit(
            f"--pix2seq {pix2seq}: no models/ar_model.py there; clone "
            "https://github.com/google-research/pix2seq into a folder outside this project"
        )
    if not (os.path.isfile(tf_python) and os.access(tf_python, os.X_OK)):
        raise SystemExit(
            f"--tf_python {tf_python}: not an executable; make a virtual environment with "
            "tensorflow-cpu==2.15.1 tensorflow-addons==0.23.0 ml_collections einops matplotlib "
            "and pass its bin/python"
        )


def ours(sizes: dict[str, int], fraction: float, real_batches: int) -> dict[str, Any]:
    """Our compiled steps: the same math, and real detection batches."""
    same_config = bench_train.shared_config(sizes)
    same = bench_train.compile_step(same_config, {"object_detection": sizes["seq"]})
    real_config = bench_train.shared_config(sizes)
    real_config.data.source = "synthetic"
    # Objects that fill the shared sequence: 5 tokens each, the prompt and EOS.
    real_config.tasks.object_detection.max_instances = (sizes["seq"] - 2) // 5
    real_config.tasks.object_detection.projected_fraction = fraction
    lengths = bench_train.train.sequence_lengths(real_config)
    batches = bench_train.pipeline_batches(real_config, real_batches)
    real = bench_train.compile_step(real_config, lengths, batches)
    return {"same": same, "real": real}


def timed(run, steps: int) -> list[float]:
    """Seconds of each of `steps` calls of `run` (compiled already), as the official side times."""
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - tic)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pix2seq", required=True, help="checkout of google-research/pix2seq")
    parser.add_argument("--tf_python", required=True, help="Python with tensorflow 2.15 + addons")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="steps of each side per round")
    parser.add_argument("--fraction", type=float, default=0.4, help="projected_fraction, real")
    parser.add_argument("--tiny", action="store_true", help="a 1-layer, 64-wide model (tests)")
    parser.add_argument("--results", default="", help="results file (default results.jsonl)")
    args = parser.parse_args(argv)
    check_paths(args.pix2seq, args.tf_python)
    sizes = dict(TINY if args.tiny else bench_train.SHARED, vocab=35000)
    official = Official(args.tf_python, args.pix2seq, sizes)
    try:
        steps = ours(sizes, args.fraction, bench_train.REAL_BATCHES)
        official.ready()
        product = bench_train.peak_product()
        jax.block_until_ready((product(), *(s.run(s.batches[0]) for s in steps.values())))
        times: dict[str, list[float]] = {"official": [], "same": [], "real": [], "peak": []}
        for r in range(args.rounds):
            times["official"] += official.time(args.steps)
            same = steps["same"]
            times["same"] += timed(lambda: same.run(same.batches[0]), args.steps)  # noqa: B023
            real = steps["real"]
            batch = real.batches[r % len(real.batches)]
            times["real"] += timed(lambda: real.run(batch), args.steps)  # noqa: B023
            times["peak"] += timed(product, args.steps)
            medians = {k: round(statistics.median(v), 4) for k, v in times.items()}
            print(f"round {r + 1}/{args.rounds}: median seconds {medians}", file=sys.stderr)
    finally:
        official.close()
    m = {k: statistics.median(v) for k, v in times.items()}
    peak = 2 * 2048**3 / m["peak"] / 1e9
    flops = steps["same"].analytic_flops
    images = steps["same"].images
    figures = {
        "official_step_s": round(m["official"], 4),
        "ours_same_step_s": round(m["same"], 4),
        "ours_real_step_s": round(m["real"], 4),
        "official_images_per_s": round(images / m["official"], 2),
        "ours_same_images_per_s": round(images / m["same"], 2),
        "ours_real_images_per_s": round(steps["real"].images / m["real"], 2),
        # > 1: ours is faster.
        "same_speedup": round(m["official"] / m["same"], 3),
        "real_speedup": round(steps["real"].images / m["real"] / (images / m["official"]), 3),
        "float32_gflops": round(peak, 1),
        "official_mfu": round(flops / m["official"] / 1e9 / peak, 3),
        "ours_same_mfu": round(flops / m["same"] / 1e9 / peak, 3),
        "parameters": {"official": official.parameters, "ours": steps["same"].parameters},
        "weighted_share_real": bench_train.weighted_share(steps["real"].batches),
    }
    args_out = {k: v for k, v in vars(args).items() if k not in ("pix2seq", "tf_python")}
    return report("side_by_side", args_out, figures, args.results)


if __name__ == "__main__":
    main()
