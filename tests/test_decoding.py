"""The cached while-loop sampler agrees with plain teacher-forced decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unified_seq.decoding import (
    MASKED_LOGIT,
    filter_logits,
    next_token,
    nucleus_sample,
    row_keys,
    sample_sequences,
)
from unified_seq.grammar import Grammar
from unified_seq.models import build_model, model_config

VOCAB = 300
MAX_LEN = 24  # decoder positions: prompt + answer
TINY = dict(
    patch_size=8,
    enc_depth=1,
    enc_width=32,
    enc_mlp_dim=64,
    enc_heads=2,
    dec_depth=2,
    dec_width=32,
    dec_mlp_dim=64,
    dec_heads=4,
)


@pytest.fixture(scope="module")
def setup():
    model = build_model(model_config("tiny", **TINY), VOCAB, max_len=MAX_LEN)
    images = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(0), images, jnp.zeros((3, 4), jnp.int32))
    encoded = model.apply(variables, images, method=model.encode)
    return model, variables, encoded


def _with_eos_bias(variables, bias):
    params = jax.tree.map(lambda x: x, variables["params"])
    params["decoder"]["output_bias"] = params["decoder"]["output_bias"].at[0].add(bias)
    return {"params": params}


def _sampler(model, **kw):
    return jax.jit(functools.partial(sample_sequences, model, **kw))


def _prompts(batch, length):
    return (
        jnp.tile(jnp.arange(10, 10 + length, dtype=jnp.int32)[None], (batch, 1))
        + jnp.arange(batch, dtype=jnp.int32)[:, None]
    )


@pytest.mark.parametrize("prompt_len", [1, 4])
def test_cached_logits_equal_teacher_forcing(setup, prompt_len):
    model, variables, encoded = setup
    steps = MAX_LEN - prompt_len + 1
    prompts = _prompts(3, prompt_len)
    out = _sampler(model, max_len=steps, return_logits=True, logits_range=(100, 200))(
        variables, encoded, prompts, jax.random.key(5)
    )
    n = int(out["num_steps"])
    assert n == steps  # random weights: EOS (1 of 300 tokens) is rare
    # The decoder read the prompt and every answer token but the last.
    fed = jnp.concatenate([prompts, out["tokens"][:, :-1]], axis=1)
    full = model.apply(variables, fed, encoded, method=model.decode)
    expected = full[:, prompt_len - 1 :]
    np.testing.assert_allclose(out["logits"][:, :n], expected[:, :n], atol=1e-4, rtol=1e-4)

    log_probs = jax.nn.log_softmax(expected, axis=-1)
    picked = jnp.take_along_axis(log_probs, out["tokens"][..., None], axis=-1)[..., 0]
    live = np.arange(steps)[None] <= np.asarray(out["length"])[:, None]
    np.testing.assert_allclose(
        np.where(live, out["token_logprob"], 0), np.where(live, picked, 0), atol=1e-4
    )
    probs = jax.nn.softmax(expected, axis=-1)[..., 100:200]
    np.testing.assert_allclose(
        np.where(live[..., None], out["range_probs"], 0),
        np.where(live[..., None], probs, 0),
        atol=1e-6,
    )


def test_greedy_equals_naive_argmax_loop(setup):
    model, variables, encoded = setup
    prompts, steps = _prompts(3, 2), 12
    out = _sampler(model, max_len=steps, greedy=True)(
        variables, encoded, prompts, jax.random.key(0)
    )

    # No cache: a full forward pass per token. The sequence buffer has a fixed
    # length (one compilation); causality makes the unwritten tail irrelevant.
    decode = jax.jit(functools.partial(model.apply, method=model.decode))
    seq = np.zeros((3, 2 + steps), np.int32)
    seq[:, :2] = prompts
    done = np.zeros(3, bool)
    for i in range(steps):
        logits = decode(variables, jnp.asarray(seq), encoded)
        token = np.where(done, 0, np.asarray(jnp.argmax(logits[:, 1 + i], axis=-1)))
        done |= token == 0
        seq[:, 2 + i] = token
    np.testing.assert_array_equal(out["tokens"], seq[:, 2:])


def test_top_k_one_and_tiny_nucleus_equal_greedy(setup):
    model, variables, encoded = setup
    prompts = _prompts(3, 2)
    greedy = _sampler(model, max_len=10, greedy=True)(
        variables, encoded, prompts, jax.random.key(0)
    )
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=0.0)):
        sampled = _sampler(model, max_len=10, **kw)(variables, encoded, prompts, jax.random.key(7))
        np.testing.assert_array_equal(sampled["tokens"], greedy["tokens"])
    free = _sampler(model, max_len=10)(variables, encoded, prompts, jax.random.key(7))
    assert not np.array_equal(free["tokens"], greedy["tokens"])


def test_loop_stops_early_when_every_sequence_ended(setup):
    model, variables, encoded = setup
    eos_first = _with_eos_bias(variables, 100.0)
    out = _sampler(model, max_len=20, logits_range=(0, 5))(
        eos_first, encoded, _prompts(3, 2), jax.random.key(0)
    )
    assert int(out["num_steps"]) == 1
    np.testing.assert_array_equal(out["length"], [0, 0, 0])
    assert bool(out["done"].all())
    np.testing.assert_array_equal(out["tokens"], 0)
    np.testing.assert_allclose(out["range_probs"][:, 0, 0], 1.0, atol=1e-6)
    np.testing.assert_array_equal(out["range_probs"][:, 1:], 0.0)


def test_padding_after_eos_per_sequence(setup):
    model, variables, encoded = setup
    # EOS about as likely as all other tokens together: sequences end at
    # different steps; finished ones must keep emitting padding.
    likely_eos = _with_eos_bias(variables, 6.0)
    steps = MAX_LEN - 2
    encoded = jnp.repeat(encoded, 4, axis=0)
    out = _sampler(model, max_len=steps)(
        likely_eos, encoded, _prompts(3 * 4, 2), jax.random.key(11)
    )
    tokens, length = np.asarray(out["tokens"]), np.asarray(out["length"])
    assert len(set(length.tolist())) > 2, length  # the rows really ended apart
    for row, n in zip(tokens, length, strict=True):
        assert np.all(row[:n] != 0)
        np.testing.assert_array_equal(row[n:], 0)
    logprob = np.asarray(out["token_logprob"])
    after = np.arange(steps)[None] > length[:, None]
    np.testing.assert_array_equal(logprob[after], 0.0)
    assert int(out["num_steps"]) == (length.max() + 1 if out["done"].all() else steps)


def test_filter_logits_on_a_hand_made_distribution():
    probs = np.array([0.15, 0.5, 0.05, 0.3])  # order by probability: 1, 3, 0, 2
    logits = jnp.log(jnp.asarray(probs, jnp.float32))

    def kept(**kw):
        return set(np.flatnonzero(np.asarray(filter_logits(logits, **kw)) > MASKED_LOGIT / 2))

    assert kept(top_p=0.85) == {1, 3}  # 0.5 + 0.3 ≤ 0.85; the 0.15 that crosses is dropped
    assert kept(top_p=0.96) == {1, 3, 0}
    assert kept(top_p=0.3) == {1}  # the top token is always kept
    assert kept(top_p=1.0) == {0, 1, 2, 3}
    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=3, top_p=0.85) == {1, 3}
    # Ties with the k-th largest logit are kept, as in the official code.
    tie = filter_logits(jnp.array([1.0, 1.0, 0.0]), top_k=1)
    np.testing.assert_array_equal(tie, [1.0, 1.0, MASKED_LOGIT])
    # Kept logits are unchanged.
    np.testing.assert_array_equal(filter_logits(logits, top_p=0.85)[1], logits[1])


def _nucleus_by_full_sort(logits, top_p):
    """The definition: sort everything, keep the prefix of mass ≤ p (and the top token)."""
    ordered = -jnp.sort(-logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
    keep = (cumulative <= top_p).at[..., 0].set(True)
    cut = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cut, MASKED_LOGIT, logits)


@pytest.mark.parametrize("scale", [8.0, 0.05], ids=["nucleus-in-candidates", "flat-full-sort"])
def test_nucleus_equals_the_full_sort_and_samples_the_same(scale):
    # Peaked rows: the nucleus lies among the few largest logits (the fast
    # path); nearly flat rows over 35000 tokens need the full sort.
    r = np.random.default_rng(7)
    logits = jnp.asarray(r.normal(size=(64, 35000)) * scale, jnp.float32)
    for top_p in (0.1, 0.4, 0.9):
        got = filter_logits(logits, top_p=top_p)
        want = _nucleus_by_full_sort(logits, top_p)
        np.testing.assert_array_equal(got > MASKED_LOGIT / 2, want > MASKED_LOGIT / 2)
        key = jax.random.key(11)
        np.testing.assert_array_equal(
            jax.random.categorical(key, got), jax.random.categorical(key, want)
        )
    kept = np.sum(np.asarray(filter_logits(logits, top_p=0.9)) > MASKED_LOGIT / 2, axis=-1)
    # The two cases do take the two paths.
    assert (kept.max() < 64) if scale > 1 else (kept.min() > 64)


@pytest.mark.parametrize("scale", [8.0, 0.05], ids=["nucleus-in-candidates", "flat-full-sort"])
def test_nucleus_draw_is_the_full_sorts_and_stays_in_the_nucleus(scale):
    r = np.random.default_rng(3)
    vocab = 5000
    logits = jnp.asarray(r.normal(size=(64, vocab)) * scale, jnp.float32)
    uniform = jax.random.uniform(jax.random.key(5), (64,))
    for top_p, top_k in ((0.1, 0), (0.4, 0), (0.9, 0), (0.9, 100)):
        fast = nucleus_sample(uniform, logits, top_p=top_p, top_k=top_k)
        full = nucleus_sample(uniform, logits, top_p=top_p, top_k=top_k, candidates=vocab)
        np.testing.assert_array_equal(fast, full)
        kept = np.asarray(filter_logits(logits, top_p=top_p, top_k=top_k)) > MASKED_LOGIT / 2
        assert kept[np.arange(64), np.asarray(fast)].all()
        # The peaked rows' nuclei fit the 64 candidates, the flat rows' do not.
        assert (kept.sum(-1).max() < 64) if scale > 1 else (kept.sum(-1).min() > 64)


def test_nucleus_draw_follows_the_renormalised_nucleus():
    probs = np.array([0.15, 0.5, 0.05, 0.3])  # the 0.96 nucleus: 1, 3, 0
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (100_000, 4))
    uniform = jax.random.uniform(jax.random.key(0), (100_000,))
    # Two candidates hold 0.8 < p: the draw must fall back to the full sort.
    for candidates in (2, 4):
        tokens = nucleus_sample(uniform, logits, top_p=0.96, candidates=candidates)
        share = np.bincount(np.asarray(tokens), minlength=4) / len(tokens)
        np.testing.assert_allclose(share, [0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95], atol=0.005)
    # The spans are laid out in descending order of probability.
    edges = jnp.array([0.0, 0.5 / 0.95 - 1e-4, 0.5 / 0.95 + 1e-4, 0.9999])
    np.testing.assert_array_equal(nucleus_sample(edges, logits[:4], top_p=0.96), [1, 1, 3, 0])


def test_per_row_keys_draw_as_one_row_batches():
    # A row's draw depends on its key and logits only, in any batch.
    r = np.random.default_rng(1)
    logits = jnp.asarray(r.normal(size=(6, 500)) * 3, jnp.float32)
    keys = jax.random.split(jax.random.key(9), 6)
    for top_p in (0.5, 1.0):
        batched = next_token(keys, logits, top_p=top_p)
        alone = [
            int(next_token(keys[i : i + 1], logits[i : i + 1], top_p=top_p)[0]) for i in range(6)
        ]
        np.testing.assert_array_equal(batched, alone)


def test_compiles_once_for_two_calls(setup):
    model, variables, encoded = setup
    traces = []

    def counted(variables, encoded, prompts, rng):
        traces.append(1)
        return sample_sequences(model, variables, encoded, prompts, rng, max_len=8, top_p=0.9)

    sample = jax.jit(counted)
    a = sample(variables, encoded, _prompts(3, 2), jax.random.key(0))
    b = sample(variables, encoded, _prompts(3, 2) + 1, jax.random.key(1))
    jax.block_until_ready((a, b))
    assert len(traces) == 1


def test_periodic_grammar_confines_each_position_and_never_ends(setup):
    model, variables, encoded = setup
    # Even positions may hold tokens 100-109, odd ones 200-204; EOS is nowhere
    # allowed, so even an EOS-loving model runs the full length.
    mask = np.zeros((2, VOCAB), bool)
    mask[0, 100:110] = True
    mask[1, 200:205] = True
    eos_first = _with_eos_bias(variables, 100.0)
    steps = 9
    grammar = Grammar.periodic(mask)
    out = _sampler(model, max_len=steps, grammar=grammar, logits_range=(0, 5))(
        eos_first, encoded, _prompts(3, 2), jax.random.key(3)
    )
    tokens = np.asarray(out["tokens"])
    assert int(out["num_steps"]) == steps and not bool(out["done"].any())
    assert np.all((tokens[:, 0::2] >= 100) & (tokens[:, 0::2] < 110))
    assert np.all((tokens[:, 1::2] >= 200) & (tokens[:, 1::2] < 205))
    # Scores still come from the unmasked logits: EOS keeps nearly all the mass.
    np.testing.assert_allclose(out["range_probs"][..., 0], 1.0, atol=1e-6)
    assert np.all(out["token_logprob"] < -50.0)


def test_grammar_greedy_is_argmax_over_allowed_tokens(setup):
    model, variables, encoded = setup
    prompts, steps = _prompts(3, 2), 6
    mask = np.zeros((1, VOCAB), bool)
    mask[0, 150:170] = True
    grammar = Grammar.periodic(mask)
    out = _sampler(model, max_len=steps, greedy=True, grammar=grammar, return_logits=True)(
        variables, encoded, prompts, jax.random.key(0)
    )
    logits = np.asarray(out["logits"])
    np.testing.assert_array_equal(out["tokens"], 150 + logits[..., 150:170].argmax(-1))


def test_grammar_of_another_vocabulary_is_refused(setup):
    model, variables, encoded = setup
    grammar = Grammar.periodic(np.ones((5, VOCAB + 1), bool))
    with pytest.raises(ValueError, match="grammar covers 301 tokens"):
        _sampler(model, max_len=4, grammar=grammar)(
            variables, encoded, _prompts(3, 2), jax.random.key(0)
        )


def _pair_grammar():
    """Pairs (a, b) of tokens 100-109 then 200-209, or a two-token break 50 50, or EOS
    after a complete pair: a state machine no periodic mask can express."""
    tokens = np.arange(VOCAB)
    return Grammar.build(
        kinds={"a": (tokens >= 100) & (tokens < 110), "b": (tokens >= 200) & (tokens < 210),
               "brk": tokens == 50, "eos": tokens == 0},
        transitions={
            "first": {"a": "second"},
            "second": {"b": "free"},
            "free": {"a": "second", "brk": "brk2", "eos": "end"},
            "brk2": {"brk": "first"},
            "end": {"eos": "end"},
        },
        start="first",
    )  # fmt: skip


def test_stateful_grammar_answers_always_parse(setup):
    model, variables, encoded = setup
    grammar = _pair_grammar()
    # Temperature 3 spreads the mass: every allowed branch gets drawn somewhere.
    out = _sampler(model, max_len=16, grammar=grammar, temperature=3.0)(
        variables, jnp.tile(encoded, (8, 1, 1)), jnp.tile(_prompts(3, 2), (8, 1)), jax.random.key(7)
    )
    tokens = np.asarray(out["tokens"])
    for row in tokens:
        assert grammar.violation(row) is None, row
    assert (tokens == 50).any()
    # Rows that ended did so after a complete pair.
    for row, n in zip(tokens, np.asarray(out["length"]), strict=True):
        if n < 16:
            assert 200 <= row[n - 1] < 210


def test_grammar_violation_names_the_token():
    grammar = _pair_grammar()
    assert grammar.violation([100, 200, 50, 50, 101, 201, 0]) is None
    assert "token 101 (kind a) at position 3 in state brk2" in grammar.violation(
        [100, 200, 50, 101]
    )
    assert "position 1" in grammar.violation([100, 0])


def test_row_keys_make_answers_independent_of_the_batch(setup):
    model, variables, encoded = setup
    prompts = _prompts(3, 2)
    ids = jnp.array([[7, 0], [3, 1], [7, 2]], jnp.uint32)
    sample = _sampler(model, max_len=10, temperature=2.0)
    rng = jax.random.key(4)
    whole = sample(variables, encoded, prompts, row_keys(rng, ids))
    # Row 2 alone, and rows in reverse order: the same answers per row.
    alone = sample(variables, encoded[2:], prompts[2:], row_keys(rng, ids[2:]))
    flipped = sample(variables, encoded[::-1], prompts[::-1], row_keys(rng, ids[::-1]))
    np.testing.assert_array_equal(alone["tokens"][0], whole["tokens"][2])
    np.testing.assert_array_equal(flipped["tokens"][::-1], whole["tokens"])
    # Different identities draw differently (10 tokens at temperature 2).
    assert not np.array_equal(whole["tokens"][0], whole["tokens"][2])
