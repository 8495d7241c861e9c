r"""What a run's train step costs on this machine, before the run: `--mode plan`.

    python -m unified_seq.main --mode plan --config configs/multitask_coco.py \
        --config.mesh=data:1,fsdp:8 --config.train.batch_size=64 --workdir /tmp/plan

Prints the devices and mesh, each task's global and per-process batch, the
parameter and optimizer-state bytes each device holds (from the state's
shardings), the compiled step's temporary memory and FLOPs per device, and
the time of `train.plan_steps` steps on random batches of the config's shapes
(0: compile only). Writes the same numbers to WORKDIR/plan.json.
`benchmarks/memory_plan.py --topology v5e:2x4` compiles for TPU chips this
machine lacks (libtpu installed), for TPU memory figures from a CPU.

Everything is the run's own: `train.build_model`, `train.create_state`,
`train.make_train_step`, the same shardings and `donate_argnums`. The step is
compiled from abstract shapes (`jax.ShapeDtypeStruct` with shardings), so no
data set is read and, at `plan_steps=0`, no parameter is allocated.

Memory figures are XLA's for this backend. On CPU (e.g. with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`) the step is compiled
with XLA's memory-optimised scheduler (`CPU_COMPILER_OPTIONS`; the default
one ignores rematerialisation), and still fuses differently from TPU or
GPU: treat its per-device peak as an estimate of what an accelerator needs,
not an exact figure. Its timed steps are this schedule's, too.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from unified_seq import optim, sharding, train, vocab
from unified_seq.models import sizes
from unified_seq.tasks import build_tasks

GiB = 2**30
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
# Memory per chip of common accelerators, GiB (TPU HBM as Google lists it).
# A batch "fits" when the peak stays under FITS_SHARE of it: the runtime,
# fragmentation and the input prefetch need the rest.
FITS_SHARE = 0.9
ACCELERATORS = {
    "TPU v5e": 16,
    "TPU v4": 32,
    "A100 40GB": 40,
    "A100 80GB / H100": 80,
    "TPU v5p": 95,
}


def batch_layout(config: Any) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Global batch and sequence shape of each of a step's batches (task, or "mixed")."""
    tasks = build_tasks(config)
    if config.train.mixing == "data":
        length = max(task.sequence_length for task in tasks.values())
        return {"mixed": (int(config.train.batch_size), (length,))}
    return {
        name: (batch, tuple(tasks[name].sequence_shape))
        for name, batch in train.task_batch_sizes(config).items()
    }


def _batch_structs(layout: dict, image_size: int, sharding_: Any) -> dict:
    """ShapeDtypeStructs of a step's batches (global shapes, split over the mesh)."""

    def struct(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)

    return {
        name: {
            "image": struct((batch, image_size, image_size, 3), jnp.float32),
            "input_seq": struct((batch, *seq), jnp.int32),
            "target_seq": struct((batch, *seq), jnp.int32),
            "token_weights": struct((batch, *seq), jnp.float32),
        }
        for name, (batch, seq) in layout.items()
    }


def _random_batches(structs: dict, vocab_size: int, mesh: Any, seed: int) -> dict:
    """Global arrays of the planned shapes: this process's rows, random values."""
    r = np.random.default_rng(seed)

    def local(x: jax.ShapeDtypeStruct) -> np.ndarray:
        shape = (x.shape[0] // jax.process_count(), *x.shape[1:])
        if x.dtype == jnp.int32:
            return r.integers(0, vocab_size, shape).astype(np.int32)
        return r.random(shape, np.float32)

    return sharding.to_global(jax.tree_util.tree_map(local, structs), mesh)


def _bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes of `tree` (arrays or ShapeDtypeStructs): one device's under `shardings`, else all."""
    leaves = jax.tree_util.tree_leaves(tree)
    shapes = [x.shape for x in leaves]
    if shardings is not None:
        shards = jax.tree_util.tree_leaves(shardings)
        shapes = [s.shard_shape(shape) for s, shape in zip(shards, shapes, strict=True)]
    return sum(
        int(np.prod(shape)) * np.dtype(x.dtype).itemsize
        for x, shape in zip(leaves, shapes, strict=True)
    )


def _flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def run(config: Any, workdir: str, devices: Sequence[Any] | None = None) -> dict:
    """Compiles (and with `train.plan_steps` > 0 runs) the config's train step; prints its cost.

    Args:
      config: the run's config.
      workdir: where plan.json goes.
      devices: the mesh's devices; default all of this run's. Devices of a
        TPU topology (`jax.experimental.topologies.get_topology_desc`, with
        libtpu installed) compile for chips this machine does not have:
        TPU memory figures from a CPU-only machine (compile only).

    Returns:
      The printed numbers, also written to WORKDIR/plan.json: bytes are per
      device, `flops_per_device` is XLA's count for one device's program.
    """
    train.validate(config)
    space = vocab.TokenSpace.from_config(config.vocab)
    mesh = sharding.mesh_from_config(config, devices)
    model = train.build_model(config, space)
    total_steps = int(config.train.steps)
    optimizer = optim.make_optimizer(config.optim, total_steps)
    seq_len = max(train.sequence_lengths(config).values())
    microbatches = int(config.train.get("microbatches", 1))

    # The state as `create_state` makes it, traced only: shapes and shardings.
    abstract = jax.eval_shape(
        lambda: train.create_state(model, optimizer, config, mesh, seq_len)[0]
    )
    state_shardings = sharding.tree_shardings(abstract, mesh, sharding.rules_from_config(config))
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_shardings
    )
    layout = batch_layout(config)
    batches = _batch_structs(layout, int(config.data.image_size), sharding.batch_sharding(mesh))

    # --- The run's step, compiled for these shapes.
    step_fn = train.make_train_step(
        model,
        optimizer,
        optim.schedule(config.optim, total_steps),
        train.task_weights(config),
        seed=int(config.seed),
        label_smoothing=float(config.optim.label_smoothing),
        microbatches=microbatches,
    )
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    # XLA:CPU's default scheduler orders work for concurrency, not memory: it
    # runs rematerialised forward passes early, undoing `model.remat`. Its
    # memory-optimised scheduler orders them as accelerator compilers do.
    platform = mesh.devices.flat[0].platform
    options = CPU_COMPILER_OPTIONS if platform == "cpu" else None
    tic = time.perf_counter()
    compiled = jitted.lower(abstract, batches).compile(compiler_options=options)
    compile_s = time.perf_counter() - tic
    memory = compiled.memory_analysis()

    # --- The numbers.
    devices = list(mesh.devices.flat)
    resolved = sizes.resolve(config.model)
    memory_bytes = {
        "params": _bytes(abstract.params, state_shardings.params),
        "opt_state": _bytes(abstract.opt_state, state_shardings.opt_state),
        "state_all_devices": _bytes(abstract),
        "arguments": int(memory.argument_size_in_bytes),
        "outputs": int(memory.output_size_in_bytes),
        "aliased": int(memory.alias_size_in_bytes),
        "temp": int(memory.temp_size_in_bytes),
    }
    # The donated state's outputs reuse its argument buffers.
    memory_bytes["peak"] = (
        memory_bytes["arguments"]
        + memory_bytes["outputs"]
        - memory_bytes["aliased"]
        + memory_bytes["temp"]
    )
    report: dict[str, Any] = {
        "devices": {
            "count": len(devices),
            "kind": devices[0].device_kind,
            "platform": devices[0].platform,
            "processes": jax.process_count(),
        },
        "mesh": {name: int(size) for name, size in mesh.shape.items()},
        "model": {
            "variant": config.model.variant,
            "image_size": int(config.data.image_size),
            "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params)),
            "dtype": resolved["dtype"],
            "remat": resolved["remat"],
        },
        "microbatches": microbatches,
        "batch": {
            name: {
                "global": batch,
                "per_process": batch // jax.process_count(),
                "per_device": batch / len(devices),
                "sequences": list(seq),
            }
            for name, (batch, seq) in layout.items()
        },
        "bytes_per_device": memory_bytes,
        "flops_per_device": _flops(compiled),
        "fits": {
            name: memory_bytes["peak"] <= FITS_SHARE * gib * GiB
            for name, gib in ACCELERATORS.items()
        },
        "compile_s": compile_s,
        "step_s": [],
    }
    lead = jax.process_index() == 0
    if lead:
        print(_table(report), flush=True)

    # --- Steps on random batches, if asked.
    steps = int(config.train.get("plan_steps", 2))
    if steps > 0 and devices[0] in jax.devices():
        state, _ = train.create_state(model, optimizer, config, mesh, seq_len)
        data = _random_batches(batches, space.vocab_size, mesh, int(config.seed))
        for i in range(steps):
            tic = time.perf_counter()
            state, metrics = jax.block_until_ready(compiled(state, data))
            report["step_s"].append(time.perf_counter() - tic)
            if lead:
                print(f"step {i + 1}   {report['step_s'][-1]:.2f} s", flush=True)
    elif lead:
        print("steps     not run (compile only)", flush=True)
    if lead:
        with tf.io.gfile.GFile(os.path.join(workdir, "plan.json"), "w") as f:
            f.write(json.dumps(report, indent=2))
    return report


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def _table(report: dict) -> str:
    d, m, b = report["devices"], report["model"], report["bytes_per_device"]
    lines = [
        f"devices   {d['count']} × {d['kind']} ({d['platform']}), {d['processes']} process(es)",
        "mesh      " + ", ".join(f"{k} {v}" for k, v in report["mesh"].items()),
        f"model     {m['variant']} at {m['image_size']} px, {m['parameters'] / 1e6:.1f}M "
        f"parameters, compute {m['dtype']}, remat {m['remat']}, "
        f"{report['microbatches']} micro-batch(es)",
        "batch     task                    global  per process  per device  sequences",
    ]
    for task, s in report["batch"].items():
        lines.append(
            f"          {task:<22} {s['global']:>7} {s['per_process']:>12} "
            f"{s['per_device']:>11g}  {'×'.join(map(str, s['sequences']))}"
        )
    fits = [k for k, v in report["fits"].items() if v]
    lines += [
        "per device",
        f"  parameters       {_size(b['params'])}",
        f"  optimizer state  {_size(b['opt_state'])}",
        f"  temporaries      {_size(b['temp'])}",
        f"  peak             {_size(b['peak'])}  (state, batch and temporaries; "
        f"{_size(b['state_all_devices'])} of state on all devices)",
        f"FLOPs     {report['flops_per_device']:.3e} per device per step "
        f"({report['flops_per_device'] * d['count']:.3e} in all)",
        f"fits      {', '.join(fits) if fits else 'none of ' + ', '.join(ACCELERATORS)}  "
        f"(peak ≤ {FITS_SHARE:.0%} of the chip's memory)",
        f"compile   {report['compile_s']:.1f} s",
    ]
    return "\n".join(lines)
