r"""Decoding speed: greedy against nucleus (top-p), cached against recomputed, by length and batch.

    python -m benchmarks.decode [--shared] [--lengths 128,512] [--batches 1,32] [--top_p 0.4]

The model is the side-by-side one of benchmarks.train (`--shared`: 4 + 4
layers × 256, vocab 35000, 196 image tokens), with random weights. An
untrained decoder spreads its probability over all 35000 tokens, which no
trained one does, so the output bias gets a Zipf(1.2) log-prior over the
vocabulary (`--zipf 0` turns it off): the nucleus then holds tens of tokens,
as in a trained model. Every run decodes the full length (no EOS).

Figures: tokens/s of greedy and of top-p sampling with the cache, their
ratio, and (at batch 1 by default) the cached loop against a loop that
re-runs the decoder over the whole prefix at every token (greedy; same tokens).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import median_seconds, report
from benchmarks.train import SHARED, shared_model_config
from unified_seq import decoding
from unified_seq.models import sizes


def build(max_len: int, vocab_size: int = 35000, zipf: float = 1.2, tiny: bool = False):
    """The side-by-side model, its variables (Zipf prior on the output bias) and a encoder."""
    s = SHARED if not tiny else dict(SHARED, depth=1, width=64, mlp=128, heads=2, image=64)
    cfg = shared_model_config(s)
    model = sizes.build_model(cfg, vocab_size, max_len)
    image = jnp.zeros([1, s["image"], s["image"], 3])
    variables = jax.jit(model.init)(jax.random.key(0), image, jnp.zeros([1, 4], jnp.int32))
    if zipf:
        ranks = np.random.default_rng(0).permutation(vocab_size) + 1
        prior = -zipf * np.log(ranks)
        params = variables["params"]
        bias = params["decoder"]["output_bias"] + jnp.asarray(prior - prior.mean(), jnp.float32)
        variables = {"params": {**params, "decoder": {**params["decoder"], "output_bias": bias}}}
    return model, variables, s["image"]


def uncached_greedy(model, variables, encoded, prompts, max_len):
    """Greedy decoding that re-runs the decoder over the whole prefix at every token."""
    batch, p = prompts.shape
    tokens = jnp.zeros([batch, p + max_len], jnp.int32).at[:, :p].set(prompts)

    def body(i, toks):
        logits = model.apply(variables, toks, encoded, method=model.decode)
        nxt = jnp.argmax(logits[:, p - 1 + i], axis=-1).astype(jnp.int32)
        return toks.at[:, p + i].set(nxt)

    return jax.lax.fori_loop(0, max_len, body, tokens)[:, p:]


def measure(lengths, batches, top_p=0.4, zipf=1.2, repeats=3, recompute=(1,), tiny=False):
    model, variables, size = build(max(lengths) + 1, zipf=zipf, tiny=tiny)
    out = {}
    for batch in batches:
        images = jax.random.uniform(jax.random.key(1), [batch, size, size, 3])
        encoded = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(variables, images)
        prompts = jnp.full([batch, 1], 10, jnp.int32)
        for length in lengths:
            sample = functools.partial(decoding.sample_sequences, model, max_len=length, eos=-1)
            greedy = jax.jit(functools.partial(sample, greedy=True))
            nucleus = jax.jit(functools.partial(sample, top_p=top_p))
            key = jax.random.key(2)
            tokens = batch * length
            t_greedy = median_seconds(lambda: greedy(variables, encoded, prompts, key), repeats)  # noqa: B023
            t_top_p = median_seconds(lambda: nucleus(variables, encoded, prompts, key), repeats)  # noqa: B023
            row = {
                "greedy_tokens_per_s": round(tokens / t_greedy, 1),
                "top_p_tokens_per_s": round(tokens / t_top_p, 1),
                "top_p_time_over_greedy": round(t_top_p / t_greedy, 3),
            }
            if batch in recompute:
                full = jax.jit(functools.partial(uncached_greedy, model, max_len=length))
                t_full = median_seconds(lambda: full(variables, encoded, prompts), repeats)  # noqa: B023
                same = bool(
                    jnp.all(full(variables, encoded, prompts)
                            == greedy(variables, encoded, prompts, key)["tokens"])
                )  # fmt: skip
                row.update(cached_speedup=round(t_full / t_greedy, 2), same_tokens=same)
            out[f"batch{batch}_len{length}"] = row
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="128,512")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--top_p", type=float, default=0.4)
    parser.add_argument("--zipf", type=float, default=1.2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--recompute_batches",
        default="1",
        help="batches at which to time the uncached loop too ('' for none; it is slow)",
    )
    parser.add_argument("--tiny", action="store_true", help="a 1-layer, 64-wide model (tests)")
    parser.add_argument("--results", default="", help="results file (default results.jsonl)")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    recompute = [int(x) for x in args.recompute_batches.split(",") if x]
    figures = measure(lengths, batches, args.top_p, args.zipf, args.repeats, recompute, args.tiny)
    return report("decode", vars(args), figures, args.results)


if __name__ == "__main__":
    main()
