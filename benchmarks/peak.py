r"""The machine's matmul peak: a jitted square product, float32 and bfloat16.

    python -m benchmarks.peak [--size 2048] [--repeats 10]

MFU figures (benchmarks.train) divide by this peak measured in the same
run: on a shared CPU the attainable rate moves from day to day.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import median_seconds, report

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def matmul_peak(size: int = 2048, repeats: int = 10) -> dict[str, float]:
    """GFLOP/s of a [size, size] × [size, size] product for each dtype (float32 accumulation)."""
    out = {}
    for name, dtype in DTYPES.items():
        a = jax.random.normal(jax.random.key(0), (size, size), dtype)
        b = jax.random.normal(jax.random.key(1), (size, size), dtype)
        product = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
        seconds = median_seconds(lambda: product(a, b), repeats)  # noqa: B023 run now
        out[f"{name}_gflops"] = round(2 * size**3 / seconds / 1e9, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--results", default="", help="results file (default benchmarks/results.jsonl)"
    )
    args = parser.parse_args(argv)
    figures = matmul_peak(args.size, args.repeats)
    return report("peak", {"size": args.size}, figures, args.results)


if __name__ == "__main__":
    main()
