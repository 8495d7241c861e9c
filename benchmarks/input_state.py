r"""Size of a checkpoint's input state at the COCO config's shapes.

    python benchmarks/input_state.py [--batch 128] [--image_size 640]

Every checkpoint stores each process's tf.data iterator positions. Stored
"explicitly", an iterator holds what it has buffered: prefetched batches of
decoded images and images in flight in the parallel map, which at batch 128
and 640 px is gigabytes per task. Stored "symbolically" (what the training
pipelines use) it holds only positions and the shuffle buffer of annotations.
This builds each task's training pipeline at the COCO config's shapes on the
embedded set (the official token layout), draws one batch, saves the iterator
both ways and prints the bytes. Writes benchmarks/results/input_state.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import tensorflow as tf
from bench_config import load_config

from unified_seq import vocab
from unified_seq.data import inputs, pipeline
from unified_seq.tasks import build_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def coco_config(batch: int, image_size: int):
    config = load_config(f"{os.path.join(ROOT, 'configs', 'multitask_coco.py')}:{image_size}")
    config.data.source = "synthetic"  # annotations like COCO's, no download
    config.train.batch_size = batch
    return config


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def measure(config, name: str, task, data, symbolic: bool) -> dict:
    ds = pipeline.train_dataset(
        task, data.examples, data, config, batch_size=int(config.train.batch_size), seed=1
    )
    options = tf.data.Options()
    options.experimental_symbolic_checkpoint = symbolic
    iterator = iter(ds.with_options(options))
    tic = time.perf_counter()
    next(iterator)
    first_batch = time.perf_counter() - tic
    time.sleep(2.0)  # let prefetch and the parallel map fill their buffers
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        tf.train.Checkpoint(it=iterator).write(os.path.join(tmp, "input"))
        save = time.perf_counter() - tic
        size = folder_bytes(tmp)
    return {"bytes": size, "save_s": round(save, 2), "first_batch_s": round(first_batch, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=640)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/input_state.json"))
    args = parser.parse_args()
    config = coco_config(args.batch, args.image_size)
    space = vocab.TokenSpace.from_config(config.vocab)
    data = inputs.load_split(config, "train", space)
    rows = {}
    for name, task in build_tasks(config).items():
        rows[name] = {
            mode: measure(config, name, task, data, symbolic=mode == "symbolic")
            for mode in ("explicit", "symbolic")
        }
        print(
            f"{name:24s} explicit {rows[name]['explicit']['bytes'] / 2**20:9.1f} MiB | "
            f"symbolic {rows[name]['symbolic']['bytes'] / 2**20:7.2f} MiB",
            flush=True,
        )
    total = {m: sum(r[m]["bytes"] for r in rows.values()) for m in ("explicit", "symbolic")}
    print(
        f"{'all tasks, per process':24s} explicit {total['explicit'] / 2**20:9.1f} MiB | "
        f"symbolic {total['symbolic'] / 2**20:7.2f} MiB"
    )
    result = {
        "batch_per_task": args.batch,
        "image_size": args.image_size,
        "shuffle_buffer": int(config.data.shuffle_buffer),
        "tasks": rows,
        "total_bytes": total,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
