"""The batch-mixing step: one gradient of Σ λ_t L_t, equal to Σ λ_t ∇L_t."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unified_seq import loss, train
from unified_seq.models import sizes

VOCAB = 64
SIZE = 32
WEIGHTS = {"object_detection": 0.3, "captioning": 0.7}


def _model():
    cfg = sizes.model_config(
        "tiny", patch_size=16, enc_depth=1, enc_width=32, enc_mlp_dim=64, enc_heads=2,
        dec_depth=1, dec_width=32, dec_mlp_dim=64, dec_heads=2, dropout=0.0,
    )  # fmt: skip
    return sizes.build_model(cfg, VOCAB, 16)


def _batches(rng):
    r = np.random.default_rng(rng)

    def seq(shape):
        return {
            "input_seq": r.integers(1, VOCAB, shape).astype(np.int32),
            "target_seq": r.integers(0, VOCAB, shape).astype(np.int32),
            "token_weights": (r.random(shape) > 0.3).astype(np.float32),
        }

    return {
        "object_detection": {"image": r.random((2, SIZE, SIZE, 3), np.float32), **seq((2, 11))},
        "captioning": {"image": r.random((2, SIZE, SIZE, 3), np.float32), **seq((2, 3, 8))},
    }


def _params(model):
    images = jnp.zeros([1, SIZE, SIZE, 3])
    return jax.jit(model.init)(jax.random.key(0), images, jnp.zeros([1, 8], jnp.int32))["params"]


def test_token_loss_is_weighted_mean_cross_entropy():
    logits = jnp.array([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]])
    targets = jnp.array([[0, 2]])
    weights = jnp.array([[1.0, 0.5]])
    ce = -jax.nn.log_softmax(logits)[0, [0, 1], [0, 2]]
    expected = (ce[0] * 1.0 + ce[1] * 0.5) / 1.5
    assert float(loss.token_loss(logits, targets, weights)) == pytest.approx(
        float(expected), rel=1e-5
    )
    assert float(loss.token_loss(logits, targets, jnp.zeros_like(weights))) == 0.0


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_integer_label_cross_entropy_equals_one_hot_cross_entropy(smoothing):
    r = np.random.default_rng(3)
    logits = jnp.asarray(r.normal(0, 4, (2, 3, 5, 300)), jnp.float32)  # [B, C, T, V]
    targets = jnp.asarray(r.integers(0, 300, (2, 3, 5)), jnp.int32)

    def one_hot_ce(z):
        labels = optax.smooth_labels(jax.nn.one_hot(targets, 300), smoothing)
        return optax.softmax_cross_entropy(z, labels)

    def ours(z):
        return loss.cross_entropy(z, targets, smoothing)

    np.testing.assert_allclose(ours(logits), one_hot_ce(logits), rtol=1e-5, atol=1e-5)
    weights = jnp.asarray(r.random((2, 3, 5)), jnp.float32)
    grad = jax.grad(lambda z: jnp.sum(ours(z) * weights))(logits)
    expected = jax.grad(lambda z: jnp.sum(one_hot_ce(z) * weights))(logits)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_output_bias_gradient_is_the_plain_sums():
    from unified_seq.models.decoder import add_output_bias

    r = np.random.default_rng(4)
    logits = jnp.asarray(r.normal(size=(3, 7, 50)), jnp.float32)
    bias = jnp.asarray(r.normal(size=(50,)), jnp.float32)
    g = jnp.asarray(r.normal(size=(3, 7, 50)), jnp.float32)

    def plain(z, b):
        return jnp.sum((z + b) * g)

    def ours(z, b):
        return jnp.sum(add_output_bias(z, b) * g)

    np.testing.assert_array_equal(add_output_bias(logits, bias), logits + bias)
    for got, want in zip(
        jax.grad(ours, (0, 1))(logits, bias), jax.grad(plain, (0, 1))(logits, bias), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mixed_gradient_equals_weighted_sum_of_task_gradients():
    model = _model()
    params = _params(model)
    batches = _batches(0)
    rng = jax.random.key(1)
    # Jitted: the whole model op by op compiles each op alone (most of this test's time).
    mixed = jax.value_and_grad(train.mixed_loss, has_aux=True)
    (_, losses), grad = jax.jit(lambda p: mixed(p, model, batches, rng, WEIGHTS))(params)
    expected = None
    for task in sorted(batches):
        # Each task alone, with the rng it gets inside the mixed loss.
        i = sorted(batches).index(task)

        def single(p, task=task, i=i):
            b = batches[task]
            logits, _ = model.apply({"params": p}, b["image"], b["input_seq"], train=True,
                                    rngs={"dropout": jax.random.fold_in(rng, i)})  # fmt: skip
            return loss.token_loss(logits, b["target_seq"], b["token_weights"])

        loss_t, g = jax.jit(jax.value_and_grad(single))(params)
        assert float(loss_t) == pytest.approx(float(losses[task]), rel=1e-6)
        g = jax.tree_util.tree_map(lambda x, w=WEIGHTS[task]: w * x, g)
        expected = g if expected is None else jax.tree_util.tree_map(jnp.add, expected, g)
    for a, b in zip(
        jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_train_step_updates_params_and_reports_metrics():
    model = _model()
    params = _params(model)
    optimizer = optax.adamw(1e-3)
    state = train.TrainState(jnp.zeros([], jnp.int32), params, optimizer.init(params))
    step = jax.jit(
        train.make_train_step(model, optimizer, optax.constant_schedule(1e-3), WEIGHTS, seed=0)
    )
    new, metrics = step(state, _batches(2))
    assert int(new.step) == 1
    assert set(metrics) == {"loss", "grad_norm", "learning_rate", "finite",
                            "loss/object_detection", "loss/captioning"}  # fmt: skip
    assert bool(metrics["finite"])
    total = sum(WEIGHTS[t] * metrics[f"loss/{t}"] for t in WEIGHTS)
    assert float(metrics["loss"]) == pytest.approx(float(total), rel=1e-6)
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), new.params, params)
    assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_data_mixing_concatenates_fixed_shares():
    batches = _batches(3)
    for b in batches.values():
        b["num_truncated"] = np.zeros(2, np.int32)
    mixed = train.mix_examples({t: {k: v for k, v in b.items() if k != "num_truncated"}
                                for t, b in batches.items()}, 16)  # fmt: skip
    assert mixed["image"].shape == (4, SIZE, SIZE, 3)
    assert mixed["input_seq"].shape == (4, 16)
    # Captioning (sorted first) keeps its first caption, zero-padded.
    np.testing.assert_array_equal(
        mixed["input_seq"][:2, :8], batches["captioning"]["input_seq"][:, 0]
    )
    assert np.all(mixed["token_weights"][:2, 8:] == 0)
