"""The training loss: token-weighted cross-entropy, projected only where it is weighed.

Most positions of a training sequence carry weight 0 (padding after EOS, the
coordinates of detection's noise objects), yet projecting them onto the
35000-token vocabulary is most of a step's FLOPs. `hidden_token_loss` gathers
the weighted positions into a static number of slots first and projects only
those; when a group of rows holds more weighted positions than the slots, it
projects every position. Either way the loss and gradients are those of
`token_loss` on the full logits, up to float summation order.
"""

from __future__ import annotations

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
    project: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    fraction: float,
    groups: int = 1,
    label_smoothing: float = 0.0,
    normalizer: jax.Array | None = None,
) -> jax.Array:
    """`token_loss(project(hidden), ...)`, projecting only the weighted positions.

    The rows are split into `groups` groups of whole rows (the batch's
    devices: one group per device keeps the gathering local); in each, the
    positions with a nonzero weight move, in order, into `slots(positions,
    fraction)` slots, padded with weight-0 positions, and only the slots are
    projected. When some group has more weighted positions than slots, the
    step projects every position instead (`lax.cond`: only the branch taken
    runs), so the result never depends on `fraction`, only its speed does.

    Args:
      project: float[..., W] → float32[..., V] (the model's output layer).
      hidden: float[..., T, W], what `project` maps to the logits.
      targets, weights, label_smoothing, normalizer: as in `token_loss`.
      fraction: share of each group's positions projected; ≥ 1 projects all.
      groups: how many groups the rows form; reduced to a divisor of the rows.
    """
    total = jnp.sum(weights) if normalizer is None else normalizer
    rows = math.prod(weights.shape[:-1])
    groups = math.gcd(rows, max(1, groups))
    positions = weights.size // groups
    capacity = slots(positions, fraction)

    def every_position(hidden, targets, weights):
        ce = cross_entropy(project(hidden), targets, label_smoothing)
        return jnp.sum(ce * weights)

    if capacity == positions:
        return every_position(hidden, targets, weights) / (total + 1e-9)

    def weighted_positions(hidden, targets, weights):
        hidden = hidden.reshape(groups, positions, hidden.shape[-1])
        targets, weights = targets.reshape(groups, -1), weights.reshape(groups, -1)
        # Weighted positions first, each group's in its own order (stable).
        order = jnp.argsort(weights == 0, axis=-1, stable=True)[:, :capacity]
        picked = jnp.take_along_axis(hidden, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        ce = cross_entropy(project(picked), targets, label_smoothing)
        return jnp.sum(ce * jnp.take_along_axis(weights, order, axis=1))

    # The fallback keeps no activations for the backward pass (it recomputes
    # them): a `cond` under autodiff returns both branches' residuals, zeros
    # for the branch not taken, and the full branch's [positions, V] softmax
    # would cost a step that skips it a large zero fill.
    fallback = jax.checkpoint(every_position)
    fits = jnp.all(jnp.sum(weights.reshape(groups, -1) != 0, axis=-1) <= capacity)
    summed = jax.lax.cond(fits, weighted_positions, fallback, hidden, targets, weights)
    return summed / (total + 1e-9)
