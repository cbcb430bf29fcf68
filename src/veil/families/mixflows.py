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
in float32 it grows quickly past a few hundred maps (BENCHMARKS.md section 10); enable
``jax_enable_x64`` for long flows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
import functools
import math
import time
import typing
import warnings
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from veil._checks import check_key as _check_key
from veil._checks import check_positive_int as _check_positive_int
from veil.diagnostics import format_khat, khat_ok, khat_verdict, psis_khat
from veil.families.base import Family, MonteCarloMoments
from veil.families.gaussian import FullRank, MeanField
from veil.pathfinder import PathfinderResult
from veil.result import VIResult
from veil.target import Target
from veil.result import _warn_nonfinite
from veil.result import _check_chains, as_chains
from veil.result import Summary, summary_table

__all__ = ["MixFlow", "MixFlowResult", "mixflow", "laplace_cdf", "laplace_icdf"]

# Rotation of the pseudo-time per map: an irrational number, so u visits [0, 1) densely.
_U_SHIFT = math.sqrt(2.0) - 1.0
# Offsets that give every momentum coordinate its own rotation at the same u.
_COORD_SHIFT = (math.sqrt(5.0) - 1.0) / 2.0
_LOG2 = math.log(2.0)
_KHAT_DRAWS = 2000
_SUMMARY_DRAWS = 4000
DEFAULT_STEP_SIZES = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


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

    Example:
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

        Example:
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


@eqx.filter_jit
def _draws_with_weights(q: MixFlow, key, n: int):
    x, log_q = q.sample_and_log_prob(key, n)
    return jax.vmap(q.target.to_constrained)(x), jax.vmap(q.target.log_density)(x) - log_q


@eqx.filter_jit
def _constrained_draws(q: MixFlow, key, n: int):
    return jax.vmap(q.target.to_constrained)(q.sample(key, n))


# ---------------------------------------------------------------------- tuning and result
@dataclasses.dataclass(eq=False)
class MixFlowResult:
    """The outcome of :func:`mixflow`.

    Attributes:
        target: the target.
        q: the tuned :class:`MixFlow` (a veil family: draws, extended densities, objectives).
        step_sizes: the step sizes tried.
        elbos, elbo_ses: the ELBO estimate and its standard error at each.
        best: index of the chosen step size (largest ELBO estimate).
        reference_result: the ``VIResult`` of the reference fit when :func:`mixflow` fitted
            it (``None`` when a reference was given).
        wall_time: seconds for the step-size search (compilation included).
        diagnostic_key: the key the lazily computed diagnostics draw with.
    """

    target: Any
    q: MixFlow
    step_sizes: np.ndarray
    elbos: np.ndarray
    elbo_ses: np.ndarray
    best: int
    reference_result: Any
    wall_time: float
    diagnostic_key: jax.Array = dataclasses.field(repr=False)

    def __repr__(self) -> str:
        return (
            f"MixFlowResult(dim={self.q.dim}, num_maps={self.q.num_maps}, "
            f"num_leapfrog={self.q.num_leapfrog}, step_size={self.step_size:.3g}, "
            f"ELBO {self.elbo:.3f} ± {self.elbo_se:.3f})"
        )

    @property
    def step_size(self) -> float:
        return float(self.step_sizes[self.best])

    @property
    def elbo(self) -> float:
        """ELBO estimate at the chosen step size (extended space)."""
        return float(self.elbos[self.best])

    @property
    def elbo_se(self) -> float:
        return float(self.elbo_ses[self.best])

    @property
    def num_grad_evals_per_draw(self) -> int:
        """Gradient evaluations for one draw with its density."""
        return 2 * (self.q.num_maps - 1) * self.q.num_leapfrog + 1

    @functools.cached_property
    def _log_weights(self) -> np.ndarray:
        _, lw = _draws_with_weights(self.q, self.diagnostic_key, _KHAT_DRAWS)
        return np.asarray(lw, np.float64)

    @functools.cached_property
    def khat(self) -> float:
        """PSIS k-hat of the MixFlow against the (extended) target from 2000 draws."""
        lw = self._log_weights
        return psis_khat(lw) if np.isfinite(lw).all() else math.nan

    @property
    def num_nonfinite(self) -> int:
        """How many of the 2000 diagnostic draws had a non-finite log weight."""
        return int((~np.isfinite(self._log_weights)).sum())

    @functools.cached_property
    def roundtrip_error(self) -> float:
        """Median over 16 reference draws of :meth:`MixFlow.roundtrip_error`."""
        return float(np.median(self.q.roundtrip_error(jax.random.fold_in(self.diagnostic_key, 3))))

    def draws(self, n: int, *, key: jax.Array) -> dict[str, jax.Array]:
        """``n`` i.i.d. constrained draws from the MixFlow.

        Example:
            >>> import jax, jax.numpy as jnp, veil
            >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)
            >>> mf = veil.mixflow(t, veil.MeanField(2, init_scale=1.0), key=jax.random.key(0),
            ...                   num_maps=10, num_leapfrog=5, num_elbo_draws=8)
            >>> mf.draws(100, key=jax.random.key(1))["z"].shape
            (100, 2)
        """


        _check_key(key)
        draws = _constrained_draws(self.q, key, _check_positive_int("n", n))
        _warn_nonfinite(draws)  # a trajectory can leave the finite region at a large step
        return draws

    def to_arviz(self, n: int, *, key: jax.Array, chains: int = 4):
        """An ``arviz.InferenceData`` with ``n`` independent draws in ``posterior``, as
        ``chains`` chains of ``n / chains`` (see :meth:`veil.VIResult.to_arviz`)."""

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import arviz as az
        _check_chains(_check_positive_int("n", n), chains)
        draws = self.draws(n, key=key)
        return az.from_dict(posterior=as_chains(draws, chains),
                            attrs={"inference_library": "veil", "draws": "independent draws of the MixFlow"})

    def summary(self, prob: float = 0.9):
        """Mean, sd and central interval of every constrained scalar from 4000 draws, with the
        k-hat verdict, the step-size search and the round-trip error in plain words."""

        if not 0 < prob < 1:
            raise ValueError(f"prob must lie in (0, 1), got {prob}.")
        draws = self.draws(_SUMMARY_DRAWS, key=jax.random.fold_in(self.diagnostic_key, 1))
        names, table, cols = summary_table(draws, prob)
        header = (
            f"veil MixFlow: dim {self.q.dim}, {self.q.num_maps} maps x {self.q.num_leapfrog} "
            f"leapfrog steps of {self.step_size:.3g}, ELBO {self.elbo:.2f} ± {self.elbo_se:.2f}"
        )
        khat = self.khat
        ok = khat_ok(khat)
        grid = ", ".join(f"{s:g}: {e:.2f}" for s, e in zip(self.step_sizes, self.elbos))
        lines = [
            f"PSIS k-hat on the extended space = {format_khat(khat)}: {khat_verdict(khat)}",
            f"Step size chosen by ELBO over {grid}.",
        ]
        if self.step_sizes.size > 1 and self.step_size in (self.step_sizes.min(), self.step_sizes.max()):
            lines.append("The chosen step size is at the edge of the grid: widen step_sizes=.")
        err = self.roundtrip_error
        lines.append(
            f"Round-trip error of the numerical inverse: {err:.2g} (median, reference sds)"
            + ("" if err < 0.1 else ": the density is computed off the true backward path; "
               "use fewer maps or jax_enable_x64.")
        )
        if self.num_nonfinite:
            ok = False
            lines.append(f"{self.num_nonfinite} of {_KHAT_DRAWS} draws had non-finite log weights.")
        lines.append("Verdict: OK to use." if ok else "Verdict: do NOT trust these draws as they stand.")
        return Summary(names, table, cols, lines, ok, header)


def _as_reference(reference):

    if isinstance(reference, (VIResult, PathfinderResult)):
        return reference.q
    return reference


def mixflow(
    target,
    reference=None,
    *,
    key: PRNGKeyArray,
    num_maps: int = 100,
    num_leapfrog: int = 50,
    step_size: float | None = None,
    step_sizes: Sequence[float] = DEFAULT_STEP_SIZES,
    num_elbo_draws: int = 32,
) -> MixFlowResult:
    """Build a MixFlow over ``target`` and choose its step size by the ELBO.

    Args:
        target: a :class:`veil.Target`.
        reference: a fitted ``MeanField`` or ``FullRank`` (or the ``VIResult`` /
            ``PathfinderResult`` holding one); default: ``veil.fit(target, MeanField(dim))``
            with the default settings (the paper's reference is a mean-field Gaussian).
        key: a JAX PRNG key.
        num_maps: ``N``, map applications averaged (see the module docstring on choosing it).
        num_leapfrog: leapfrog steps per map. Longer trajectories between refreshments mixed
            better in our runs (Inference Gym banana: sd ratios 0.87-0.94 with 50 steps,
            0.40-0.64 with 10, both at 100 maps; BENCHMARKS.md section 10), at 5x the cost.
        step_size: use this step size (no search); default: the grid ``step_sizes``.
        step_sizes: step sizes tried, in reference standard deviations; the one with the
            largest ELBO estimate (same random reference draws for all) is kept.
        num_elbo_draws: reference trajectories per ELBO estimate.

    Returns:
        :class:`MixFlowResult` (``.q`` is the :class:`MixFlow`).

    Example:
        >>> import jax, jax.numpy as jnp, veil
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)
        >>> mf = veil.mixflow(t, veil.MeanField(2, init_scale=1.0), key=jax.random.key(0),
        ...                   num_maps=10, num_leapfrog=5, num_elbo_draws=8)
        >>> mf.q.num_maps
        10
    """
    from veil.fit import fit

    _check_key(key)
    if not isinstance(target, Target):
        raise TypeError(
            f"target must be a veil.Target, got {type(target).__name__}; build one with "
            "veil.Target.from_logdensity(fn, dim) or veil.Target.from_numpyro(model, ...)."
        )
    num_maps = _check_positive_int("num_maps", num_maps)
    num_leapfrog = _check_positive_int("num_leapfrog", num_leapfrog)
    num_elbo_draws = _check_positive_int("num_elbo_draws", num_elbo_draws)
    if num_elbo_draws < 2:
        raise ValueError("num_elbo_draws must be at least 2 (the ELBO's standard error needs two).")
    grid = [step_size] if step_size is not None else list(step_sizes)
    if not grid:
        raise ValueError("step_sizes is empty; give at least one step size.")
    for s in grid:
        if isinstance(s, bool) or not isinstance(s, (int, float, np.floating)) or not (
            math.isfinite(s) and s > 0
        ):
            raise ValueError(f"step sizes must be positive finite numbers, got {s!r}.")
    ref_key, elbo_key, diag_key = jax.random.split(key, 3)
    reference_result = None
    if reference is None:
        reference_result = fit(target, MeanField(target.dim), key=ref_key, progress=False)
        reference = reference_result.q
    reference = _as_reference(reference)
    flows = [
        MixFlow(target, reference, step_size=float(s), num_leapfrog=num_leapfrog, num_maps=num_maps)
        for s in grid
    ]
    value, grad = jax.value_and_grad(target.log_density)(reference.mean)
    if not (bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))):
        raise ValueError(
            "The log density or its gradient is not finite at the reference's mean; the map "
            "cannot start there. Fit the reference first (veil.fit) and check the model."
        )
    start = time.perf_counter()
    estimates = [f.elbo(elbo_key, num_elbo_draws) for f in flows]  # common random numbers
    wall = time.perf_counter() - start
    elbos = np.array([e[0] for e in estimates])
    ses = np.array([e[1] for e in estimates])
    if not np.isfinite(elbos).any():
        raise RuntimeError(
            "Every step size gave a non-finite ELBO estimate: the trajectories left the region "
            "where the log density is finite. Try smaller step_sizes or fewer num_leapfrog."
        )
    best = int(np.nanargmax(np.where(np.isfinite(elbos), elbos, -np.inf)))
    return MixFlowResult(
        target, flows[best], np.asarray(grid, float), elbos, ses, best, reference_result, wall, diag_key
    )
