"""What every `python -m benchmarks.NAME` shares: timing, the machine, the results file.

Each benchmark prints one JSON line and appends it to `benchmarks/results.jsonl`
with the time, the machine (devices, CPU count, JAX version) and its
arguments, so figures from different runs and machines sit side by side.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any

import jax

from benchmarks.timing import median_seconds  # noqa: F401 shared with the scripts

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl")


def machine() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "devices": jax.device_count(),
        "cpus": os.cpu_count(),
        "host": platform.node(),
        "jax": jax.__version__,
    }


def report(name: str, args: dict[str, Any], figures: dict[str, Any], path: str = "") -> dict:
    """Prints `figures` as one JSON line and appends it, with context, to the results file."""
    record = {
        "benchmark": name,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "args": args,
        **figures,
    }
    line = json.dumps(record)
    print(line, flush=True)
    with open(path or RESULTS, "a") as f:
        f.write(line + "\n")
    return record
