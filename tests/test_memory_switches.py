"""Memory and speed switches: bfloat16 compute, rematerialisation, micro-batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unified_seq import decoding, train
from unified_seq.models import sizes

VOCAB = 64
SIZE = 32
WEIGHTS = {"object_detection": 0.3, "captioning": 0.7}
TINY = dict(
    patch_size=16, enc_depth=2, enc_width=32, enc_mlp_dim=64, enc_heads=2,
    dec_depth=2, dec_width=32, dec_mlp_dim=64, dec_heads=2,
)  # fmt: skip


def _model(**overrides):
    cfg = sizes.model_config("tiny", **{**TINY, "dropout": 0.0, **overrides})
    return sizes.build_model(cfg, VOCAB, 16)


def _params(model):
    images = jnp.zeros([1, SIZE, SIZE, 3])
    return jax.jit(model.init)(jax.random.key(0), images, jnp.zeros([1, 8], jnp.int32))["params"]


def _batches(batch: int, seed: int = 0):
    r = np.random.default_rng(seed)

    def seq(shape):
        weights = (r.random(shape) > 0.3).astype(np.float32)
        weights[0] = 0.0  # a row without targets: micro-batches get unequal Σ w
        return {
            "input_seq": r.integers(1, VOCAB, shape).astype(np.int32),
            "target_seq": r.integers(0, VOCAB, shape).astype(np.int32),
            "token_weights": weights,
        }

    return {
        "object_detection": {
            "image": r.random((batch, SIZE, SIZE, 3), np.float32),
            **seq((batch, 11)),
        },
        "captioning": {"image": r.random((batch, SIZE, SIZE, 3), np.float32), **seq((batch, 3, 8))},
    }


def _max_diff(a, b) -> float:
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in leaves)


def test_bfloat16_computes_in_bfloat16_but_keeps_float32_parameters_and_logits():
    f32, bf16 = _model(), _model(dtype="bfloat16")
    params = _params(f32)
    params_bf16 = _params(bf16)
    # Same initial values, stored in float32 either way.
    assert _max_diff(params, params_bf16) == 0.0
    assert {x.dtype for x in jax.tree_util.tree_leaves(params_bf16)} == {jnp.dtype(jnp.float32)}
    images = jax.random.uniform(jax.random.key(1), (2, SIZE, SIZE, 3))
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, VOCAB)
    # Jitted: run op by op, the bfloat16 model compiles each of its ops alone (minutes).
    logits, _ = jax.jit(f32.apply)({"params": params}, images, tokens)
    logits16, extras16 = jax.jit(bf16.apply)({"params": params}, images, tokens)
    assert extras16["encoded"].dtype == jnp.bfloat16  # the compute type
    assert logits16.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(logits)))
    assert float(jnp.max(jnp.abs(logits16 - logits))) < 0.05 * scale
    # Gradients (and so the optimizer state) are float32 too.
    batches = _batches(2)

    def loss(p):
        return train.mixed_loss(p, bf16, batches, jax.random.key(0), WEIGHTS)[0]

    grads = jax.jit(jax.grad(loss))(params)
    assert {x.dtype for x in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_auto_dtype_is_float32_on_cpu():
    assert sizes.resolve(sizes.model_config("tiny", dtype="auto"))["dtype"] == (
        "float32" if jax.default_backend() == "cpu" else "bfloat16"
    )
    with pytest.raises(ValueError, match="model.dtype"):
        sizes.resolve(sizes.model_config("tiny", dtype="float16"))
    with pytest.raises(ValueError, match="model.remat"):
        sizes.resolve(sizes.model_config("tiny", remat="everything"))


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_parameters_loss_and_gradients(policy):
    # Dropout and drop-path on: the recomputed forward pass must draw the same masks.
    plain = _model(dropout=0.1, drop_path=0.1)
    rematted = _model(dropout=0.1, drop_path=0.1, remat=policy)
    params = _params(plain)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(_params(rematted))
    batches = _batches(2)
    rng = jax.random.key(3)

    def loss_and_grads(model):
        fn = jax.value_and_grad(train.mixed_loss, has_aux=True)
        return jax.jit(lambda p: fn(p, model, batches, rng, WEIGHTS))(params)

    (loss, losses), grads = loss_and_grads(plain)
    (loss_r, losses_r), grads_r = loss_and_grads(rematted)
    np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
    assert _max_diff(grads, grads_r) < 1e-6


def test_remat_leaves_cached_decoding_alone():
    plain, rematted = _model(), _model(remat="full")
    params = _params(plain)
    images = jax.random.uniform(jax.random.key(1), (2, SIZE, SIZE, 3))
    prompts = jnp.full((2, 2), 10, jnp.int32)
    outs = []
    for model in (plain, rematted):
        encoded = model.apply({"params": params}, images, method=model.encode)
        outs.append(
            decoding.sample_sequences(
                model, {"params": params}, encoded, prompts, jax.random.key(4), max_len=6,
                return_logits=True,
            )
        )  # fmt: skip
    np.testing.assert_array_equal(outs[0]["tokens"], outs[1]["tokens"])
    np.testing.assert_allclose(outs[0]["logits"], outs[1]["logits"], atol=1e-6)


@pytest.mark.parametrize("microbatches", [2, 4])
def test_microbatches_give_the_full_batch_update(microbatches):
    model = _model()
    params = _params(model)
    optimizer = optax.sgd(0.1)
    state = train.TrainState(jnp.zeros([], jnp.int32), params, optimizer.init(params))
    batches = _batches(4)

    def one_step(k):
        step = train.make_train_step(
            model, optimizer, optax.constant_schedule(0.1), WEIGHTS, seed=0, microbatches=k
        )
        return jax.jit(step)(state, batches)

    full, full_metrics = one_step(1)
    micro, micro_metrics = one_step(microbatches)
    assert _max_diff(full.params, micro.params) < 1e-6
    for key in full_metrics:
        np.testing.assert_allclose(micro_metrics[key], full_metrics[key], rtol=1e-5, err_msg=key)
    with pytest.raises(ValueError, match="train.microbatches=3"):
        one_step(3)
