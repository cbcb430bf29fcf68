"""Optimizer pieces optax lacks: clipping of gradient outliers against their own running scale,
and a location step in ``q``'s own whitened coordinates.

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

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

__all__ = ["clip_outliers", "ClipOutliersState", "whitened_location", "WhitenedLocationState"]


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


class WhitenedLocationState(typing.NamedTuple):
    """The wrapped optimizer's state, the number of updates seen, and the whitened location
    gradient's first moment (a vector) and second moment (one number for all coordinates);
    the last two are ``None`` for a family without a location-scale form."""

    inner: optax.OptState
    count: jax.Array
    first: jax.Array | None
    second: jax.Array | None


def _location_scale(params) -> bool:
    """Whether ``params`` is a family drawn as ``z = loc + A eps`` with ``A`` available."""
    return hasattr(params, "loc") and hasattr(params, "scale_matvec") and hasattr(params, "scale_rmatvec")


def whitened_location(
    inner: optax.GradientTransformation,
    learning_rate: float = 0.05,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    threshold: float = 5.0,
) -> optax.GradientTransformation:
    r"""Add to ``inner``'s step of a Gaussian family's location a step taken in ``q``'s
    whitened coordinates.

    For a family drawn as :math:`z = \mu + A\varepsilon` (MeanField, FullRank, LowRank: those
    with ``scale_matvec`` / ``scale_rmatvec``), the location's gradient :math:`g` seen from the
    noise is :math:`u = A^\top g`. With Adam's moments of :math:`u` but *one* second moment
    for all its coordinates (the mean of :math:`u_i^2`),

    .. math::

        m_t = b_1 m_{t-1} + (1 - b_1) u_t, \qquad
        v_t = b_2 v_{t-1} + (1 - b_2)\,\overline{u_t^2}, \qquad
        \Delta\mu_t = \Delta^{\text{inner}}\mu_t
            - \eta\, A\, \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}

    (hats: bias-corrected); each coordinate of :math:`u_t` is first clipped at ``threshold``
    times :math:`\sqrt{\hat v_{t-1}}`, as :func:`clip_outliers` does.

    Why: near a Gaussian-shaped optimum :math:`g \approx \Sigma_p^{-1}(\mu - \mu_p)`, so
    when :math:`AA^\top \approx \Sigma_p` the step :math:`A A^\top g` points at
    :math:`\mu_p` (a natural-gradient step) whatever the posterior's correlations. Adam's
    per-coordinate normalisation alone moves each coordinate separately, and where the
    posterior's coordinates move together (a hierarchical model's group effects and their
    common mean) the location then travels the correlated directions slowly: Inference Gym's
    radon fits took 2,800-13,200 steps. One shared scale keeps the whitened direction (per-coordinate
    normalisation of :math:`u` would bend it again). The whitened step moves the location by
    about :math:`\eta` of ``q``'s own standard deviations, which is slow while ``q`` is still
    much narrower than the way to go; the inner (Adam) step, which moves each coordinate by
    about its step size whatever the scale, does that part. With the sum no Inference Gym
    target tried took more steps, and the hierarchical ones took 1.6-10x fewer, at 1.1-1.2x
    the cost of a step (BENCHMARKS.md section 29). Every parameter other than the location, and families without a location-scale
    form (flows, mixtures), get ``inner``'s update unchanged.

    The update needs ``params`` (the family), as ``veil.fit``'s driver passes them.

    Args:
        inner: the optimizer for every parameter (and the location's own step).
        learning_rate: the whitened step's size, in ``q``'s standard deviations (> 0).
        b1, b2, eps: Adam's moment factors and the denominator's guard.
        threshold: clip ``u``'s coordinates at this many running root mean squares (> 0).

    Example:
        >>> import equinox as eqx, jax, jax.numpy as jnp, optax, veil
        >>> from veil.optim import whitened_location
        >>> tx = whitened_location(optax.sgd(0.0), learning_rate=0.1)   # the whitened step alone
        >>> q = veil.FullRank(2)                                         # L = 0.1 I
        >>> g = eqx.tree_at(lambda m: m.loc, jax.tree.map(jnp.zeros_like, q), jnp.array([1.0, 0.0]))
        >>> step, _ = tx.update(g, tx.init(q), q)
        >>> [round(float(x), 5) + 0.0 for x in step.loc]   # -0.1 L u / rms(u), u = L^T g = (0.1, 0)
        [-0.01414, 0.0]
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}.")
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"b1 and b2 must lie in [0, 1), got {b1!r} and {b2!r}.")
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold!r}.")

    def init_fn(params):
        state = inner.init(params)
        count = jnp.zeros([], jnp.int32)
        if not _location_scale(params):
            return WhitenedLocationState(state, count, None, None)
        u = params.scale_rmatvec(jnp.zeros_like(params.loc))
        return WhitenedLocationState(state, count, jnp.zeros_like(u), jnp.zeros([], u.dtype))

    def update_fn(updates, state, params=None):
        inner_updates, inner_state = inner.update(updates, state.inner, params)
        if state.first is None:
            return inner_updates, state._replace(inner=inner_state)
        if params is None:
            raise ValueError("whitened_location needs the parameters: call update(grads, state, params).")
        u = params.scale_rmatvec(updates.loc)
        count = state.count + 1
        seen = 1.0 - b2 ** (count - 1).astype(u.dtype)
        bound = threshold * jnp.sqrt(state.second / jnp.maximum(seen, 1e-30))
        # No scale known yet (the first step, or only zero gradients so far): nothing clipped.
        u = jnp.where(bound > 0, jnp.clip(u, -bound, bound), u)
        first = b1 * state.first + (1 - b1) * u
        second = b2 * state.second + (1 - b2) * jnp.mean(jnp.square(u))
        t = count.astype(u.dtype)
        direction = (first / (1 - b1**t)) / (jnp.sqrt(second / (1 - b2**t)) + eps)
        loc = inner_updates.loc - learning_rate * params.scale_matvec(direction)
        new = WhitenedLocationState(inner_state, count, first, second)
        return eqx.tree_at(lambda m: m.loc, inner_updates, loc), new

    return optax.GradientTransformation(init_fn, update_fn)

