"""Projecting only the weighted positions gives token_loss's loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unified_seq import loss, train
from unified_seq.models import sizes

VOCAB, WIDTH = 50, 8


def _case(shape, live_share, seed=0):
    r = np.random.default_rng(seed)
    hidden = jnp.asarray(r.normal(size=(*shape, WIDTH)), jnp.float32)
    targets = jnp.asarray(r.integers(0, VOCAB, shape), jnp.int32)
    weights = (r.random(shape) < live_share) * r.choice([1.0, 0.1], shape)
    kernel = jnp.asarray(r.normal(size=(WIDTH, VOCAB)), jnp.float32)
    return hidden, targets, jnp.asarray(weights, jnp.float32), kernel


def _both(hidden, targets, weights, kernel, **options):
    """(reference, projected-only) loss and gradients w.r.t. hidden and kernel."""
    smoothing = options.pop("label_smoothing", 0.0)
    normalizer = options.pop("normalizer", None)

    def reference(h, k):
        return loss.token_loss(h @ k, targets, weights, smoothing, normalizer)

    def projected(h, k):
        return loss.hidden_token_loss(
            lambda x, t: loss.cross_entropy(x @ k, t, smoothing),
            h,
            targets,
            weights,
            normalizer=normalizer,
            **options,
        )

    grad = jax.value_and_grad
    return grad(reference, (0, 1))(hidden, kernel), grad(projected, (0, 1))(hidden, kernel)


@pytest.mark.parametrize(
    "shape, live, fraction, groups, smoothing",
    [
        ((4, 12), 0.3, 0.5, 1, 0.0),  # slots hold every weighted position
        ((4, 12), 0.3, 0.5, 2, 0.1),
        ((6, 12), 0.3, 0.5, 4, 0.0),  # 4 groups do not divide 6 rows: 2 groups
        ((2, 3, 10), 0.4, 0.6, 2, 0.1),  # C sequences per image
        ((4, 12), 0.9, 0.5, 2, 0.0),  # too many weighted positions: all projected
        ((4, 12), 0.3, 1.0, 2, 0.0),  # fraction 1: the plain loss
    ],
)
def test_loss_and_gradients_equal_the_full_projections(shape, live, fraction, groups, smoothing):
    case = _case(shape, live)
    (ref, ref_grads), (got, got_grads) = _both(
        *case, fraction=fraction, groups=groups, label_smoothing=smoothing
    )
    assert float(ref) > 0
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for a, b in zip(got_grads, ref_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_normalizer_replaces_the_batchs_own_sum_of_weights():
    case = _case((4, 12), 0.3)
    (ref, _), (got, _) = _both(*case, fraction=0.5, groups=2, normalizer=jnp.float32(100.0))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    np.testing.assert_allclose(ref * 100, jnp.sum(case[2]) * loss.token_loss(
        case[0] @ case[3], case[1], case[2]), rtol=1e-5)  # fmt: skip


def test_weight_zero_positions_are_not_projected_when_the_weighted_ones_fit():
    # 2 groups of 20 positions, 10 weighted in each: at fraction 0.5 the 10
    # slots are exactly the weighted positions. NaN hidden states elsewhere
    # only reach the loss if those positions are projected.
    hidden, targets, _, kernel = _case((4, 10), 0.0)
    weights = np.zeros([4, 10], np.float32)
    weights[:, ::2] = 1.0
    poisoned = jnp.where(jnp.asarray(weights)[..., None] > 0, hidden, jnp.nan)
    clean = loss.token_loss(hidden @ kernel, targets, weights)

    def projected(h, fraction):
        return loss.hidden_token_loss(
            lambda x, t: loss.cross_entropy(x @ kernel, t),
            h,
            targets,
            jnp.asarray(weights),
            fraction=fraction,
            groups=2,
        )

    np.testing.assert_allclose(projected(poisoned, 0.5), clean, rtol=1e-6)
    grads = jax.grad(projected)(poisoned, 0.5)
    assert np.all(np.isfinite(grads)) and np.all(grads[:, 1::2] == 0)
    # 9 slots for 10 weighted positions: every position is projected.
    assert np.isnan(projected(poisoned, 0.45))


def test_the_slots_are_a_share_of_each_group_rounded_up():
    assert [loss.slots(100, f) for f in (0.0, 0.25, 0.251, 1.0, 2.0)] == [1, 25, 26, 100, 100]


def test_the_model_step_equals_the_full_projection_step():
    cfg = sizes.model_config(
        "tiny", patch_size=16, enc_depth=1, enc_width=32, enc_mlp_dim=64, enc_heads=2,
        dec_depth=1, dec_width=32, dec_mlp_dim=64, dec_heads=2, dropout=0.0,
    )  # fmt: skip
    model = sizes.build_model(cfg, 64, 16)
    r = np.random.default_rng(0)
    images = r.random((4, 32, 32, 3), np.float32)
    tokens = r.integers(1, 64, (4, 16)).astype(np.int32)
    params = jax.jit(model.init)(jax.random.key(0), images[:1], tokens[:1])["params"]
    # Detection-like rows: a weighted head, weight-0 noise coordinates and padding.
    weights = np.zeros([4, 16], np.float32)
    weights[:, :5] = 1.0
    weights[:, 5:12:4] = 0.5
    batches = {
        "object_detection": {
            "image": images,
            "input_seq": tokens,
            "target_seq": np.roll(tokens, -1, axis=1),
            "token_weights": weights,
        }
    }
    hidden = model.apply({"params": params}, images, tokens, method="hidden")
    logits, _ = model.apply({"params": params}, images, tokens)
    np.testing.assert_allclose(
        model.apply({"params": params}, hidden, method="logits"), logits, rtol=1e-6, atol=1e-6
    )

    def run(fraction):
        fn = jax.value_and_grad(train.mixed_loss, has_aux=True)
        return jax.jit(lambda p: fn(
            p, model, batches, jax.random.key(0), {"object_detection": 1.0},
            0.1, None, {"object_detection": fraction}, 2,
        ))(params)  # fmt: skip

    def by_autodiff(params):
        # The plain definition: the model's logits, then the token loss.
        logits, _ = model.apply({"params": params}, images, tokens)
        return loss.token_loss(logits, batches["object_detection"]["target_seq"], weights, 0.1)

    ref, ref_grads = jax.jit(jax.value_and_grad(by_autodiff))(params)
    (full, _), full_grads = run(1.0)
    (part, _), part_grads = run(0.5)
    np.testing.assert_allclose(full, ref, rtol=1e-6)
    np.testing.assert_allclose(part, full, rtol=1e-6)
    for grads in (full_grads, part_grads):
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("smoothing, bias_scale", [(0.0, 1.0), (0.1, 1.0), (0.0, 12.0)])
def test_the_fused_output_layer_loss_has_the_autodiff_gradients(smoothing, bias_scale):
    r = np.random.default_rng(4)
    hidden = jnp.asarray(r.normal(size=(24, WIDTH)), jnp.float32)
    embedding = jnp.asarray(r.normal(size=(VOCAB, WIDTH)), jnp.float32)
    # A wide bias (range ~60) moves the forward pass's bound on max(z + b)
    # far from the true max.
    bias = jnp.asarray(bias_scale * r.normal(size=(VOCAB,)), jnp.float32)
    targets = jnp.asarray(r.integers(0, VOCAB, 24), jnp.int32)
    # A weighted sum, as the loss takes; weight-0 rows must get no gradient.
    g = jnp.asarray(r.random(24) * (r.random(24) > 0.25), jnp.float32)

    def fused(h, e, b):
        return jnp.sum(g * loss.projected_cross_entropy(h, e, b, targets, smoothing))

    def plain(h, e, b):
        return jnp.sum(g * loss.cross_entropy(h @ e.T + b, targets, smoothing))

    got, got_grads = jax.value_and_grad(fused, (0, 1, 2))(hidden, embedding, bias)
    want, want_grads = jax.value_and_grad(plain, (0, 1, 2))(hidden, embedding, bias)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # In bfloat16 compute the products run in bfloat16, the loss stays float32.
    low = jax.value_and_grad(fused, (0, 1, 2))(
        hidden.astype(jnp.bfloat16), embedding.astype(jnp.bfloat16), bias
    )
    assert low[0].dtype == jnp.float32
    assert [x.dtype for x in low[1]] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
    np.testing.assert_allclose(low[0], want, rtol=2e-2)
