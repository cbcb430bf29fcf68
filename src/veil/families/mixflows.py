"""MixFlows: mixed variational flows (Xu, Chen & Campbell 2023, "MixFlows: principled
variational inference via mixed flows").

A MixFlow is the average of a reference distribution pushed through ``0, 1, ..., N-1``
applications of one map ``T``:

    q_N = (1/N) sum_{n=0}^{N-1} T^n_# q_0.

When ``T`` preserves the target (extended as below) and is ergodic, ``q_N`` converges to it
as ``N`` grows, like an MCMC chain's running average, yet ``q_N`` has i.i.d. draws (pick
``n`` uniformly, push a reference draw ``n`` times) and an exact density by the change of
variables along the *backward* trajectory:

    q_N(z) = (1/N) sum_n q_0(T^{-n} z) |det J_{T^{-n}}(z)|.

**The map** works on an extended space ``(y, rho, u)``: position ``y`` (the target's
unconstrained coordinates whitened by a fitted Gaussian reference, ``x = mu + L y``), a
momentum ``rho`` with i.i.d. standard Laplace coordinates and a pseudo-time ``u`` in
``[0, 1)``; the extended target is ``pi(y) m(rho) 1[0 <= u < 1]``. One application of ``T`` is

1. ``num_leapfrog`` leapfrog steps of size ``step_size`` for ``H = -log pi(y) + sum|rho_i|``
   (Laplace kinetic energy: positions move by ``step_size * sign(rho)``). *Uncorrected*: no
   Metropolis test, so ``T`` preserves volume exactly but the target only approximately;
2. deterministic momentum refreshment: each ``rho_i`` goes to the uniform scale through the
   Laplace CDF ``F``, is rotated there by a shift ``s_i(y, u)`` and comes back,
   ``rho_i <- F^{-1}((F(rho_i) + s_i(y, u)) mod 1)``. For fixed ``(y, u)`` this maps the
   Laplace law to itself, and its log-Jacobian is ``sum_i |rho'_i| - |rho_i|``;
3. ``u <- (u + xi) mod 1`` with an irrational ``xi`` (an ergodic rotation of the circle).

Each step is invertible in closed form (leapfrog with ``-step_size``, the opposite shift, the
opposite rotation), so the density above costs ``N - 1`` inverse maps, ``O(N)``. The reference
``q_0`` is ``N(0, I)`` in ``y`` (the fitted Gaussian), Laplace in ``rho``, uniform in ``u``.

**ELBO.** On the extended space, ``E_{q_N}[log pi(y) + log m(rho) - log q_N(y, rho, u)]`` is a
lower bound on ``log Z`` (the auxiliary variables only loosen it). The paper's unbiased estimator
draws ``z_0 ~ q_0``, computes its trajectory ``z_j = T^j z_0`` for ``j = -(N-1), ..., N-1``
once (``2N - 2`` maps) and averages ``log pi_bar(z_n) - log q_N(z_n)`` over ``n = 0..N-1``:
every ``q_N(z_n)`` is a window of ``N`` consecutive terms of the same trajectory,

    q_N(z_n) = (1/N) sum_{k=0}^{N-1} q_0(z_{n-k}) exp(L_{n-k} - L_n),

with ``L_j = log |det dz_j / dz_0|`` accumulated along the way. As a veil family, a MixFlow's
``sample_and_log_prob`` returns positions with ``log q_N(y, rho, u) - log m(rho)`` (plus the
whitening Jacobian), so ``log p(x) - log q`` is exactly the extended log weight: every veil
objective, k-hat and evidence estimate then works on the extended space, where the weights are
exact. The marginal density of ``x`` alone has no closed form (``log_prob`` says so).

**Choosing the settings.** Only ``step_size``, ``num_leapfrog`` and ``num_maps`` are free;
nothing is trained. :func:`mixflow` picks ``step_size`` on a grid by the ELBO estimate (common
random numbers across the grid); ``num_leapfrog * step_size`` is the distance a coordinate
travels between refreshments, in reference standard deviations. The ELBO rises with
``num_maps`` while the averaged chain still mixes, then flattens; double ``num_maps`` until it
rises by less than its standard error. Cost: a draw with its density costs
``2 (N-1) num_leapfrog`` gradient evaluations, a draw alone ``(N-1) num_leapfrog``.

**Numerical error.** The maps are chaotic, so floating-point error grows along a trajectory
and ``T^{-n}`` computed numerically is not exactly the inverse of ``T^n`` (the paper bounds
the effect; its density and ELBO stay usable long after exact invertibility is lost).
:meth:`MixFlow.roundtrip_error` measures how far ``T^{-(N-1)} T^{N-1}`` lands from the start;
in float32 it grows quickly past a few hundred maps (docs/benchmarks/mixflows.md); enable
``jax_enable_x64`` for long flows.
"""

from __future__ import annotations

import math
import typing
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from veil._checks import check_positive_int as _check_positive_int
from veil.family import Family, MonteCarloMoments
from veil.families.gaussian import FullRank, MeanField
from veil.target import Target

__all__ = ["MixFlow", "laplace_cdf", "laplace_icdf"]

# Rotation of the pseudo-time per map: an irrational number, so u visits [0, 1) densely.
_U_SHIFT = math.sqrt(2.0) - 1.0
# Offsets that give every momentum coordinate its own rotation at the same u.
_COORD_SHIFT = (math.sqrt(5.0) - 1.0) / 2.0
_LOG2 = math.log(2.0)


# ---------------------------------------------------------------------- Laplace momentum
def laplace_cdf(r):
    """CDF of the standard Laplace law: ``e^r / 2`` below 0, ``1 - e^{-r} / 2`` above, each
    branch evaluated where it does not cancel."""
    return jnp.where(r < 0, 0.5 * jnp.exp(jnp.minimum(r, 0.0)), 1.0 - 0.5 * jnp.exp(-jnp.maximum(r, 0.0)))


def laplace_icdf(p):
    """Inverse of :func:`laplace_cdf` on ``(0, 1)``: ``log 2p`` below 1/2 (exact for tiny
    ``p``, where ``log1p(-2|p - 1/2|)`` would round ``p - 1/2`` to ``-1/2``), ``-log 2(1-p)``
    above."""
    low = jnp.log(2.0 * jnp.minimum(p, 0.5))
    high = -jnp.log(2.0 * jnp.minimum(1.0 - p, 0.5))
    return jnp.where(p < 0.5, low, high)


def _laplace_logpdf(r):
    return -jnp.sum(jnp.abs(r), axis=-1) - r.shape[-1] * _LOG2


def _std_normal_logpdf(y):
    return -0.5 * jnp.sum(y**2, axis=-1) - 0.5 * y.shape[-1] * math.log(2 * math.pi)


class _State(typing.NamedTuple):
    """A point of the extended space, with the log density and gradient at its position
    (carried so each map costs ``num_leapfrog`` gradient evaluations, not one more)."""

    y: jax.Array
    rho: jax.Array
    u: jax.Array
    log_p: jax.Array
    grad: jax.Array


class MixFlow(MonteCarloMoments, Family):
    """A mixed variational flow over a target (see the module docstring for the maths).

    Args:
        target: the :class:`veil.Target` whose gradient drives the map.
        reference: a fitted ``MeanField`` or ``FullRank`` (the reference's position law and
            the whitening of the coordinates the map works in).
        step_size: leapfrog step in whitened units (reference standard deviations).
        num_leapfrog: leapfrog steps per map.
        num_maps: ``N``, the number of map applications averaged.

    Nothing in a MixFlow is trained by ``veil.fit``; build and tune one with :func:`mixflow`.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)
        >>> q = veil.MixFlow(t, veil.MeanField(2, init_scale=1.0), step_size=0.2, num_leapfrog=2,
        ...                  num_maps=3)
        >>> z, lq = q.sample_and_log_prob(jax.random.key(0), 5)
        >>> z.shape, lq.shape
        ((5, 2), (5,))
    """

    target: Any
    reference: Family
    step_size: jax.Array
    num_leapfrog: int = eqx.field(static=True)
    num_maps: int = eqx.field(static=True)
    dim: int = eqx.field(static=True)
    reparameterized: ClassVar[bool] = False
    moment_draws: ClassVar[int] = 4000  # each draw costs (num_maps - 1) num_leapfrog gradients

    def __init__(self, target, reference: Family, *, step_size: float, num_leapfrog: int = 10, num_maps: int = 100):

        if not isinstance(target, Target):
            raise TypeError(f"target must be a veil.Target, got {type(target).__name__}.")
        if not isinstance(reference, (MeanField, FullRank)):
            raise TypeError(
                "reference must be a fitted veil.MeanField or veil.FullRank (the map works in "
                f"its whitened coordinates), got {type(reference).__name__}; fit one with "
                "veil.fit(target, veil.MeanField(dim), key=...) and pass res.q."
            )
        if reference.dim != target.dim:
            raise ValueError(f"reference has dim={reference.dim} but the target has dim={target.dim}.")
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not (
            math.isfinite(step_size) and step_size > 0
        ):
            raise ValueError(f"step_size must be a positive finite number, got {step_size!r}.")
        self.target = target
        self.reference = reference
        self.step_size = jnp.asarray(step_size, dtype=float)
        self.num_leapfrog = _check_positive_int("num_leapfrog", num_leapfrog)
        self.num_maps = _check_positive_int("num_maps", num_maps)
        self.dim = target.dim

    # ------------------------------------------------------------------ coordinates
    def check_fittable(self) -> None:
        raise TypeError(
            "A MixFlow has nothing to train by gradient (its map is fixed by the target and "
            "its step size); build and tune it with veil.mixflow(target, reference, key=...)."
        )

    def _to_x(self, y):
        return self.reference.transform_and_log_prob(y[None])[0][0]

    def _log_det(self):
        """``log |det dx/dy|`` of the whitening (constant: the reference is affine)."""
        zero = jnp.zeros((1, self.dim))
        return _std_normal_logpdf(zero)[0] - self.reference.transform_and_log_prob(zero)[1][0]

    def _value_and_grad(self, y):
        return jax.value_and_grad(lambda v: self.target.log_density(self._to_x(v)))(y)

    def _start(self, y, rho, u) -> _State:
        log_p, grad = self._value_and_grad(y)
        return _State(y, rho, u, log_p, grad)

    # ------------------------------------------------------------------ the map and its inverse
    def _leapfrog(self, s: _State, eps) -> _State:
        def step(c, _):
            y, rho, log_p, g = c
            rho = rho + 0.5 * eps * g
            y = y + eps * jnp.sign(rho)  # d/d rho of the Laplace kinetic energy sum |rho|
            log_p, g = self._value_and_grad(y)
            rho = rho + 0.5 * eps * g
            return (y, rho, log_p, g), None

        (y, rho, log_p, g), _ = jax.lax.scan(step, (s.y, s.rho, s.log_p, s.grad), None, self.num_leapfrog)
        return _State(y, rho, s.u, log_p, g)

    def _refresh(self, y, rho, u, direction: float):
        """``rho -> F^{-1}((F(rho) +/- s(y, u)) mod 1)`` and its log-Jacobian."""
        shift = u + _COORD_SHIFT * jnp.arange(1, self.dim + 1) + 0.5 * jnp.sin(y)
        p = jnp.mod(laplace_cdf(rho) + direction * shift, 1.0)
        # p rounds to exactly 0 about once in 1e7 coordinate updates in float32, and would give
        # rho = -inf; clip to the spacing of floats just below 1, the natural float32 range.
        edge = jnp.finfo(p.dtype).epsneg
        p = jnp.clip(p, edge, 1.0 - edge)
        new = laplace_icdf(p)
        return new, jnp.sum(jnp.abs(new) - jnp.abs(rho))

    def forward(self, s: _State) -> tuple[_State, jax.Array]:
        """``T`` at one extended point, and ``log |det J_T|`` there."""
        s = self._leapfrog(s, self.step_size)
        rho, log_jac = self._refresh(s.y, s.rho, s.u, 1.0)
        return s._replace(rho=rho, u=jnp.mod(s.u + _U_SHIFT, 1.0)), log_jac

    def backward(self, s: _State) -> tuple[_State, jax.Array]:
        """``T^{-1}`` at one extended point, and ``log |det J_{T^{-1}}|`` there."""
        u = jnp.mod(s.u - _U_SHIFT, 1.0)
        rho, log_jac = self._refresh(s.y, s.rho, u, -1.0)
        return self._leapfrog(s._replace(rho=rho, u=u), -self.step_size), log_jac

    # ------------------------------------------------------------------ trajectories
    def _log_q0(self, s: _State):
        return _std_normal_logpdf(s.y) + _laplace_logpdf(s.rho)

    def _reference_state(self, key) -> _State:
        ky, kr, ku = jax.random.split(key, 3)
        y = jax.random.normal(ky, (self.dim,))
        rho = jax.random.laplace(kr, (self.dim,))
        return self._start(y, rho, jax.random.uniform(ku))

    def _trajectory(self, s0: _State, pick):
        """From ``z_0``: the extended point ``z_pick`` and, for ``j = -(N-1)..N-1``,
        ``A_j = log q_0(z_j) + L_j``; ``L_j`` and ``log pi_bar(z_j)`` for ``j = 0..N-1``."""
        n_maps = self.num_maps

        def fwd(c, j):
            s, lj, chosen = c
            s, step_jac = self.forward(s)
            lj = lj + step_jac
            chosen = jax.tree.map(lambda a, b: jnp.where(j == pick, a, b), s, chosen)
            return (s, lj, chosen), (self._log_q0(s) + lj, lj, s.log_p + _laplace_logpdf(s.rho))

        def bwd(c, _):
            s, lj = c
            s, step_jac = self.backward(s)
            lj = lj + step_jac
            return (s, lj), self._log_q0(s) + lj

        zero = jnp.zeros(())
        js = jnp.arange(1, n_maps)
        (_, _, chosen), (a_fwd, l_fwd, lp_fwd) = jax.lax.scan(fwd, (s0, zero, s0), js)
        _, a_bwd = jax.lax.scan(bwd, (s0, zero), None, n_maps - 1)
        a0 = self._log_q0(s0)
        a_ext = jnp.concatenate([a_bwd[::-1], a0[None], a_fwd])  # index j + N - 1
        l_pos = jnp.concatenate([zero[None], l_fwd])
        lp_pos = jnp.concatenate([(s0.log_p + _laplace_logpdf(s0.rho))[None], lp_fwd])
        return chosen, a_ext, l_pos, lp_pos

    def _log_qn_window(self, a_ext, l_pos, n):
        """``log q_N(z_n)`` from the trajectory's terms."""
        window = jax.lax.dynamic_slice(a_ext, (n,), (self.num_maps,))
        return jax.nn.logsumexp(window) - l_pos[n] - math.log(self.num_maps)

    def _elbo_one(self, key):
        """One reference trajectory's ELBO estimate (extended space, whitened coordinates)."""
        s0 = self._reference_state(key)
        _, a_ext, l_pos, lp_pos = self._trajectory(s0, jnp.asarray(-1))
        n_maps = self.num_maps

        def add(k, acc):  # windows for every n at once, one lag k at a time: O(N) memory
            return jnp.logaddexp(acc, jax.lax.dynamic_slice(a_ext, (n_maps - 1 - k,), (n_maps,)))

        windows = jax.lax.fori_loop(0, n_maps, add, jnp.full((n_maps,), -jnp.inf))
        log_qn = windows - l_pos - math.log(n_maps)
        return jnp.mean(lp_pos + self._log_det() - log_qn)

    # ------------------------------------------------------------------ the Family interface
    def sample_and_log_prob(self, key, n):
        """``n`` i.i.d. draws of ``x`` with ``log q_N(x, rho, u) - log m(rho)`` (see the module
        docstring: ``log p(x)`` minus this is the exact extended log importance weight)."""
        kn, kz = jax.random.split(key)
        picks = jax.random.randint(kn, (n,), 0, self.num_maps)

        def one(k, pick):
            s0 = self._reference_state(k)
            chosen, a_ext, l_pos, _ = self._trajectory(s0, pick)
            log_qn = self._log_qn_window(a_ext, l_pos, pick)
            return self._to_x(chosen.y), log_qn - self._log_det() - _laplace_logpdf(chosen.rho)

        return jax.vmap(one)(jax.random.split(kz, n), picks)

    def sample(self, key, n):
        """``n`` i.i.d. draws of ``x`` (forward maps only: half the cost of a draw with its
        density)."""
        kn, kz = jax.random.split(key)
        picks = jax.random.randint(kn, (n,), 0, self.num_maps)

        def one(k, pick):
            s = self._reference_state(k)

            def body(j, s):
                moved = self.forward(s)[0]
                return jax.tree.map(lambda a, b: jnp.where(j < pick, a, b), moved, s)

            return self._to_x(jax.lax.fori_loop(0, self.num_maps - 1, body, s).y)

        return jax.vmap(one)(jax.random.split(kz, n), picks)

    def log_prob(self, z):
        raise NotImplementedError(
            "A MixFlow's density lives on the extended space (position, momentum, pseudo-time); "
            "the marginal density of the position alone has no closed form. Use "
            "log_prob_extended(x, rho, u), or sample_and_log_prob, whose values give exact "
            "importance weights on the extended space."
        )

    def log_prob_extended(self, x, rho, u):
        """``log q_N(x, rho, u)`` at one extended point (``x`` in the target's coordinates),
        by the backward trajectory: ``N - 1`` inverse maps.

        Examples:
            >>> import jax, jax.numpy as jnp, veil
            >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=1)
            >>> q = veil.MixFlow(t, veil.MeanField(1, init_scale=1.0), step_size=0.1, num_maps=5)
            >>> bool(jnp.isfinite(q.log_prob_extended(jnp.zeros(1), jnp.ones(1), 0.3)))
            True
        """
        y = self.reference.whiten(jnp.asarray(x, float)[None])[0]
        s0 = self._start(y, jnp.asarray(rho, float), jnp.asarray(u, float))

        def bwd(c, _):
            s, lj = c
            s, step_jac = self.backward(s)
            lj = lj + step_jac
            return (s, lj), self._log_q0(s) + lj

        _, a = jax.lax.scan(bwd, (s0, jnp.zeros(())), None, self.num_maps - 1)
        terms = jnp.concatenate([self._log_q0(s0)[None], a])
        return jax.nn.logsumexp(terms) - math.log(self.num_maps) - self._log_det()

    def watched(self):
        return eqx.filter(self.reference, eqx.is_inexact_array)

    # ------------------------------------------------------------------ estimates and checks
    def elbo(self, key: PRNGKeyArray, num_draws: int = 32) -> tuple[float, float]:
        """The paper's unbiased ELBO estimate on the extended space from ``num_draws``
        reference trajectories (each averaging its ``N`` points), and its standard error.
        ``2 (N-1) num_leapfrog`` gradient evaluations per trajectory."""
        per = np.asarray(_elbo_draws(self, key, int(num_draws)), np.float64)
        return float(np.mean(per)), float(np.std(per, ddof=1) / math.sqrt(per.size))

    def roundtrip_error(self, key: PRNGKeyArray, num_draws: int = 16) -> np.ndarray:
        """Per reference draw, the largest absolute difference between ``z_0`` and
        ``T^{-(N-1)}(T^{N-1}(z_0))`` computed in floating point (position in reference
        standard deviations, momentum, pseudo-time): how far the numerical inverse has
        drifted. Much below 1 means the density is computed along (close to) the true
        backward trajectory."""
        return np.asarray(_roundtrip(self, key, int(num_draws)))


@eqx.filter_jit
def _elbo_draws(q: MixFlow, key, n: int):
    return jax.vmap(q._elbo_one)(jax.random.split(key, n))


@eqx.filter_jit
def _roundtrip(q: MixFlow, key, n: int):
    def one(k):
        s0 = q._reference_state(k)
        s = jax.lax.fori_loop(0, q.num_maps - 1, lambda _, s: q.forward(s)[0], s0)
        s = jax.lax.fori_loop(0, q.num_maps - 1, lambda _, s: q.backward(s)[0], s)
        err = jnp.concatenate([jnp.abs(s.y - s0.y), jnp.abs(s.rho - s0.rho), jnp.abs(s.u - s0.u)[None]])
        return jnp.max(err)

    return jax.vmap(one)(jax.random.split(key, n))
