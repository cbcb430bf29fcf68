"""Optimizer pieces optax lacks: clipping of gradient outliers against their own running scale,
and a location step and a FullRank factor step in ``q``'s own whitened coordinates.

Why it exists (docs/benchmarks/gradient-outliers-clipping.md): on Inference Gym's stochastic volatility target
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

import math
import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from veil._config import cheap_branches
from veil.family import FactorSteps, LocationScale

__all__ = [
    "clip_outliers",
    "ClipOutliersState",
    "whitened_location",
    "WhitenedLocationState",
    "whitened_factor",
    "WhitenedFactorState",
]


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

    Examples:
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
    return isinstance(params, LocationScale)


def _check_settings(learning_rate, b1, b2, threshold) -> None:
    """The checks every whitened step's settings share."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}.")
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"b1 and b2 must lie in [0, 1), got {b1!r} and {b2!r}.")
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold!r}.")


def _shared_scale_step(u, first, second, t, *, b1, b2, eps, threshold, mean_square):
    """Adam's moments of ``u`` with one second moment, fed by ``mean_square(u)``; ``u`` is
    first clipped at ``threshold`` running root mean squares (not while no scale is known:
    the first update, or only zero gradients so far). ``t`` counts the updates, this one
    included. Returns the new moments and the bias-corrected direction."""
    seen = 1.0 - b2 ** (t - 1).astype(u.dtype)
    bound = threshold * jnp.sqrt(second / jnp.maximum(seen, 1e-30))
    u = jnp.where(bound > 0, jnp.clip(u, -bound, bound), u)
    first = b1 * first + (1 - b1) * u
    second = b2 * second + (1 - b2) * mean_square(u)
    t = t.astype(u.dtype)
    return first, second, (first / (1 - b1**t)) / (jnp.sqrt(second / (1 - b2**t)) + eps)


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
    the cost of a step (docs/benchmarks/whitened-location-step.md). Every parameter other than the
    location, and families without a location-scale
    form (flows, mixtures), get ``inner``'s update unchanged.

    The update needs ``params`` (the family), as ``veil.fit``'s driver passes them.

    Args:
        inner: the optimizer for every parameter (and the location's own step).
        learning_rate: the whitened step's size, in ``q``'s standard deviations (> 0).
        b1, b2, eps: Adam's moment factors and the denominator's guard.
        threshold: clip ``u``'s coordinates at this many running root mean squares (> 0).

    Examples:
        >>> import equinox as eqx, jax, jax.numpy as jnp, optax, veil
        >>> from veil.optim import whitened_location
        >>> tx = whitened_location(optax.sgd(0.0), learning_rate=0.1)   # the whitened step alone
        >>> q = veil.FullRank(2)                                         # L = 0.1 I
        >>> g = eqx.tree_at(lambda m: m.loc, jax.tree.map(jnp.zeros_like, q), jnp.array([1.0, 0.0]))
        >>> step, _ = tx.update(g, tx.init(q), q)
        >>> [round(float(x), 5) + 0.0 for x in step.loc]   # -0.1 L u / rms(u), u = L^T g = (0.1, 0)
        [-0.01414, 0.0]
    """
    _check_settings(learning_rate, b1, b2, threshold)

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
        count = state.count + 1
        first, second, direction = _shared_scale_step(
            params.scale_rmatvec(updates.loc), state.first, state.second, count,
            b1=b1, b2=b2, eps=eps, threshold=threshold, mean_square=lambda u: jnp.mean(jnp.square(u)))
        loc = inner_updates.loc - learning_rate * params.scale_matvec(direction)
        new = WhitenedLocationState(inner_state, count, first, second)
        return eqx.tree_at(lambda m: m.loc, inner_updates, loc), new

    return optax.GradientTransformation(init_fn, update_fn)


class WhitenedFactorState(typing.NamedTuple):
    """The wrapped optimizer's state, the number of updates seen, the factor's gradients
    summed since the last factor step (``log_scale``'s and ``unit_tril``'s), and the whitened
    factor gradient's first moment (a lower-triangular matrix) and second moment (one
    number); the last three are ``None`` for a family without a whitened factor step."""

    inner: optax.OptState
    count: jax.Array
    pending: typing.Any
    first: jax.Array | None
    second: jax.Array | None


def _has_factor(params) -> bool:
    """Whether ``params`` is a family with a whitened factor step (``FullRank``)."""
    return isinstance(params, FactorSteps)


def factor_step_interval(dim: int) -> int:
    """Steps between two whitened factor steps by default: ``1 + dim // 16``.

    A factor step costs two ``dim x dim x dim`` products; one every ``1 + dim // 16`` steps
    keeps their cost, spread over the steps, at about ``32 dim^2`` multiply-adds a step, a
    few matrix-vector products: 1 step at dim 10, 7 at dim 97 (about 13 us of a 190-240 us
    step on radon; docs/benchmarks/whitened-factor-step.md), 32 at dim 501."""
    return 1 + int(dim) // 16


def whitened_factor(
    inner: optax.GradientTransformation,
    learning_rate: float = 0.1,
    *,
    every: int | None = None,
    max_dim: int | None = 128,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    threshold: float = 5.0,
) -> optax.GradientTransformation:
    r"""Add to ``inner``'s step of a ``FullRank`` factor a step taken in ``q``'s whitened
    coordinates, every ``every`` steps.

    A move ``L -> L (I + M)`` of the Cholesky factor, ``M`` lower triangular, changes the
    covariance relative to itself: near a Gaussian-shaped optimum the factor's gradient is
    :math:`-(L^\top \Sigma_p^{-1} L - I)` in ``M`` (up to the triangle), a discrepancy in
    whitened units whatever the posterior's scales and correlations. Adam's step, taken per
    parameter, sees the same discrepancy through the factor's scales, and after the stopping
    rule's halvings its final stage spends thousands of steps on the covariance (radon: the
    covariance's share of KL(q || q*) fell by about 15% per 400 steps, the location's was
    already 0.004 nats; docs/benchmarks/whitened-factor-step.md).

    Every ``k = every`` steps, with :math:`\bar g` the mean gradient of ``log_scale`` and
    ``unit_tril`` over those steps, :math:`u = J^\top \bar g` the gradient in ``M``
    (:meth:`FullRank.factor_rmatvec`), each entry clipped at ``threshold`` running root mean
    squares, and Adam's moments of :math:`u` with *one* second moment for all entries,

    .. math::

        m_j = b_1 m_{j-1} + (1 - b_1) u_j, \qquad
        v_j = b_2 v_{j-1} + (1 - b_2)\,\overline{u_j^2}, \qquad
        M_j = -\frac{\eta}{\sqrt{d}}\, \frac{\hat m_j}{\sqrt{\hat v_j} + \epsilon},

    and the parameter change :math:`J M_j` (:meth:`FullRank.factor_matvec`) is added to
    ``inner``'s update (:math:`1/\sqrt{d}`: the same scaling as ``FullRank``'s own
    off-diagonal parameters). Between factor steps the gradients are summed, not lost (the
    step from the last gradient alone took 1.2-1.4x the steps on radon, stochastic volatility
    and the ill-conditioned Gaussian).
    Each factor step costs two ``d x d x d`` products; ``every=None`` takes
    :func:`factor_step_interval` of the family's dimension. Families without these
    methods (MeanField, whose ``log_scale`` is already in whitened units; LowRank; flows),
    and by default those of more than 128 dimensions, get ``inner``'s update unchanged.

    Measured (docs/benchmarks/whitened-factor-step.md, default fits, 3 seeds): the ill-conditioned
    100-d Gaussian converged in 3,200-3,600 steps instead of running to the 20,000-step cap
    (ELBO -0.10 against -1.92); Brownian motion (30-d) 3,200 steps in all against 9,600,
    German credit 2,400 against 4,000; radon the same steps at a higher ELBO (-2585.94
    against -2586.58) and half the mean error. On the 501-d item-response model it doubled
    the steps (10,000 -> 21,600; a factor step every 8 steps, or a 4x smaller one, did not
    help): the noise of a 125,000-entry factor's gradient then drives the shared-scale step,
    hence ``max_dim``.

    It follows the idea of natural-gradient updates of a Cholesky factor (Lin, Nielsen,
    Khan & Schmidt 2021, "Tractable structured natural-gradient descent using local
    parameterizations"; Tan 2021): a step in local, whitened coordinates of the factor; the
    moments and the shared scale are Adam's, as in :func:`whitened_location`.

    Args:
        inner: the optimizer for every parameter (and the factor's own step).
        learning_rate: the factor step's size (> 0), in whitened units times ``sqrt(d)``.
        every: steps between factor steps (>= 1), or ``None`` for
            :func:`factor_step_interval`.
        max_dim: families of more dimensions than this get ``inner``'s update alone
            (``None``: no limit).
        b1, b2, eps: Adam's moment factors and the denominator's guard.
        threshold: clip ``u``'s entries at this many running root mean squares (> 0).

    Examples:
        >>> import equinox as eqx, jax, jax.numpy as jnp, optax, veil
        >>> from veil.optim import whitened_factor
        >>> tx = whitened_factor(optax.sgd(0.0), learning_rate=0.1, every=1)  # the factor step alone
        >>> q = veil.FullRank(2)
        >>> g = eqx.tree_at(lambda m: m.log_scale, jax.tree.map(jnp.zeros_like, q), jnp.array([1.0, 0.0]))
        >>> step, _ = tx.update(g, tx.init(q), q)
        >>> [round(float(x), 4) + 0.0 for x in step.log_scale]  # u = diag(1, 0): rms 1/sqrt(3)
        [-0.1225, 0.0]
    """
    _check_settings(learning_rate, b1, b2, threshold)
    if every is not None and not (isinstance(every, int) and every >= 1):
        raise ValueError(f"every must be a positive integer or None, got {every!r}.")
    if max_dim is not None and not max_dim >= 1:
        raise ValueError(f"max_dim must be a positive integer or None, got {max_dim!r}.")

    def init_fn(params):
        state = inner.init(params)
        count = jnp.zeros([], jnp.int32)
        if not _has_factor(params) or (max_dim is not None and params.dim > max_dim):
            return WhitenedFactorState(state, count, None, None, None)
        pending = (jnp.zeros_like(params.log_scale), jnp.zeros_like(params.unit_tril))
        u = jnp.zeros((params.dim, params.dim), params.loc.dtype)
        return WhitenedFactorState(state, count, pending, u, jnp.zeros([], u.dtype))

    def update_fn(updates, state, params=None):
        inner_updates, inner_state = inner.update(updates, state.inner, params)
        if state.first is None:
            return inner_updates, state._replace(inner=inner_state)
        if params is None:
            raise ValueError("whitened_factor needs the parameters: call update(grads, state, params).")
        k = factor_step_interval(params.dim) if every is None else every
        count = state.count + 1
        pending = (state.pending[0] + updates.log_scale, state.pending[1] + updates.unit_tril)
        nlow = params.dim * (params.dim + 1) / 2

        def factor_step(operands):
            (p_log_scale, p_unit), first, second, log_scale, unit_tril = operands
            grads = eqx.tree_at(lambda q: (q.log_scale, q.unit_tril), updates, (p_log_scale / k, p_unit / k))
            first, second, direction = _shared_scale_step(
                params.factor_rmatvec(grads), first, second, count // k,
                b1=b1, b2=b2, eps=eps, threshold=threshold, mean_square=lambda u: jnp.sum(jnp.square(u)) / nlow)
            step = params.factor_matvec(-learning_rate / math.sqrt(params.dim) * direction)
            restart = (jnp.zeros_like(p_log_scale), jnp.zeros_like(p_unit))
            return restart, first, second, log_scale + step.log_scale, unit_tril + step.unit_tril

        operands = (pending, state.first, state.second, inner_updates.log_scale, inner_updates.unit_tril)
        due = count % k == 0
        if k == 1:
            out = factor_step(operands)
        elif cheap_branches():
            # Everything the factor step changes goes through the branch, and the waiting
            # branch hands its operands back, so between factor steps nothing is selected or
            # zeroed (whole default fits on radon 1.00-1.10x faster than selecting each output
            # after the branch, in four measurements; docs/benchmarks/draws-without-rolled-threefry.md).
            out = jax.lax.cond(due, factor_step, lambda operands: operands, operands)
        else:
            # On a GPU a branch costs a round trip to the host: compute at every step, then select.
            out = jax.tree.map(lambda a, b: jnp.where(due, a, b), factor_step(operands), operands)
        pending, first, second, log_scale, unit_tril = out
        new = WhitenedFactorState(inner_state, count, pending, first, second)
        return eqx.tree_at(lambda q: (q.log_scale, q.unit_tril), inner_updates, (log_scale, unit_tril)), new

    return optax.GradientTransformation(init_fn, update_fn)
