"""Device mesh and partition rules, declared in the config.

    config.mesh = [("data", -1), ("fsdp", 1)]      # -1: all remaining devices
    config.sharding_rules = [(".*", "fsdp")]        # first matching regex wins

A rule's strategy is `replicate` (every device holds the whole array) or
`fsdp` (the largest dimension divisible by the `fsdp` axis is split over it;
arrays with no such dimension are replicated). Batches are split over every
device along their leading axis. Parameters are created already sharded:
`jax.eval_shape` gives their shapes, the rules give shardings, and `init`
runs under `jax.jit(out_shardings=...)`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

STRATEGIES = ("replicate", "fsdp")


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh with the named axes; one size may be -1 for "all remaining devices"."""
    devices = list(jax.devices() if devices is None else devices)
    names = [str(n) for n, _ in axes]
    sizes = [int(s) for _, s in axes]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {axes}: at most one axis may have size -1")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {axes}: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {axes} needs {int(np.prod(sizes))} devices; {len(devices)} found")
    return Mesh(np.asarray(devices).reshape(sizes), names)


def _spec(shape: tuple[int, ...], strategy: str, axis_sizes: Mapping[str, int]) -> PartitionSpec:
    n = axis_sizes.get("fsdp", 1)
    if strategy == "replicate" or n == 1:
        return PartitionSpec()
    # Largest divisible dimension first: it spreads memory most evenly.
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % n == 0 and shape[dim] >= n:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def partition_specs(
    tree: Any, axis_sizes: Mapping[str, int], rules: Sequence[tuple[str, str]]
) -> Any:
    """PartitionSpecs of every array in `tree` on a mesh of these axis sizes.

    Each array takes the strategy of the first rule whose regex matches its
    path (`encoder/block_0/kernel`); arrays no rule matches are replicated.
    """
    for _, strategy in rules:
        if strategy not in STRATEGIES:
            raise ValueError(f"sharding rule strategy {strategy!r}; choose one of {STRATEGIES}")

    def one(path, leaf):
        name = _path_name(path)
        for pattern, strategy in rules:
            if re.fullmatch(pattern, name):
                return _spec(tuple(leaf.shape), strategy, axis_sizes)
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(one, tree)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]]) -> Any:
    """NamedShardings for every array in `tree` (arrays or ShapeDtypeStructs)."""
    specs = partition_specs(tree, dict(mesh.shape), rules)
    return jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, spec),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def to_global(local_batch: Any, mesh: Mesh) -> Any:
    """This process's slice of a batch (numpy) → global jax.Arrays split over the mesh."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )
