"""The training loss: token-weighted cross-entropy, projected only where it is weighed.

Most positions of a training sequence carry weight 0 (padding after EOS, the
coordinates of detection's noise objects), yet projecting them onto the
35000-token vocabulary is most of a step's FLOPs. `hidden_token_loss` gathers
the weighted positions into a static number of slots first and projects only
those; when a group of rows holds more weighted positions than the slots, it
projects every position. Either way the loss and gradients are those of
`token_loss` on the full logits, up to float summation order.
`projected_cross_entropy` is the output layer and the loss as one operation
with a hand-written gradient (the model's `token_cross_entropy`), which a
training step runs faster than their autodiff.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """float32[...]: cross-entropy of integer targets under smoothed labels, exactly.

    The smoothed label puts 1 - α on the target and α / V on every token, so
    `CE = logsumexp(z) - (1 - α) · z_target - α · mean(z)`. No one-hot
    [..., V] array is built: the target's logit is picked by a comparison
    that fuses into the reduction, and its gradient into the softmax's
    (one-hot labels cost a third of the loss's time at V = 35000 on CPU).

    Args:
      logits: float[..., V].
      targets: int[...] in [0, V).
      label_smoothing: α.
    """
    logits = logits.astype(jnp.float32)
    tokens = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    picked = jnp.sum(jnp.where(tokens == targets[..., None], logits, 0.0), axis=-1)
    ce = jax.nn.logsumexp(logits, axis=-1) - (1.0 - label_smoothing) * picked
    if label_smoothing:
        ce = ce - label_smoothing * jnp.mean(logits, axis=-1)
    return ce


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def projected_cross_entropy(
    hidden: jax.Array,
    embedding: jax.Array,
    bias: jax.Array,
    targets: jax.Array,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """`cross_entropy(hidden · embeddingᵀ + bias, targets)` with a hand-written gradient.

    The output layer and the loss as one operation, so that its backward pass
    touches the [N, V] arrays as few times as XLA's CPU backend allows (at
    V = 35000 each pass costs tens of milliseconds): the forward pass writes
    the product, reads it for the max and once more for the exponentials,
    which it keeps; the backward pass's three products (hidden, embedding,
    bias) read those exponentials directly, the target terms subtracted
    from them in place and the softmax scale applied on their narrow
    sides. Autodiff of `cross_entropy` kept a [N, V] selection array and
    made more passes over the logits.

    Args:
      hidden: float[N, W] (the compute type: float32 or bfloat16).
      embedding: float[V, W], the same type.
      bias: float32[V].
      targets: int32[N].
      label_smoothing: α, as in `cross_entropy`.

    Returns:
      float32[N].
    """
    return _projected_forward(hidden, embedding, bias, targets, label_smoothing)[0]


def _projected_forward(hidden, embedding, bias, targets, label_smoothing):
    f32 = jnp.float32
    logits = jnp.einsum("nw,vw->nv", hidden, embedding, preferred_element_type=f32)
    # Any bound at or above each row's max(z + b) keeps the exponentials at
    # most 1, and the loss does not depend on which: max z + max b needs no
    # [N, V] sum z + b written for the max to read (XLA's CPU backend does
    # not fuse that sum into its reduction). It exceeds the true max by at
    # most the bias's range, which would have to pass ~80 before the
    # exponentials underflow.
    peak = jnp.max(logits, axis=-1) + jnp.max(bias)
    # Kept whole for the backward pass; the barrier keeps XLA from also
    # folding the exponentials into the sum below, which its CPU backend
    # runs slower than a product over the kept array.
    exps = jax.lax.optimization_barrier(jnp.exp(logits + bias - peak[:, None]))
    total = jnp.einsum("nv,v->n", exps, jnp.ones(exps.shape[-1], f32))
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] + bias[targets]
    ce = peak + jnp.log(total) - (1.0 - label_smoothing) * picked
    if label_smoothing:
        # mean_v(h·e_v + b_v) = h · mean_v(e_v) + mean(b): no pass over [N, V].
        mean_embedding = jnp.mean(embedding.astype(f32), axis=0)
        ce = ce - label_smoothing * (hidden.astype(f32) @ mean_embedding + jnp.mean(bias))
    return ce, (hidden, embedding, exps, total, targets)


def _projected_backward(label_smoothing, residuals, g):
    hidden, embedding, exps, total, targets = residuals
    f32 = jnp.float32
    # dCE/dz = softmax(z) - (1 - α) · onehot(target) - α / V, times g, is
    # never formed as a [N, V] array: the products read the kept
    # exponentials and each row's softmax scale g / total goes on their
    # [N, W] side. In those units the one-hot term is -(1 - α) · total at
    # each target (whatever g, even 0), so it is subtracted from the N
    # target entries in place and all three products carry it.
    scale = g / total
    rows = jnp.arange(exps.shape[0])
    exps = exps.at[rows, targets].add(-(1.0 - label_smoothing) * total)
    low = exps.astype(hidden.dtype)
    wide = hidden.astype(f32)
    d_hidden = scale[:, None] * jnp.einsum("nv,vw->nw", low, embedding, preferred_element_type=f32)
    scaled = (wide * scale[:, None]).astype(hidden.dtype)
    d_embedding = jnp.einsum("nv,nw->vw", low, scaled, preferred_element_type=f32)
    # The bias gradient as a product: XLA's CPU backend runs the column sum slowly.
    d_bias = jnp.einsum("nv,n->v", exps, scale)
    if label_smoothing:
        spread = label_smoothing / exps.shape[-1]
        d_hidden = d_hidden - spread * g[:, None] * jnp.sum(embedding.astype(f32), axis=0)
        d_embedding = d_embedding - spread * jnp.einsum("n,nw->w", g, wide)
        d_bias = d_bias - spread * jnp.sum(g)
    return (
        d_hidden.astype(hidden.dtype),
        d_embedding.astype(embedding.dtype),
        d_bias,
        None,
    )


projected_cross_entropy.defvjp(_projected_forward, _projected_backward)


def token_loss(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    label_smoothing: float = 0.0,
    normalizer: jax.Array | None = None,
) -> jax.Array:
    """Token-weighted cross-entropy `Σ w·CE / Σ w` (official normalisation).

    Args:
      logits: float32[..., T, V].
      targets: int32[..., T].
      weights: float32[..., T]; zero on prompts and padding.
      label_smoothing: mass spread uniformly over the vocabulary.
      normalizer: the `Σ w` to divide by; default these weights' own. A
        micro-batch passes its whole batch's, so micro-batch losses add up
        to the whole batch's.
    """
    ce = cross_entropy(logits, targets, label_smoothing)
    total = jnp.sum(weights) if normalizer is None else normalizer
    return jnp.sum(ce * weights) / (total + 1e-9)


def slots(positions: int, fraction: float) -> int:
    """How many of a group's `positions` are projected at `fraction` (at least one)."""
    return max(1, min(positions, math.ceil(fraction * positions)))


def hidden_token_loss(
    per_token: Callable[[jax.Array, jax.Array], jax.Array],
    hidden: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    fraction: float,
    groups: int = 1,
    normalizer: jax.Array | None = None,
) -> jax.Array:
    """`Σ w · per_token(hidden, targets) / Σ w`, projecting only the weighted positions.

    The rows are split into `groups` groups of whole rows (the batch's
    devices: one group per device keeps the gathering local); in each, the
    positions with a nonzero weight move, in order, into `slots(positions,
    fraction)` slots, padded with weight-0 positions, and only the slots are
    projected. When some group has more weighted positions than slots, the
    step projects every position instead (`lax.cond`: only the branch taken
    runs), so the result never depends on `fraction`, only its speed does.

    Args:
      per_token: (float[N, W], int32[N]) → float32[N], the cross-entropy of
        the output layer's logits at each position (the model's
        `token_cross_entropy`, or `cross_entropy` of a projection).
      hidden: float[..., T, W], the output layer's input.
      targets, weights, normalizer: as in `token_loss`.
      fraction: share of each group's positions projected; ≥ 1 projects all.
      groups: how many groups the rows form; reduced to a divisor of the rows.
    """
    total = jnp.sum(weights) if normalizer is None else normalizer
    rows = math.prod(weights.shape[:-1])
    groups = math.gcd(rows, max(1, groups))
    positions = weights.size // groups
    capacity = slots(positions, fraction)

    def every_position(hidden, targets, weights):
        ce = per_token(hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))
        return jnp.sum(ce * weights.reshape(-1))

    if capacity == positions:
        return every_position(hidden, targets, weights) / (total + 1e-9)

    def weighted_positions(hidden, targets, weights):
        hidden = hidden.reshape(groups, positions, hidden.shape[-1])
        targets, weights = targets.reshape(groups, -1), weights.reshape(groups, -1)
        # Weighted positions first, each group's in its own order (stable).
        order = jnp.argsort(weights == 0, axis=-1, stable=True)[:, :capacity]
        picked = jnp.take_along_axis(hidden, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        ce = per_token(picked.reshape(-1, picked.shape[-1]), targets.reshape(-1))
        return jnp.sum(ce * jnp.take_along_axis(weights, order, axis=1).reshape(-1))

    # The fallback keeps no activations for the backward pass (it recomputes
    # them): a `cond` under autodiff returns both branches' residuals, zeros
    # for the branch not taken, and the full branch's [positions, V] softmax
    # would cost a step that skips it a large zero fill.
    fallback = jax.checkpoint(every_position)
    fits = jnp.all(jnp.sum(weights.reshape(groups, -1) != 0, axis=-1) <= capacity)
    summed = jax.lax.cond(fits, weighted_positions, fallback, hidden, targets, weights)
    return summed / (total + 1e-9)
