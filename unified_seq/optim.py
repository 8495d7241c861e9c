"""Optimizer and learning-rate schedule (official recipe, DESIGN §4).

AdamW (β1 0.9, β2 0.95, ε 1e-8, decoupled weight decay) with a linear warm-up
to the peak rate and a linear decay to `end_factor` × peak, optionally after
clipping the global gradient norm.
"""

from __future__ import annotations

from typing import Any

import optax


def schedule(config: Any, total_steps: int) -> optax.Schedule:
    """Linear warm-up for `warmup_steps`, then linear decay to `end_factor` × peak.

    Args:
      config: `config.optim` with learning_rate, warmup_steps, end_factor.
      total_steps: last training step.
    """
    peak = float(config.learning_rate)
    warmup = min(int(config.warmup_steps), max(total_steps - 1, 0))
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak, max(warmup, 1)),
            optax.linear_schedule(
                peak, peak * float(config.end_factor), max(total_steps - warmup, 1)
            ),
        ],
        [warmup],
    )


def make_optimizer(config: Any, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the schedule above and optional gradient clipping."""
    parts = []
    if config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(float(config.grad_clip_norm)))
    parts.append(
        optax.adamw(
            schedule(config, total_steps),
            b1=float(config.b1),
            b2=float(config.b2),
            eps=float(config.eps),
            weight_decay=float(config.weight_decay),
        )
    )
    return optax.chain(*parts)
