"""Joining a multi-host run: `jax.distributed` before any device is touched.

Every host runs the same main command. JAX finds its peers by itself on TPU
VM pods and under SLURM or Open MPI; elsewhere (gcloud batch, a few local
processes) the coordinator is given by flags or environment variables:

    --coordinator_address=HOST:PORT --num_processes=N --process_id=I
    UNIFIED_SEQ_COORDINATOR_ADDRESS, UNIFIED_SEQ_NUM_PROCESSES, UNIFIED_SEQ_PROCESS_ID

On CPU the collectives go through gloo, so a two-process run can be tested
on one machine.
"""

from __future__ import annotations

import os

import jax
from absl import logging

ENV_PREFIX = "UNIFIED_SEQ_"

# Environment variables by which JAX's own cluster detection recognises a
# multi-process job: a TPU pod slice, SLURM, Open MPI.
_CLUSTER_MARKERS = {
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,
    "SLURM_NTASKS": lambda v: v.isdigit() and int(v) > 1,
    "OMPI_COMM_WORLD_SIZE": lambda v: v.isdigit() and int(v) > 1,
}


def settings(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> tuple[str | None, int | None, int | None]:
    """Flag values, each falling back to its `UNIFIED_SEQ_*` environment variable."""

    def env(name, cast):
        value = os.environ.get(ENV_PREFIX + name.upper(), "")
        return cast(value) if value else None

    address = coordinator_address or env("coordinator_address", str)
    count = num_processes if num_processes is not None else env("num_processes", int)
    index = process_id if process_id is not None else env("process_id", int)
    return address, count, index


def cluster_detected(environ: dict[str, str] | None = None) -> bool:
    """Whether this process runs inside a multi-process job JAX can detect."""
    environ = os.environ if environ is None else environ
    return any(test(environ[k]) for k, test in _CLUSTER_MARKERS.items() if k in environ)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts `jax.distributed` when this run is one of many processes.

    Args:
      coordinator_address: `HOST:PORT` of process 0; None: from the
        environment, or detected by JAX on a cluster.
      num_processes, process_id: the job's size and this process's index.

    Raises:
      ValueError: an incomplete or inconsistent set of settings.
    """
    address, count, index = settings(coordinator_address, num_processes, process_id)
    # Harmless on TPU and GPU; on CPU the default has no cross-process collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address or count is not None or index is not None:
        if not address or count is None or index is None:
            raise ValueError(
                "a multi-process run needs all of --coordinator_address, --num_processes and "
                f"--process_id (got {address!r}, {count!r}, {index!r}); on TPU pods, SLURM or "
                "Open MPI give none and JAX finds its peers"
            )
        if not 0 <= index < count:
            raise ValueError(f"--process_id={index} must be in [0, --num_processes={count})")
        if count == 1:
            return
        jax.distributed.initialize(address, num_processes=count, process_id=index)
    elif cluster_detected():
        jax.distributed.initialize()
    else:
        return
    logging.info("Process %d of %d", jax.process_index(), jax.process_count())
