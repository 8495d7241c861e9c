"""Cached autoregressive sampling, compiled as one `lax.while_loop`.

    sample = jax.jit(functools.partial(
        sample_sequences, model, max_len=51, top_p=0.4, logits_range=(100, 200)))
    encoded = model.apply(variables, images, method=model.encode)
    out = sample(variables, encoded, prompts, rng)

All prompts of a batch have the same length P. The prompt is fed through the
decoder's key/value cache, then one token per loop iteration; the loop stops
as soon as every sequence has emitted EOS, or after `max_len` answer tokens.
A sequence that has finished emits padding (0) from then on.

`grammar` (grammar.py) restricts what may be sampled next: each sequence
carries the state of the task's answer automaton, and tokens the state does
not allow are masked before sampling (a detection answer: four coordinates,
then a class, per object; a polygon: coordinate pairs, then a separator or
EOS). Scores (`token_logprob`, `range_probs`) still come from the raw logits,
so a class's probability keeps the mass the model gave to other tokens.

`rng` is one key for the batch, or one key per row (`row_keys`): with a key
per row, a row's answer depends only on its key and its own inputs, not on
which batch it shares or its place in it, so evaluation and prediction
batched differently draw the same answers.

Several samples per image (`num_samples`, e.g. 8 polygons per instance): the
caller repeats `encoded` and `prompts` along the batch axis,
`jnp.repeat(x, num_samples, axis=0)`, so rows b·S … b·S + S - 1 are the
samples of example b.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unified_seq.grammar import Grammar
from unified_seq.vocab import EOS, PADDING

# Masked logits stay finite (as in the official code) so softmax never sees NaN.
MASKED_LOGIT = -1e10
# Largest logits looked at before sorting all of them for a nucleus (filter_logits).
NUCLEUS_CANDIDATES = 64


def _nucleus_cut(ordered: jax.Array, log_total: jax.Array, top_p: float):
    """The smallest logit the nucleus keeps, from logits sorted in descending order.

    Returns the cut [..., 1] and the probability mass of all of `ordered` [...].
    """
    cumulative = jnp.cumsum(jnp.exp(ordered - log_total), axis=-1)
    keep = (cumulative <= top_p).at[..., 0].set(True)
    cut = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return cut, cumulative[..., -1]


def _mask_top_k(logits: jax.Array, top_k: int) -> jax.Array:
    if top_k <= 0:
        return logits
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth, MASKED_LOGIT, logits)


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Masks logits outside the top-k and then outside the nucleus (official `top_logits`).

    Top-k keeps logits ≥ the k-th largest (0 = off). Top-p sorts the
    remaining tokens by descending probability and keeps those whose
    cumulative probability is ≤ p, always including the most likely one;
    unlike the Hugging Face rule, the token that crosses p is dropped. Ties
    with the smallest kept logit are kept.

    Args:
      logits: float32[..., V] (already divided by the temperature).
      top_k: Python int.
      top_p: Python float in (0, 1]; 1 = off.

    Returns:
      float32[..., V] with dropped entries set to MASKED_LOGIT.
    """
    logits = _mask_top_k(logits, top_k)
    if top_p < 1.0:
        log_total = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        # Sorting all V logits is most of a decoding step's time (V = 35000);
        # the nucleus almost always lies among the few largest. When the
        # candidates' mass exceeds p in every row it does, and their cut is
        # the full sort's; otherwise the full sort decides.
        count = min(NUCLEUS_CANDIDATES, logits.shape[-1])
        cut, mass = _nucleus_cut(jax.lax.top_k(logits, count)[0], log_total, top_p)
        cut = jax.lax.cond(
            jnp.all(mass > top_p),
            lambda: cut,
            lambda: _nucleus_cut(-jnp.sort(-logits, axis=-1), log_total, top_p)[0],
        )
        logits = jnp.where(logits < cut, MASKED_LOGIT, logits)
    return logits


def nucleus_sample(
    uniform: jax.Array,
    logits: jax.Array,
    *,
    top_p: float,
    top_k: int = 0,
    candidates: int = NUCLEUS_CANDIDATES,
) -> jax.Array:
    """Draws from the tokens `filter_logits` keeps, by inverting their distribution.

    The kept tokens, in descending order of logit, split [0, 1) into spans
    proportional to their probabilities; `uniform` picks the span it falls
    in. One uniform number per row replaces a Gumbel number per token, which
    at V = 35000 was most of a sampling step. The draw looks only at the
    `candidates` largest logits when they hold the whole nucleus in every
    row (more than p of the mass, and no tie with the smallest kept logit
    outside them); otherwise it sorts all logits. Both give the same token
    for the same `uniform`.

    Args:
      uniform: float32[...] in [0, 1), one per row.
      logits: float32[..., V] (already divided by the temperature).
      top_p: Python float in (0, 1).
      top_k: Python int (0 = off), applied first as in `filter_logits`.
      candidates: how many of the largest logits the fast path looks at.

    Returns:
      int32[...] token ids.
    """
    logits = _mask_top_k(logits, top_k)
    log_total = jax.nn.logsumexp(logits, axis=-1, keepdims=True)

    def draw(ordered: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        cut, mass = _nucleus_cut(ordered, log_total, top_p)
        kept = jnp.where(ordered >= cut, jnp.exp(ordered - log_total), 0.0)
        cumulative = jnp.cumsum(kept, axis=-1)
        target = uniform[..., None] * cumulative[..., -1:]
        # The first kept token whose cumulative mass passes the target; the
        # clip guards against rounding at the top end.
        last = jnp.sum(ordered >= cut, axis=-1, keepdims=True) - 1
        position = jnp.minimum(jnp.sum(cumulative <= target, axis=-1, keepdims=True), last)
        token = jnp.take_along_axis(ids, position, axis=-1)[..., 0]
        # min, not [..., -1]: XLA folds a one-element slice into the top-k's
        # sort, which then stops being rewritten to its fast TopK kernel.
        whole = (mass > top_p) & (jnp.min(ordered, axis=-1) < cut[..., 0])
        return token.astype(jnp.int32), jnp.all(whole)

    count = min(candidates, logits.shape[-1])
    token, whole = draw(*jax.lax.top_k(logits, count))

    def full_sort() -> jax.Array:
        ids = jnp.broadcast_to(jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape)
        negated, ids = jax.lax.sort((-logits, ids), dimension=logits.ndim - 1, num_keys=1)
        return draw(-negated, ids)[0]

    if count == logits.shape[-1]:
        return token
    return jax.lax.cond(whole, lambda: token, full_sort)


def next_token(
    rng: jax.Array,
    logits: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> jax.Array:
    """Draws int32[B] from raw logits float32[B, V]; greedy or temperature 0 → argmax.

    `rng` is one key for the batch or keys[B], one per row (`row_keys`).
    Nucleus sampling (top_p < 1) draws by `nucleus_sample`, any other by
    Gumbel noise over the whole vocabulary (`jax.random.categorical`).
    """
    if greedy or temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    per_row = jnp.ndim(rng) == 1
    if top_p < 1.0:
        if per_row:
            uniform = jax.vmap(lambda key: jax.random.uniform(key, ()))(rng)
        else:
            uniform = jax.random.uniform(rng, logits.shape[:-1])
        # Batched outside any vmap, so that lax.cond skips the full sort.
        return nucleus_sample(uniform, logits, top_p=top_p, top_k=top_k)
    logits = filter_logits(logits, top_k=top_k)
    if per_row:
        return jax.vmap(jax.random.categorical)(rng, logits).astype(jnp.int32)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def row_keys(rng: jax.Array, ids: jax.Array) -> jax.Array:
    """One key per row from uint32[B, C] identities: fold_in of each column in turn.

    Rows with equal identities get equal keys, whatever batch they are in.
    """

    def one(row):
        key = rng
        for c in range(ids.shape[1]):
            key = jax.random.fold_in(key, row[c])
        return key

    return jax.vmap(one)(ids)


def sample_sequences(
    model: nn.Module,
    variables: Any,
    encoded: jax.Array,
    prompts: jax.Array,
    rng: jax.Array,
    *,
    max_len: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    eos: int = EOS,
    logits_range: tuple[int, int] | None = None,
    return_logits: bool = False,
    grammar: Grammar | None = None,
) -> dict[str, jax.Array]:
    """Samples answers after fixed prompts with the decoder's key/value cache.

    Sampling settings are Python values fixed at trace time; `jax.jit` over a
    `functools.partial` binding them compiles once per shape.

    Args:
      model: an `EncoderDecoder` (anything with `init_cache`, `step` and
        `vocab_size`).
      variables: its variables ({"params": ...}).
      encoded: float32[B, N, d] from `model.encode`.
      prompts: int32[B, P], P ≥ 1.
      rng: a PRNG key, or keys[B] one per row (`row_keys`); step i draws
        with fold_in(key, i).
      max_len: most answer tokens to generate (EOS included); P + max_len - 1
        must fit the decoder's max_len.
      temperature, top_k, top_p: see `filter_logits`; applied in that order.
      greedy: argmax instead of sampling.
      eos: the token that ends a sequence.
      logits_range: (lo, hi) to also return the softmax over the whole
        vocabulary at each step, sliced to tokens [lo, hi) (not renormalised).
      return_logits: also return the raw logits at each step.
      grammar: the answers' grammar (grammar.py), or None for any token.

    Returns:
      tokens: int32[B, max_len] answers; EOS, then padding (0).
      length: int32[B] answer tokens before EOS (max_len if none).
      done: bool[B] whether EOS was emitted.
      num_steps: int32 scalar, loop iterations run (≤ max_len).
      token_logprob: float32[B, max_len] log-probability of each token under
        the raw logits (0 after EOS).
      range_probs: float32[B, max_len, hi - lo] (with logits_range; 0 after EOS).
      logits: float32[B, max_len, V] raw logits of every step run (with
        return_logits; steps after EOS see the padding fed back, steps after
        the loop stopped are 0).
    """
    batch, prompt_len = prompts.shape
    if prompt_len < 1:
        raise ValueError("sample_sequences needs a prompt of at least one token")
    apply = model.apply
    # Every token but the last answer token is fed back: the cache needs no more.
    cache = apply(variables, encoded, prompt_len + max_len - 1, method=model.init_cache)
    if prompt_len > 1:
        _, cache = apply(variables, prompts[:, :-1], cache, 0, method=model.step)

    state = {
        "step": jnp.zeros((), jnp.int32),
        "last": prompts[:, -1].astype(jnp.int32),
        "cache": cache,
        "done": jnp.zeros((batch,), bool),
        "length": jnp.full((batch,), max_len, jnp.int32),
        "tokens": jnp.zeros((batch, max_len), jnp.int32),
        "token_logprob": jnp.zeros((batch, max_len), jnp.float32),
    }
    if logits_range is not None:
        lo, hi = logits_range
        state["range_probs"] = jnp.zeros((batch, max_len, hi - lo), jnp.float32)
    if return_logits:
        state["logits"] = jnp.zeros((batch, max_len, model.vocab_size), jnp.float32)
    if grammar is not None:
        if grammar.vocab_size != model.vocab_size:
            raise ValueError(
                f"the grammar covers {grammar.vocab_size} tokens, the model's vocabulary "
                f"{model.vocab_size}"
            )
        kinds = jnp.asarray(grammar.kinds)
        kind_allowed = jnp.asarray(grammar.allowed)
        kind_next = jnp.asarray(grammar.next_state)
        state["grammar"] = jnp.full((batch,), grammar.start, jnp.int32)
    per_row = jnp.ndim(rng) == 1
    draw = functools.partial(
        next_token, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
    )

    def cond(s):
        return (s["step"] < max_len) & ~jnp.all(s["done"])

    def body(s):
        i = s["step"]
        logits, cache = apply(
            variables, s["last"][:, None], s["cache"], prompt_len - 1 + i, method=model.step
        )
        logits = logits[:, 0]
        allowed = logits
        if grammar is not None:
            # The kinds each row's state allows, spread over the vocabulary.
            mask = kind_allowed[s["grammar"]][:, jnp.maximum(kinds, 0)] & (kinds >= 0)
            allowed = jnp.where(mask, logits, MASKED_LOGIT)
        if per_row:
            sampled = draw(jax.vmap(jax.random.fold_in, (0, None))(rng, i), allowed)
        else:
            sampled = draw(jax.random.fold_in(rng, i), allowed)
        token = jnp.where(s["done"], PADDING, sampled)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        logprob = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
        ended = ~s["done"] & (token == eos)
        new = {
            "step": i + 1,
            "last": token,
            "cache": cache,
            "done": s["done"] | ended,
            "length": jnp.where(ended, i, s["length"]),
            "tokens": s["tokens"].at[:, i].set(token),
            "token_logprob": s["token_logprob"].at[:, i].set(jnp.where(s["done"], 0.0, logprob)),
        }
        if grammar is not None:
            new["grammar"] = kind_next[s["grammar"], jnp.maximum(kinds[token], 0)]
        if logits_range is not None:
            probs = jnp.exp(log_probs[:, lo:hi])
            probs = jnp.where(s["done"][:, None], 0.0, probs)
            new["range_probs"] = s["range_probs"].at[:, i].set(probs)
        if return_logits:
            new["logits"] = s["logits"].at[:, i].set(logits)
        return new

    final = jax.lax.while_loop(cond, body, state)
    out = {k: v for k, v in final.items() if k not in ("step", "last", "cache", "grammar")}
    out["num_steps"] = final["step"]
    return out
