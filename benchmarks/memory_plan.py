r"""Memory and FLOPs of the train step on fake CPU devices: `plan.run` for a config.

    python benchmarks/memory_plan.py --config configs/multitask_coco.py \
        --set mesh=data:1,fsdp:8 --set train.batch_size=64 --set model.remat=dots \
        [--devices 8 | --topology v5e:2x4] [--steps 0] [--dump /tmp/hlo] [--out x.json]

Forces `--devices` host CPU devices (before JAX starts), or with
`--topology` compiles for TPU chips this machine does not have (needs
libtpu: `pip install libtpu`, or TPU_LIBRARY_PATH=.../libtpu.so), applies the
`--set field.path=value` overrides, then prints and returns `plan.run`'s
report (compile only unless `--steps`). `--dump DIR` also writes XLA's
dumps of the step to DIR and prints the largest temporary allocations of its
memory-usage report, with the shapes of the arrays they hold: where the
memory goes. Results go to
benchmarks/results/<--out> (default memory_plan.json).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile

from bench_config import load_config, override

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def largest_buffers(dump_dir: str, top: int = 15) -> list[tuple[int, str]]:
    """The step's largest temporary allocations and the arrays that share each one.

    From XLA's memory-usage report of the compiled step: each row is one
    allocation (bytes per device) and the shapes of the values that live in it
    at different times.
    """
    files = sorted(glob.glob(os.path.join(dump_dir, "*jit_step*memory-usage-report.txt")))
    if not files:
        return []
    with open(files[-1]) as f:
        lines = f.read().splitlines()
    rows = []
    for line in lines:
        parts = [p.strip() for p in line.split(";")]
        if len(parts) != 5 or not re.fullmatch(r"\d+", parts[2]):
            continue
        size = re.fullmatch(r"([\d.]+)([KMG]?i?B)", parts[1])
        if size:
            unit = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[size.group(2)]
            rows.append((int(float(size.group(1)) * unit), parts[4][:200]))
    rows.sort(key=lambda r: -r[0])
    return rows[:top]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/multitask_coco.py")
    parser.add_argument("--set", action="append", default=[], help="field.path=value")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices")
    parser.add_argument(
        "--topology", default="", help="compile for TPU chips instead, e.g. v5e:2x4 (libtpu)"
    )
    parser.add_argument("--steps", type=int, default=0, help="train.plan_steps")
    parser.add_argument("--tasks", default="", help="comma-separated: plan only these tasks")
    parser.add_argument("--dump", default="", help="folder for XLA's buffer assignment")
    parser.add_argument("--out", default="memory_plan.json")
    args = parser.parse_args()

    flags = [f"--xla_force_host_platform_device_count={args.devices}"]
    if args.dump:
        flags += [f"--xla_dump_to={args.dump}", "--xla_dump_hlo_module_re=.*jit_step.*"]
    os.environ["XLA_FLAGS"] = " ".join([*flags, os.environ.get("XLA_FLAGS", "")])
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from unified_seq import plan  # imported after XLA_FLAGS is set

    config = load_config(args.config)
    for assignment in args.set:
        override(config, assignment)
    config.train.plan_steps = args.steps
    if args.tasks:
        keep = args.tasks.split(",")
        for task in [t for t in config.tasks if t not in keep]:
            del config.tasks[task]
    devices = None
    if args.topology:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(args.topology, "tpu").devices
    with tempfile.TemporaryDirectory() as workdir:
        report = plan.run(config, workdir, devices)
    report["config"] = args.config
    report["overrides"] = args.set
    if args.dump:
        report["peak_buffers"] = largest_buffers(args.dump)
        print("largest temporary allocations (per device) and the arrays they hold:")
        for size, what in report["peak_buffers"]:
            print(f"  {size / 2**20:9.1f} MiB  {what}")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, args.out), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
