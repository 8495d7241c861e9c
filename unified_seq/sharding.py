"""Device mesh and partition rules, declared in the config as strings.

    config.mesh = "data:-1,fsdp:1"          # -1: all remaining devices
    config.sharding_rules = ".*=fsdp"       # regex=strategy, `;`-separated; first match wins
    --config.mesh=data:-1,fsdp:8            # the same from the command line

Lists of pairs (`[("data", -1), ("fsdp", 1)]`, `[(".*", "fsdp")]`) are
accepted too, for configs written in Python.

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


def parse_mesh(spec: str | Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """`"data:-1,fsdp:8"` (or a list of pairs) → `[("data", -1), ("fsdp", 8)]`."""
    if not isinstance(spec, str):
        return [(str(name), int(size)) for name, size in spec]
    axes = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, size = part.partition(":")
        if not sep or not name or not re.fullmatch(r"-?\d+", size.strip()):
            raise ValueError(f"config.mesh={spec!r}: write axes as name:size, e.g. data:-1,fsdp:8")
        axes.append((name.strip(), int(size)))
    if not axes:
        raise ValueError(f"config.mesh={spec!r} names no axis; e.g. data:-1,fsdp:1")
    return axes


def parse_rules(spec: str | Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """`".*embed.*=replicate;.*=fsdp"` (or a list of pairs) → `[(regex, strategy), ...]`."""
    if isinstance(spec, str):
        # The last `=` splits, so a regex may hold one (`(?=...)`).
        pairs = [p.rpartition("=")[::2] for p in spec.split(";") if p.strip()]
        if any(not r or not s for r, s in pairs):
            raise ValueError(
                f"config.sharding_rules={spec!r}: write regex=strategy pairs separated by `;`"
            )
    else:
        pairs = list(spec)
    rules = [(str(r).strip(), str(s).strip()) for r, s in pairs]
    for pattern, strategy in rules:
        if strategy not in STRATEGIES:
            raise ValueError(
                f"config.sharding_rules: strategy {strategy!r} for {pattern!r}; "
                f"choose one of {STRATEGIES}"
            )
        re.compile(pattern)
    return rules


def mesh_from_config(config: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """The device mesh of `config.mesh` over all (global) devices."""
    return make_mesh(parse_mesh(config.mesh), devices)


def rules_from_config(config: Any) -> list[tuple[str, str]]:
    """The partition rules of `config.sharding_rules`."""
    return parse_rules(config.sharding_rules)


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
