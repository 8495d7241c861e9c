r"""Cached decoding (one lax.while_loop, K/V cache) against re-running the decoder.

    python benchmarks/decoding_cache.py [--variant tiny] [--batch 32] [--answer 51]

The uncached baseline feeds the whole sequence so far through the decoder at
every step (what a cache-less loop does; the official code recomputed K/V
from cached inputs each step). Prints medians of 5 runs and their ratio and
writes benchmarks/results/decoding_cache.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds

from unified_seq import decoding
from unified_seq.models import sizes

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def uncached_greedy(model, variables, encoded, prompts, max_len):
    """Greedy decoding that re-runs the decoder over the whole prefix each step."""
    batch, p = prompts.shape
    tokens = jnp.zeros([batch, p + max_len], jnp.int32).at[:, :p].set(prompts)

    def body(i, toks):
        logits = model.apply(variables, toks, encoded, method=model.decode)
        nxt = jnp.argmax(logits[:, p - 1 + i], axis=-1).astype(jnp.int32)
        return toks.at[:, p + i].set(nxt)

    return jax.lax.fori_loop(0, max_len, body, tokens)[:, p:]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--answer", type=int, default=51)
    parser.add_argument("--image", type=int, default=128)
    args = parser.parse_args()

    vocab = 584
    model = sizes.build_model(sizes.model_config(args.variant), vocab, args.answer + 1)
    images = jnp.asarray(np.random.default_rng(0).random([args.batch, args.image, args.image, 3]))
    variables = model.init(jax.random.key(0), images[:1], jnp.zeros([1, 4], jnp.int32))
    encoded = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(variables, images)
    prompts = jnp.full([args.batch, 1], 10, jnp.int32)

    # eos=-1 never matches, so both loops run the full length.
    cached = jax.jit(functools.partial(decoding.sample_sequences, model, max_len=args.answer,
                                       greedy=True, eos=-1))  # fmt: skip
    uncached = jax.jit(functools.partial(uncached_greedy, model, max_len=args.answer))
    key = jax.random.key(1)
    t_cached = median_seconds(lambda: cached(variables, encoded, prompts, key)["tokens"], 5)
    t_uncached = median_seconds(lambda: uncached(variables, encoded, prompts), 5)
    same = bool(
        jnp.all(
            cached(variables, encoded, prompts, key)["tokens"]
            == uncached(variables, encoded, prompts)
        )
    )
    result = {
        "device": jax.devices()[0].device_kind,
        "variant": args.variant,
        "batch": args.batch,
        "answer_tokens": args.answer,
        "cached_s": round(t_cached, 4),
        "uncached_s": round(t_uncached, 4),
        "speedup": round(t_uncached / t_cached, 2),
        "same_tokens": same,
    }
    print(json.dumps(result, indent=2))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "decoding_cache.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
