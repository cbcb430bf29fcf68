"""Optimizer pieces optax lacks: clipping of gradient outliers against their own running scale.

Why it exists (BENCHMARKS.md section 26): on Inference Gym's stochastic volatility target
one draw in the tail of an early, still-wide ``q`` gives a loss of 1e5-1e6 nats and a
gradient thousands of times the usual size. Adam's second-moment estimate ``v`` takes that
square in, and with ``b2 = 0.999`` it needs ``ln(1e6) / 0.001`` ~ 14,000 steps to forget
it; meanwhile every step of the affected coordinates is that much smaller, and the fit
crawls (seeds 1 and 2 of section 25 ran to the 20,000-step cap). Clipping each coordinate
of the gradient at a few times its running root mean square keeps one draw from silencing
the optimizer, and leaves ordinary noise alone. Pyro's ``ClippedAdam`` and NumPyro's
``optim.ClippedAdam`` clip at a fixed norm, which needs a scale per problem; optax's
``clip`` / ``clip_by_global_norm`` likewise, and its ``adaptive_grad_clip`` is relative to
the parameters' norm, which for a location at zero is no scale at all. Hence this one.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
import optax

__all__ = ["clip_outliers", "ClipOutliersState"]


class ClipOutliersState(typing.NamedTuple):
    """The running mean of squared (clipped) gradients and the number of updates seen."""

    count: jax.Array
    mean_square: optax.Updates


def clip_outliers(threshold: float = 5.0, decay: float = 0.999) -> optax.GradientTransformation:
    r"""Clip each gradient coordinate at ``threshold`` times its running root mean square.

    With :math:`s_t` the bias-corrected exponential moving average (factor ``decay``) of the
    squared *clipped* gradients up to step :math:`t`,

    .. math::

        \tilde g_t = \operatorname{clip}\big(g_t,\; -c\sqrt{s_{t-1}},\; c\sqrt{s_{t-1}}\big),
        \qquad c = \text{threshold},

    and no clipping where :math:`s_{t-1} = 0` (the first step, or a coordinate whose
    gradient has been exactly zero). Feeding the clipped values into :math:`s` keeps one
    outlier from raising the threshold for the next. The bias correction divides by
    :math:`1 - \text{decay}^t`, so early on the threshold follows the few gradients seen and
    a scale that starts too small grows by a factor of up to :math:`\sqrt{1 + c^2/t}` a step.

    For roughly Gaussian gradient noise a coordinate exceeds 5 root mean squares about once
    in 1.7 million draws, so ordinary steps pass untouched; a genuine rise of the gradient
    raises the threshold by about :math:`(1-\text{decay})c^2/2` = 1.25% a step while it is
    being clipped. Chain it before the optimizer it protects
    (``optax.chain(clip_outliers(), optax.adam(0.05))``: :func:`veil.default_optimizer`).

    Args:
        threshold: clip at this many running root mean squares (> 0).
        decay: the moving average's factor, as Adam's ``b2`` (in (0, 1)).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from veil.optim import clip_outliers
        >>> tx = clip_outliers(threshold=3.0)
        >>> state = tx.init(jnp.zeros(2))
        >>> g, state = tx.update(jnp.array([1.0, -1.0]), state)   # first step: kept
        >>> g, state = tx.update(jnp.array([100.0, -0.5]), state)  # 100 is an outlier
        >>> [round(float(x), 3) for x in g]
        [3.0, -0.5]
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold!r}.")
    if not 0 < decay < 1:
        raise ValueError(f"decay must lie in (0, 1), got {decay!r}.")

    def init_fn(params):
        return ClipOutliersState(
            count=jnp.zeros([], jnp.int32),
            mean_square=jax.tree.map(jnp.zeros_like, params),
        )

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        # Bias correction of the average so far (steps 1..count-1); at count = 1 nothing is
        # known and the average is 0, so nothing is clipped.
        seen = 1.0 - decay ** (count - 1).astype(jnp.float32)
        correction = jnp.where(count > 1, 1.0 / jnp.maximum(seen, 1e-30), 0.0)

        def clip(g, ms):
            bound = threshold * jnp.sqrt(ms * correction).astype(g.dtype)
            return jnp.where(bound > 0, jnp.clip(g, -bound, bound), g)

        clipped = jax.tree.map(clip, updates, state.mean_square)
        mean_square = jax.tree.map(lambda ms, g: decay * ms + (1 - decay) * jnp.square(g), state.mean_square, clipped)
        return clipped, ClipOutliersState(count=count, mean_square=mean_square)

    return optax.GradientTransformation(init_fn, update_fn)
