"""Particle methods: a set of points moved together until they stand for the target.

A particle method keeps ``n`` points ``x_1..x_n`` in the target's unconstrained space and moves
them along a direction ``phi(x_i)`` that decreases ``KL(q || p)`` for ``q`` their empirical
distribution. No family is fitted; the particles are the answer.

Two ways in, sharing one update:

- ``state = method.init(key, target, n_particles)``, then ``state, info = method.step(key,
  state)`` in a loop of your own (the BlackJAX shape);
- :func:`run` (``veil.particles.run(target, method, key=..., n_particles=...)``), which runs
  the same update in veil's compiled, chunked driver (:mod:`veil.driver`: progress bar,
  stopping rule, non-finite steps skipped and counted, checkpoints, minibatched targets)
  and returns a :class:`ParticleResult`.

Inside the driver a method is a loss whose value ``r`` is reported (the trace) and whose
"gradient" is ``-phi``, handed over as such (the loss's ``value_and_grad``: nothing is
differentiated); the method's optax transformation turns ``-phi`` into the move, exactly as
in :meth:`ParticleMethod.step`.
"""

from __future__ import annotations

import abc
import collections.abc
import dataclasses
import functools
import math
import typing
import warnings
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from veil._checks import check_positive as _check_positive
from veil._checks import check_key as _check_key
from veil._checks import check_positive_int as _check_positive_int
from veil import driver
from veil._config import cheap_branches
from veil.checkpoint import Checkpoint
from veil.diagnostics import StopRule, kernel_stein_discrepancy
from veil.families.empirical import Empirical
from veil.kernels import RBF, Kernel, _sq_dists
from veil.mirror import MirrorMap
from veil.result import VIResult, _flat_columns, _warn_nonfinite
from veil.target import Target, log_density_rows
from veil.families.base import Family
from veil.families.mixture import Mixture
from veil.objectives import Objective

__all__ = [
    "ParticleMethod",
    "ParticleState",
    "StepInfo",
    "SVGD",
    "CoinSVGD",
    "MirroredSVGD",
    "SVMD",
    "SVNG",
    "InverseProblem",
    "EKI",
    "ALDI",
    "repulsive_ensemble",
    "ParticleResult",
    "run",
    "svgd_bandwidth",
    "stein_direction",
]

# The median heuristic looks at the pairs among at most this many particles: a median over all
# n(n-1)/2 pairs, 500,000 numbers per step at n = 1000, would cost more than the step's kernel
# products; 128 particles give 8,128 pairs, plenty for a heuristic's median (its relative
# standard error is about 2%).
_MEDIAN_PARTICLES = 128
# The trace of a Stein method is -mean log p over this many random particles (_report_and_scores).
_REPORT_PARTICLES = 16


class StepInfo(NamedTuple):
    """What one step of a particle method reports."""

    loss: Float[Array, ""]  # the method's report (mean -log p of 16 random particles for Stein methods)
    finite: Array  # whether the step was taken (its report and direction were finite)


class ParticleState(eqx.Module):
    """The particles (unconstrained, ``[n, dim]``), the optimizer's state and the target."""

    particles: Float[Array, "n dim"]
    opt_state: Any
    target: Target


def svgd_bandwidth(x: Float[Array, "n d"]) -> Float[Array, ""]:
    """The median heuristic of Liu & Wang (2016): the RBF bandwidth ``h`` with
    ``2 h^2 = med^2 / log(n + 1)``, ``med`` the median distance between particles, so that
    each particle's own kernel weight ``1`` and the others' total ``n exp(-med^2 / 2h^2)`` are
    balanced. Pairs of distinct particles among the first 128 (see ``_MEDIAN_PARTICLES``);
    stopped (a choice, not a parameter).

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[0.0], [1.0], [3.0]])  # distances 1, 2, 3: median 2
        >>> round(float(svgd_bandwidth(x) ** 2 * 2 * jnp.log(4.0)), 4)
        4.0
    """
    m = min(x.shape[0], _MEDIAN_PARTICLES)
    h2 = _pair_median(_sq_dists(x[:m], x[:m])) / (2.0 * math.log(x.shape[0] + 1.0))
    return jax.lax.stop_gradient(jnp.sqrt(h2 + 1e-12))


def _pair_median(d2: Float[Array, "m m"]) -> Float[Array, ""]:
    """The lower median of the off-diagonal entries of a symmetric matrix with a zero
    diagonal (the ``ceil(p / 2)``-th smallest of its ``p = m(m-1)/2`` pairs): by bisection on
    a CPU, by a sort elsewhere. Measured (``benchmarks/bandwidth.py``, BENCHMARKS §23): XLA's
    CPU sort took 4.5 ms for 20,000 numbers, ten times the rest of an SVGD step of 200
    particles; on an H200 the sort is the faster, and the bisection's 24-iteration loop
    made a whole SVGD step 1.4-2.1x slower (0.19 against 0.09 ms at 200 particles)."""
    if cheap_branches():  # a CPU: the loop's predicate is read in place
        return _pair_median_bisection(d2)
    return _pair_median_sorted(d2)


def _pair_median_sorted(d2):
    m = d2.shape[0]
    i, j = np.triu_indices(m, 1)
    return jnp.sort(d2[i, j])[(len(i) + 1) // 2 - 1]


def _pair_median_bisection(d2, unroll: bool = False):
    """The lower median to within ``2^-24`` of the pairs' range (float32 resolution) by 24
    counts of ``d2 <= t``. The whole matrix is counted (each pair twice, the ``m`` zeros of
    the diagonal always), which saves gathering the pairs."""
    m = d2.shape[0]
    rank = (m * (m - 1) // 2 + 1) // 2

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        below = (jnp.sum(d2 <= mid) - m) // 2 >= rank
        return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

    lo, hi = jax.lax.fori_loop(0, 24, halve, (jnp.zeros((), d2.dtype), jnp.max(d2)), unroll=unroll)
    return hi


def stein_direction(
    kernel: Kernel | None, x: Float[Array, "n d"], scores: Float[Array, "n d"]
) -> Float[Array, "n d"]:
    """The SVGD direction (Liu & Wang 2016, "Stein Variational Gradient Descent"):

    ``phi(x_i) = (1/n) sum_j [k(x_j, x_i) grad log p(x_j) + grad_{x_j} k(x_j, x_i)]``,

    the steepest descent direction of ``KL(q || p)`` in the kernel's unit ball; the first term
    pulls particles towards high density, the second pushes them apart. ``kernel=None`` is
    the RBF kernel with :func:`svgd_bandwidth`. For the RBF kernel the repulsion is
    ``sum_j k_ij (x_i - x_j) / h^2`` and both terms come from one matrix product; any other
    kernel's repulsion is ``-grad_y sum_j k(x_j, y)`` at ``y = x_i`` by automatic
    differentiation (stationary kernels: ``grad_a k(a, b) = -grad_b k(a, b)``).

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[-1.0], [1.0]])
        >>> phi = stein_direction(None, x, -x)   # N(0, 1): scores -x
        >>> bool(phi[0, 0] > 0 and phi[1, 0] < 0)  # too far out: pulled in
        True
    """
    n = x.shape[0]
    if kernel is None or (isinstance(kernel, RBF) and kernel.bandwidth is not None):
        h = svgd_bandwidth(x) if kernel is None else kernel.bandwidth
        k = jnp.exp(-_sq_dists(x, x) / (2.0 * h**2))
        ks, kx = jnp.split(k @ jnp.concatenate([scores, x], axis=1), 2, axis=1)
        return (ks + (x * jnp.sum(k, axis=1, keepdims=True) - kx) / h**2) / n
    kernel = kernel.resolve(x)
    fixed = jax.lax.stop_gradient(x)
    k = kernel(fixed, fixed)
    repulsion = -jax.grad(lambda y: jnp.sum(kernel(fixed, y)))(fixed)
    return (k @ scores + repulsion) / n


class ParticleMethod(eqx.Module):
    """A rule that moves particles: a direction ``phi`` and an optax transformation that
    turns ``-phi`` (a descent direction, as optax expects) into the move.

    Subclasses define :meth:`direction` and the ``optimizer`` they use; :meth:`init`,
    :meth:`step` and :func:`run` are shared.
    """

    @abc.abstractmethod
    def direction(
        self, target: Target, x: Float[Array, "n dim"], key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Float[Array, "n dim"]]:
        """``(report, phi)``: a scalar the run reports (its trace) and the ascent direction."""

    @property
    @abc.abstractmethod
    def optimizer(self) -> optax.GradientTransformation:
        """The optax transformation applied to ``-phi``."""

    # Whether the method differentiates the target (the start checks and the kernel Stein
    # discrepancy need gradients), and whether its particles may be averaged over a window
    # (a deterministic flow's fixed point, yes; a Markov chain's draws, no: averaging would
    # shrink their spread, so such methods run a fixed number of steps).
    uses_gradients: typing.ClassVar[bool] = True
    averageable: typing.ClassVar[bool] = True
    default_max_steps: typing.ClassVar[int] = 5000

    # The method moves particles in its own coordinates ``z`` (the target's own for SVGD, a
    # mirror map's dual for the mirrored methods); these say how they relate to the target's.
    def positions(self, z: Float[Array, "n dim"]) -> Float[Array, "n dim"]:
        """The particles in the target's coordinates, from the method's."""
        return z

    def coordinates(self, x: Float[Array, "n dim"]) -> Float[Array, "n dim"]:
        """The method's coordinates of points ``x`` given in the target's."""
        return x

    def check_init(self, x) -> None:
        """Raise if the starting points ``x`` (target coordinates) are unusable."""

    def log_density_fn(self, target: Target) -> collections.abc.Callable:
        """The target's log density at one point of the method's coordinates."""
        return target.log_density

    def log_density_and_scores(self, target: Target, z):
        """The log density of the particles in the method's coordinates and its gradient."""
        return jax.vmap(jax.value_and_grad(self.log_density_fn(target)))(z)

    def init(
        self, key: PRNGKeyArray, target: Target, n_particles: int, *, init: Array | None = None
    ) -> ParticleState:
        """``n_particles`` starting points: ``init`` if given (``[n, dim]``, in the target's
        coordinates), else standard-normal draws in the method's coordinates (the target's
        unconstrained space for SVGD). ``state.particles`` are in the method's coordinates;
        ``method.positions(state.particles)`` in the target's."""
        z = _initial_particles(key, self, target, n_particles, init)
        return ParticleState(z, self.optimizer.init(z), target)

    def step(self, key: PRNGKeyArray, state: ParticleState) -> tuple[ParticleState, StepInfo]:
        """One move of every particle. A step whose report or direction is not finite is
        not taken (the particles and the optimizer state stay as they were), and says so."""
        report, phi = self.direction(state.target, state.particles, key)
        ok = jnp.isfinite(report + jnp.sum(phi))
        updates, opt_state = self.optimizer.update(-phi, state.opt_state, state.particles)
        moved = ParticleState(state.particles + updates, opt_state, state.target)
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), eqx.filter(moved, eqx.is_array),
                           eqx.filter(state, eqx.is_array))
        return eqx.combine(new, state), StepInfo(report, ok)


def _report_and_scores(method, target, z, key):
    """The report, ``-mean log p`` over ``_REPORT_PARTICLES`` particles drawn at random (with
    replacement; all of them if there are no more), and every particle's score. The report
    is a progress trace, not part of the move: on German credit (50,000 logits) a log
    density value cost as much as its gradient (0.47 against 0.46 ms for 50 particles), so
    valuing every particle made a step nearly twice a gradient's cost. A random subset is
    an unbiased, noisy trace; a fixed one was not usable: single particles keep drifting
    after their distribution has settled, and the first 16 of 200 particles' mean ``-log p``
    still moved by 2e-3 nats over a 400-step window when all 200's had settled to 5e-4.
    A non-finite score anywhere still makes the step non-finite (and skipped)."""
    f = method.log_density_fn(target)
    n = z.shape[0]
    if n <= _REPORT_PARTICLES:
        log_p, scores = jax.vmap(jax.value_and_grad(f))(z)
        return -jnp.mean(log_p), scores
    rows = jax.random.randint(key, (_REPORT_PARTICLES,), 0, n)
    return -jnp.mean(jax.vmap(f)(z[rows])), jax.vmap(jax.grad(f))(z)


def _stein_report_and_direction(method, kernel, target, x, key):
    report, scores = _report_and_scores(method, target, x, key)
    return report, stein_direction(kernel, x, scores)


@functools.lru_cache(maxsize=None)
def _adagrad(step_size: float) -> optax.GradientTransformation:
    # One object per step size: the compiled loop is keyed by the optimizer's identity.
    return optax.adagrad(step_size)


@functools.lru_cache(maxsize=None)
def _sgd(step_size: float) -> optax.GradientTransformation:
    return optax.sgd(step_size)


@functools.lru_cache(maxsize=None)
def _cocob(alpha: float) -> optax.GradientTransformation:
    return optax.contrib.cocob(alpha=alpha)


class SVGD(ParticleMethod):
    """Stein variational gradient descent (Liu & Wang 2016): every particle moves along
    :func:`stein_direction`, the kernelised steepest descent direction of ``KL(q || p)``.

    Args:
        step_size: AdaGrad's step size (the move is per coordinate, about ``step_size``
            early on and shrinking as squared directions accumulate, as in the paper's code).
        kernel: ``None`` (RBF with the median heuristic, re-chosen every step), or any
            :class:`veil.kernels.Kernel` (``veil.kernels.RBF(h)`` for a fixed bandwidth,
            ``veil.kernels.IMQ()``).
        optimizer: an optax transformation to use instead of AdaGrad (``step_size`` is
            then ignored). Reuse the same object between runs: a new one recompiles.

    Example:
        >>> import jax, jax.numpy as jnp, veil
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum((z - 2.0) ** 2), dim=2)
        >>> res = veil.particles.run(t, veil.particles.SVGD(), key=jax.random.key(0),
        ...                          n_particles=100, progress=False)
        >>> bool(jnp.allclose(res.q.mean, 2.0, atol=0.1))
        True
    """

    step_size: float = 0.1
    kernel: Kernel | None = None
    custom_optimizer: optax.GradientTransformation | None = eqx.field(default=None, static=True)

    def __init__(self, step_size: float = 0.1, kernel: Kernel | None = None, optimizer=None):
        _check_positive("step_size", step_size)
        _check_kernel(kernel)
        if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}.")
        self.step_size = float(step_size)
        self.kernel = kernel
        self.custom_optimizer = optimizer

    @property
    def optimizer(self):
        return self.custom_optimizer if self.custom_optimizer is not None else _adagrad(self.step_size)

    def direction(self, target, x, key):
        return _stein_report_and_direction(self, self.kernel, target, x, key)


class CoinSVGD(ParticleMethod):
    """Coin SVGD (Sharrock & Nemeth 2023, "Coin Sampling: Gradient-Based Bayesian Inference
    without Learning Rates"): the SVGD direction with no step size.

    Each particle coordinate is a coin-betting game: the "coin outcomes" are its SVGD
    directions, the wealth is what betting on them has earned, and the position is the start
    plus a bet proportional to the wealth and to the average outcome,

    ``x_t = x_0 + (sum_s phi_s) / (L_t max(G_t + L_t, alpha L_t)) (L_t + R_t)``,

    with ``L_t`` the largest ``|phi|`` seen, ``G_t`` the sum of ``|phi_s|`` and ``R_t`` the
    (non-negative) reward: the adaptive betting of Orabona & Tommasi (2017), COCOB, which
    optax provides (``optax.contrib.cocob``) and which is used here unchanged. Since
    ``G_t >= L_t``, ``alpha = 1`` leaves the bets uncapped: that is the paper's Coin SVGD,
    whose first move is half a unit along the sign of each coordinate's direction, and bets
    then grow while the directions agree and shrink when they turn, so no step size is tuned.

    Args:
        kernel: as for :class:`SVGD`.
        alpha: COCOB's cap on the early bets. The default, 1, is no cap (the paper's rule).
            optax's own default, 100, makes the first moves 100 times smaller. Measured
            against tuned SVGD (``benchmarks/particles.py``, BENCHMARKS.md section 24), 100
            took 2-3x SVGD's time on German credit and a Dirichlet and settled with a 2-d
            mixture's mode weights off; ``alpha = 1`` was within 1.2x on all 12 rows (SVGD
            tuned at 200 particles), though 2.75x on the mixture at 1000 particles when SVGD
            is tuned at that count itself.

    Example:
        >>> import jax, jax.numpy as jnp, veil
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum((z - 2.0) ** 2), dim=2)
        >>> res = veil.particles.run(t, veil.particles.CoinSVGD(), key=jax.random.key(0),
        ...                          n_particles=100, progress=False)
        >>> bool(jnp.allclose(res.q.mean, 2.0, atol=0.1))
        True
    """

    kernel: Kernel | None = None
    alpha: float = 1.0

    def __check_init__(self):
        _check_kernel(self.kernel)
        _check_positive("alpha", self.alpha)

    @property
    def optimizer(self):
        return _cocob(float(self.alpha))

    def direction(self, target, x, key):
        return _stein_report_and_direction(self, self.kernel, target, x, key)


class MirroredSVGD(ParticleMethod):
    """Mirrored SVGD (Shi, Liu & Mackey 2022, "Sampling with Mirrored Stein Operators") for a
    target on a constrained set: simplex, positive orthant or box (:mod:`veil.mirror`).

    The target's log density is ``log p(theta)`` on the set itself (Lebesgue measure in its
    coordinates; for the simplex, the first ``d`` of ``d + 1`` coordinates). The particles
    move in the mirror map's dual space, ``eta = grad psi(theta)``, along

    ``g(theta_j) = (1/n) sum_i [k(theta_i, theta_j) grad_eta log p_H(eta_i)
    + hess psi(theta_i)^{-1} grad_{theta_i} k(theta_i, theta_j)]``,

    the kernelised steepest descent of ``KL(q || p)`` under the mirrored Stein operator, with
    ``p_H(eta) = p(theta) |det hess psi(theta)|^{-1}`` the target's density in the dual space and
    the RBF kernel on the primal points ``theta`` (median heuristic there). It is SVGD on
    ``p_H`` with the kernel ``k(grad psi*(eta), grad psi*(eta'))``; every particle stays inside
    the set because ``theta = grad psi*(eta)`` always is.

    Args:
        mirror: a :class:`veil.mirror.MirrorMap` (``Simplex()``, ``Positive()``, ``Box(a, b)``).
        step_size: AdaGrad's step size (as for :class:`SVGD`).
        bandwidth: a fixed RBF bandwidth on ``theta``; ``None`` for the median heuristic.
        optimizer: an optax transformation instead of AdaGrad (``optax.contrib.cocob(alpha=1.0)`` for
            a coin-betting, step-size-free version); reuse the same object between runs.

    Example:
        >>> import jax, jax.numpy as jnp, veil
        >>> alpha = jnp.array([2.0, 3.0, 5.0])   # Dirichlet(2, 3, 5) by its first 2 coordinates
        >>> def log_p(t):
        ...     full = jnp.concatenate([t, 1.0 - jnp.sum(t, keepdims=True)])
        ...     return jnp.sum((alpha - 1.0) * jnp.log(full))
        >>> t = veil.Target.from_logdensity(log_p, dim=2)
        >>> res = veil.particles.run(t, veil.particles.MirroredSVGD(veil.mirror.Simplex()),
        ...                          key=jax.random.key(0), n_particles=100, progress=False)
        >>> [round(float(m), 1) for m in res.particles.mean(0)]   # alpha / sum(alpha)
        [0.2, 0.3]
    """

    mirror: MirrorMap
    step_size: float = 0.1
    bandwidth: float | None = None
    custom_optimizer: optax.GradientTransformation | None = eqx.field(default=None, static=True)

    def __init__(self, mirror: MirrorMap, step_size: float = 0.1, bandwidth: float | None = None, optimizer=None):
        if not isinstance(mirror, MirrorMap):
            raise TypeError(
                f"mirror must be a veil.mirror map (Simplex(), Positive(), Box(low, high)), got {mirror!r}."
            )
        _check_positive("step_size", step_size)
        if bandwidth is not None:
            _check_positive("bandwidth", bandwidth)
        if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}.")
        self.mirror, self.step_size = mirror, float(step_size)
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        self.custom_optimizer = optimizer

    @property
    def optimizer(self):
        return self.custom_optimizer if self.custom_optimizer is not None else _adagrad(self.step_size)

    def positions(self, z):
        return self.mirror.primal(z)

    def coordinates(self, x):
        return self.mirror.dual(x)

    def check_init(self, x):
        bad = self.mirror.outside(x)
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} starting particle(s) lie outside {self.mirror.description} "
                f"(the first is row {int(np.flatnonzero(bad)[0])}): mirrored methods start, and "
                "stay, strictly inside the set."
            )

    def log_density_fn(self, target):
        def dual_log_density(eta):
            return target.log_density(self.mirror.primal(eta)) + self.mirror.log_det_jacobian(eta)

        return dual_log_density

    def direction(self, target, z, key):
        report, scores = _report_and_scores(self, target, z, key)
        theta = self.mirror.primal(z)
        h = svgd_bandwidth(theta) if self.bandwidth is None else self.bandwidth
        k = jnp.exp(-_sq_dists(theta, theta) / (2.0 * h**2))
        # sum_i k_ij hess psi(theta_i)^{-1} (theta_j - theta_i) / h^2: the RBF kernel's gradient
        # in theta_i, carried to eta_i by d theta / d eta = hess psi^{-1}.
        repulsion = (self.mirror.kernel_pairs(k, theta) - k @ self.mirror.hess_inv_vp(theta, theta)) / h**2
        return report, (k @ scores + repulsion) / z.shape[0]


def _adaptive_direction(k, h, scores, spread, pairs, metric_vp, threshold):
    """The Stein direction under the adaptive matrix kernel of Shi, Liu & Mackey (2022),

    ``K_t(x, y) = sum_ij sqrt(mu_i mu_j) u_i(x) u_j(y) Gamma_ij``,
    ``Gamma_ij = E_q[u_i u_j G]``,

    with ``(mu_i, u_i)`` the eigenpairs of the kernel's integral operator under the particles
    (the Gram matrix's, extended off the particles by Nystrom) and ``G`` a metric; for one
    particle it is ``k G``. Every argument is per particle:

    - ``scores``: ``G^{-1} grad log p`` plus the divergence of ``G^{-1}`` (in a mirror map's
      dual space: the dual scores, which hold both);
    - ``spread``: ``G_i^{-1} x_i``; ``pairs``: ``sum_i k_ij G_i^{-1} x_j`` (the RBF kernel's
      gradient carried by ``G^{-1}``, whose sum over the particles is the repulsion);
    - ``metric_vp(w)``: ``G_i w_i`` for each row.

    With ``k = E L E^T`` (``L`` the eigenvalues kept: the largest, making up ``threshold`` of
    the trace; the rest would enter through ``1 / sqrt(L)`` and only add noise) the direction
    ``(1/n) sum_j [K(x_i, x_j) s_j + div_j K(x_i, x_j) G_j^{-1}]`` reduces to

    ``phi = E sqrt(L) E^T G (E c)``,
    ``c = (1/n) [sqrt(L) E^T (s - spread / h^2) + E^T pairs / (sqrt(L) h^2)]``:

    two ``n x n`` eigenvectors' products, no ``[n, n, d, d]`` kernel. With ``G = I`` and
    every eigenvalue kept it is :func:`stein_direction` exactly.
    """
    n = k.shape[0]
    lam, vec = jnp.linalg.eigh(k)  # ascending
    lam = jnp.maximum(lam, 0.0)
    desc = lam[::-1]
    before = (jnp.cumsum(desc) - desc) / jnp.sum(desc)
    # The largest eigenvalues up to and including the one that reaches the threshold, and
    # none below float32's resolution of the largest (their eigenvectors are noise).
    keep = (before < threshold)[::-1] & (lam > 1e-5 * lam[-1])
    safe = jnp.where(keep, lam, 1.0)
    root = jnp.where(keep, jnp.sqrt(safe), 0.0)[:, None]
    inv_root = jnp.where(keep, 1.0 / jnp.sqrt(safe), 0.0)[:, None]
    c = (root * (vec.T @ (scores - spread / h**2)) + inv_root * (vec.T @ pairs) / h**2) / n
    return vec @ (root * (vec.T @ metric_vp(vec @ c)))


def _check_threshold(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(
            f"eigen_threshold must be in (0, 1] (the share of the Gram matrix's trace whose "
            f"eigenvalues the adaptive kernel keeps; the paper uses 0.98), got {value!r}."
        )


class SVMD(MirroredSVGD):
    """Stein variational mirror descent (Shi, Liu & Mackey 2022, "Sampling with Mirrored
    Stein Operators") for a target on a constrained set: :class:`MirroredSVGD` with a kernel
    that adapts to the mirror map's geometry.

    MSVGD's kernel is ``k(theta, theta') I``; SVMD's is
    ``K_t(theta, theta') = sum_ij sqrt(mu_i mu_j) u_i(theta) u_j(theta') Gamma_ij`` with
    ``Gamma_ij = E_q[u_i u_j hess psi]`` and ``(mu_i, u_i)`` the eigenpairs of ``k``'s
    integral operator under the particles: roughly ``k^{1/2} hess psi k^{1/2}``, so that for
    a single particle the move in the dual space is ``hess psi`` times MSVGD's, that is,
    mirror descent on ``log p`` (up to the entropy's log determinant term). Near the
    boundary of the set, where ``hess psi`` is large, particles take proportionately larger
    dual steps instead of crawling. Each step eigendecomposes the ``n x n`` Gram matrix
    (``O(n^3)``; fine for hundreds of particles) and keeps the eigenvalues that make up
    ``eigen_threshold`` of its trace (the paper's 0.98). See :func:`_adaptive_direction`
    for the computation, which never forms the ``[n, n, d, d]`` kernel.

    Args:
        mirror, bandwidth: as for :class:`MirroredSVGD`.
        step_size: AdaGrad's step size. Plain steps (``optimizer=optax.sgd(...)``, mirror
            descent's own) are unstable here: near the boundary ``hess psi`` is large, and so
            is the move. On Dirichlet(2, 3, 5, 0.7, 1.5) plain steps of 0.03 to 0.3 reached
            a good fit and then left it for non-finite points within 300 to 3,000 steps;
            AdaGrad's moves are bounded by its step, and 0.1 to 1 were all stable. The default
            step, 0.5, let the default stopping rule stop after 800 to 3,300 steps on
            Dirichlet(2, 3, 5, 0.7) with 50 and 200 particles; 0.1 had not stopped at 5,000.
        optimizer: an optax transformation instead of AdaGrad.
        eigen_threshold: the share of the Gram matrix's trace kept, in ``(0, 1]``.

    Example:
        >>> import jax, jax.numpy as jnp, veil
        >>> def log_p(t):   # two independent Gamma(3, 2): mean 1.5, on the positive orthant
        ...     return jnp.sum(2.0 * jnp.log(t) - 2.0 * t)
        >>> t = veil.Target.from_logdensity(log_p, dim=2)
        >>> res = veil.particles.run(t, veil.particles.SVMD(veil.mirror.Positive()),
        ...                          key=jax.random.key(0), n_particles=100, progress=False)
        >>> [round(float(m), 1) for m in res.particles.mean(0)]
        [1.5, 1.5]
    """

    eigen_threshold: float = 0.98

    def __init__(self, mirror: MirrorMap, step_size: float = 0.5, bandwidth: float | None = None,
                 optimizer=None, eigen_threshold: float = 0.98):
        super().__init__(mirror, step_size=step_size, bandwidth=bandwidth, optimizer=optimizer)
        _check_threshold(eigen_threshold)
        self.eigen_threshold = float(eigen_threshold)

    def direction(self, target, z, key):
        report, scores = _report_and_scores(self, target, z, key)
        theta = self.mirror.primal(z)
        h = svgd_bandwidth(theta) if self.bandwidth is None else self.bandwidth
        k = jnp.exp(-_sq_dists(theta, theta) / (2.0 * h**2))
        # In the dual space the mirrored Stein operator is the ordinary one for p_H, whose
        # scores already hold the divergence of hess psi^{-1} (through its log determinant).
        phi = _adaptive_direction(
            k, h, scores, self.mirror.hess_inv_vp(theta, theta), self.mirror.kernel_pairs(k, theta),
            lambda w: self.mirror.hess_vp(theta, w), self.eigen_threshold,
        )
        return report, phi


class SVNG(ParticleMethod):
    """Stein variational natural gradient (Shi, Liu & Mackey 2022, "Sampling with Mirrored
    Stein Operators") for an unconstrained target: SVGD in the geometry of a metric ``G``.

    The particles move by ``x <- x + step G(x)^{-1} g(x)`` with ``g`` the Stein direction of
    the mirrored operator ``(M g)(x) = g^T G^{-1} grad log p + div(G^{-1} g)`` under the
    adaptive kernel of :class:`SVMD` built on ``G``. For one particle this is a natural
    gradient step, ``G^{-1} grad log p`` (plus the divergence of ``G^{-1}``, zero for a
    constant metric); with ``G = I`` it is SVGD. A good ``G`` is the posterior's Fisher
    information or its expected curvature: then every direction is equally easy and the
    step size needs no tuning across coordinates of very different scales. The kernel is the
    RBF kernel in the metric's geometry, ``exp(-(x - y)^T A (x - y) / 2h^2)`` with ``A`` the
    metric's mean over the particles (the average-Hessian kernel of Wang, Tang, Bajaj & Liu
    2019, "Stein Variational Gradient Descent with Matrix-Valued Kernels"), and the median
    heuristic in those units. Each step eigendecomposes the ``n x n`` Gram matrix and
    inverts ``n`` metrics (``O(n^3 + n d^3)``).

    Args:
        metric: the metric, a symmetric positive-definite ``[dim, dim]`` array (constant) or
            a function ``x -> [dim, dim]`` of one unconstrained point (e.g. the Fisher
            information of a GLM, ``X^T diag(w(x)) X + prior precision``). A function's
            ``div G^{-1}`` is computed by forward-mode differentiation (``O(d^3)`` more per
            particle).
        step_size: the step of the plain gradient step on the natural direction. 1 is a
            Newton step for one particle on a Gaussian whose precision is the metric;
            0.5 to 1.5 converged in 800 to 2,800 steps on correlated and badly scaled
            Gaussians (20 to 400 particles) and 1 to 2 on German credit.
        bandwidth: a fixed RBF bandwidth (in the metric's units); ``None`` for the median
            heuristic.
        optimizer: an optax transformation to use instead of ``optax.sgd(step_size)``.
        eigen_threshold: as for :class:`SVMD`.

    Example:
        >>> import jax, jax.numpy as jnp, veil
        >>> prec = jnp.diag(jnp.array([100.0, 0.01]))   # sds 0.1 and 10
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * z @ prec @ z, dim=2)
        >>> res = veil.particles.run(t, veil.particles.SVNG(prec), key=jax.random.key(0),
        ...                          n_particles=100, progress=False)
        >>> ratio = res.particles.std(0) / jnp.array([0.1, 10.0])   # both about 0.95
        >>> bool(jnp.all(jnp.abs(ratio - 1.0) < 0.1))
        True
    """

    metric: Any
    step_size: float = 1.0
    bandwidth: float | None = None
    eigen_threshold: float = 0.98
    custom_optimizer: optax.GradientTransformation | None = eqx.field(default=None, static=True)

    def __init__(self, metric, step_size: float = 1.0, bandwidth: float | None = None, optimizer=None,
                 eigen_threshold: float = 0.98):
        if not callable(metric):
            g = np.asarray(metric)
            if g.ndim != 2 or g.shape[0] != g.shape[1] or not np.issubdtype(g.dtype, np.floating):
                raise ValueError(
                    f"metric must be a square float array [dim, dim] or a function x -> [dim, dim], "
                    f"got {g.dtype} {g.shape}."
                )
            _check_metric(g[None], "the constant metric")
            metric = jnp.asarray(g)
        _check_positive("step_size", step_size)
        if bandwidth is not None:
            _check_positive("bandwidth", bandwidth)
        if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}.")
        _check_threshold(eigen_threshold)
        self.metric, self.step_size = metric, float(step_size)
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        self.eigen_threshold = float(eigen_threshold)
        self.custom_optimizer = optimizer

    @property
    def optimizer(self):
        return self.custom_optimizer if self.custom_optimizer is not None else _sgd(self.step_size)

    def _metrics(self, x):
        """``G`` and ``G^{-1}`` at every particle (``[n, d, d]``, or ``[d, d]`` if constant),
        and the divergence of ``G^{-1}``, ``sum_b d_b (G^{-1})_{ab}`` (``[n, d]``)."""
        if not callable(self.metric):
            g = self.metric.astype(x.dtype)
            return g, jnp.linalg.inv(g), jnp.zeros_like(x)

        def inverse(xi):  # G^{-1} to differentiate, and (G, G^{-1}) as they are
            g = self.metric(xi)
            g_inv = jnp.linalg.inv(g)
            return g_inv, (g, g_inv)

        # One evaluation of the metric and its inverse per particle serves all three.
        jac, (g, g_inv) = jax.vmap(jax.jacfwd(inverse, has_aux=True))(x)  # jac: [n, a, b, derivative]
        return g, g_inv, jnp.einsum("nabb->na", jac)

    def check_init(self, x):
        g = jax.vmap(self.metric)(jnp.asarray(x)) if callable(self.metric) else self.metric[None]
        d = x.shape[-1]
        if g.shape[1:] != (d, d):
            raise ValueError(
                f"The metric is {g.shape[1]} x {g.shape[2]} but the target has dim={d}: give a "
                f"[{d}, {d}] metric (in the target's unconstrained coordinates)."
            )
        if callable(self.metric):
            _check_metric(np.asarray(g), "metric(x) at a starting particle")

    def direction(self, target, x, key):
        report, grads = _report_and_scores(self, target, x, key)
        g, g_inv, div = self._metrics(x)
        # The RBF kernel in the metric's geometry, k = exp(-(x - y)^T A (x - y) / 2h^2) with A
        # the metric (its mean over the particles if it varies): on a target whose scales
        # differ by 100x a Euclidean kernel sees only the widest coordinate, and the
        # truncated eigenbasis then misses the narrow ones (sds 3.9x too wide in a test).
        a = g if g.ndim == 2 else jax.lax.stop_gradient(jnp.mean(g, axis=0))
        white = x @ jnp.linalg.cholesky(a)  # |white_i - white_j|^2 = (x_i - x_j)^T A (x_i - x_j)
        h = svgd_bandwidth(white) if self.bandwidth is None else self.bandwidth
        k = jnp.exp(-_sq_dists(white, white) / (2.0 * h**2))
        ax = x @ a  # grad_x k(x, y) = -A (x - y) k / h^2 (A symmetric)
        if g.ndim == 2:
            apply, apply_inv = (lambda w: w @ g), (lambda w: w @ g_inv)  # symmetric
            spread, pairs = x, jnp.sum(k, axis=0)[:, None] * x
        else:
            apply = functools.partial(jnp.einsum, "nab,nb->na", g)
            apply_inv = functools.partial(jnp.einsum, "nab,nb->na", g_inv)
            spread, pairs = apply_inv(ax), jnp.einsum("lm,lab,mb->ma", k, g_inv, ax)
        phi = _adaptive_direction(k, h, apply_inv(grads) + div, spread, pairs, apply, self.eigen_threshold)
        return report, apply_inv(phi)


def _check_metric(g: np.ndarray, what: str):
    """Raise unless every ``g[i]`` is finite, symmetric and positive definite."""
    g = np.asarray(g, np.float64)
    if not np.isfinite(g).all():
        raise ValueError(f"{what} holds non-finite values; the metric must be finite and positive definite.")
    if not np.allclose(g, np.swapaxes(g, -1, -2), rtol=1e-5, atol=1e-8 * np.abs(g).max()):
        raise ValueError(f"{what} is not symmetric; the metric must be a symmetric positive-definite matrix.")
    if (np.linalg.eigvalsh(g).min(axis=-1) <= 0).any():
        raise ValueError(
            f"{what} is not positive definite; use a positive-definite metric (e.g. a Fisher "
            "information plus the prior's precision)."
        )


# ------------------------------------------------------------------ gradient-free ensembles
class InverseProblem(eqx.Module):
    """A Bayesian inverse problem with a black-box forward model: ``y = G(x) + e``,
    ``e ~ N(0, diag(noise_sd^2))``, prior ``x ~ N(prior_mean, diag(prior_sd^2))``.

    ``forward`` maps one parameter vector ``[dim]`` to predicted observations ``[m]``; the
    gradient-free methods (:class:`EKI`, :class:`ALDI`) only evaluate it (it may wrap a
    simulator through ``jax.pure_callback``). ``target`` is the posterior as a
    :class:`veil.Target` (what :func:`run` reports and summarises; other methods may use it
    if ``forward`` is differentiable).

    Example:
        >>> import jax.numpy as jnp, veil
        >>> p = veil.particles.InverseProblem(lambda x: 2.0 * x, jnp.array([1.0]),
        ...                                   noise_sd=1.0, prior_mean=jnp.zeros(1), prior_sd=1.0)
        >>> p.target.dim
        1
    """

    forward: typing.Callable = eqx.field(static=True)
    observations: Float[Array, " m"]
    noise_sd: Float[Array, " m"]
    prior_mean: Float[Array, " dim"]
    prior_sd: Float[Array, " dim"]
    target: Target

    def __init__(self, forward, observations, *, noise_sd, prior_mean, prior_sd):
        if not callable(forward):
            raise TypeError(f"forward must be a callable x -> predicted observations, got {forward!r}.")
        y = jnp.atleast_1d(jnp.asarray(observations, jnp.float32))
        mean = jnp.atleast_1d(jnp.asarray(prior_mean, jnp.float32))
        if y.ndim != 1 or mean.ndim != 1:
            raise ValueError("observations and prior_mean must be vectors.")
        noise = jnp.broadcast_to(jnp.asarray(noise_sd, jnp.float32), y.shape)
        sd = jnp.broadcast_to(jnp.asarray(prior_sd, jnp.float32), mean.shape)
        for name, v in (("observations", y), ("prior_mean", mean)):
            if not bool(jnp.isfinite(v).all()):
                raise ValueError(f"{name} holds non-finite values.")
        for name, v in (("noise_sd", noise), ("prior_sd", sd)):
            if not bool((jnp.isfinite(v) & (v > 0)).all()):
                raise ValueError(f"{name} must be positive and finite.")
        out = jax.eval_shape(forward, jax.ShapeDtypeStruct(mean.shape, jnp.float32))
        if getattr(out, "shape", None) != y.shape:
            raise ValueError(
                f"forward maps a parameter vector of shape {mean.shape} to shape "
                f"{getattr(out, 'shape', type(out).__name__)}, but the observations have shape {y.shape}."
            )
        self.forward, self.observations, self.noise_sd = forward, y, noise
        self.prior_mean, self.prior_sd = mean, sd
        self.target = Target.from_logdensity(
            functools.partial(_inverse_log_density, forward, y, noise, mean, sd), int(mean.shape[0]))

    def neg_log_density(self, x, g):
        """Mean ``-log p`` of an ensemble from its predictions ``g`` (no second run of the
        forward model)."""
        return 0.5 * jnp.mean(jnp.sum(((self.observations - g) / self.noise_sd) ** 2, axis=1)
                              + jnp.sum(((x - self.prior_mean) / self.prior_sd) ** 2, axis=1))

    def ensemble(self, x):
        """Forward predictions ``[n, m]`` of an ensemble ``[n, dim]`` and the deviations of
        both from their ensemble means."""
        g = jax.vmap(self.forward)(x)
        return g, x - jnp.mean(x, axis=0), g - jnp.mean(g, axis=0)


def _inverse_log_density(forward, y, noise_sd, prior_mean, prior_sd, x):
    return -0.5 * (jnp.sum(((y - forward(x)) / noise_sd) ** 2) + jnp.sum(((x - prior_mean) / prior_sd) ** 2))


class _GradientFree(ParticleMethod):
    problem: InverseProblem
    uses_gradients = False
    averageable = False

    @property
    def optimizer(self):
        return _IDENTITY  # the direction is the move itself

    def log_density_fn(self, target):
        raise TypeError(f"{type(self).__name__} does not differentiate the target.")

    def prior_draws(self, key, n):
        return self.problem.prior_mean + self.problem.prior_sd * jax.random.normal(key, (n, self.problem.prior_mean.shape[0]))


# The move is the "gradient" negated; SGD with step 1 applies it unchanged.
_IDENTITY = optax.sgd(1.0)


class EKI(_GradientFree):
    """Ensemble Kalman inversion (Iglesias, Law & Stuart 2013), as the tempered, perturbed-
    observation sampler of "Gradient-Free Sequential Bayesian Experimental Design via
    Interacting Particle Systems": ``num_steps`` Kalman updates, each with the likelihood
    tempered by ``1 / num_steps``, move a prior ensemble to the posterior without a gradient:

    ``x_i <- x_i + C_xG (C_GG + num_steps Gamma)^{-1} (y + xi_i - G(x_i))``,
    ``xi_i ~ N(0, num_steps Gamma)``,

    with ``C_xG``, ``C_GG`` the ensemble cross- and output covariances. For a linear ``G``
    the ensemble's distribution is the posterior in the large-ensemble limit; for a
    nonlinear one it is a Gaussian-type approximation. The default start is ``n_particles``
    prior draws; :func:`run` runs exactly ``num_steps`` steps.

    Example:
        >>> import jax, jax.numpy as jnp, veil
        >>> p = veil.particles.InverseProblem(lambda x: jnp.array([x[0] + x[1]]), jnp.array([2.0]),
        ...                                   noise_sd=0.5, prior_mean=jnp.zeros(2), prior_sd=1.0)
        >>> res = veil.particles.run(p.target, veil.particles.EKI(p), key=jax.random.key(0),
        ...                          n_particles=500, progress=False)
        >>> round(float(res.particles.sum(1).mean()), 1)   # posterior mean of x0 + x1: 2 * 2 / 2.25
        1.8
    """

    num_steps: int = 20

    def __check_init__(self):
        if not isinstance(self.problem, InverseProblem):
            raise TypeError(f"EKI needs a veil.particles.InverseProblem, got {self.problem!r}.")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {self.num_steps!r}.")

    @property
    def default_max_steps(self):
        return self.num_steps

    def direction(self, target, x, key):
        p = self.problem
        n = x.shape[0]
        g, dx, dg = p.ensemble(x)
        noise_var = self.num_steps * p.noise_sd**2  # the tempered likelihood's noise
        c_xg = dx.T @ dg / (n - 1)
        c_gg = dg.T @ dg / (n - 1)
        perturbed = p.observations + jnp.sqrt(noise_var) * jax.random.normal(key, g.shape)
        gain_rhs = jnp.linalg.solve(c_gg + jnp.diag(noise_var), (perturbed - g).T)
        return p.neg_log_density(x, g), (c_xg @ gain_rhs).T


class ALDI(_GradientFree):
    """Affine-invariant interacting Langevin dynamics (Garbuno-Inigo, Nuesken & Reich 2020),
    gradient-free, as used in "Gradient-Free Sequential Bayesian Experimental Design via
    Interacting Particle Systems": the ensemble's covariance ``C`` preconditions a Langevin
    diffusion whose drift replaces ``C grad log p`` by ensemble cross-covariances,

    ``dx_i = [-C_xG Gamma^{-1} (G(x_i) - y) - C Sigma0^{-1} (x_i - m0) + (d + 1)/n (x_i - xbar)] dt
    + sqrt(2 dt) C^{1/2} xi_i``,

    with ``C``, ``C_xG`` normalised by ``n`` and ``xi_i ~ N(0, I)``. The ``(d + 1)/n`` term makes
    the posterior invariant for any ensemble size when ``G`` is linear; the dynamics are
    affine invariant, so an ill-conditioned posterior mixes as fast as a round one. Euler-
    Maruyama steps of ``dt = step_size / max(1, L)``, ``L`` the Frobenius norms of
    ``Gamma^{-1/2} C_GG Gamma^{-1/2}`` plus ``Sigma0^{-1/2} C Sigma0^{-1/2}`` (a bound on the
    drift's stiffness, large while a prior-wide ensemble meets informative data, about
    ``sqrt(d)`` at equilibrium). The particles are draws of a Markov chain: run a fixed number
    of steps (no stopping rule) and keep the last state.

    Example:
        >>> import jax, jax.numpy as jnp, veil
        >>> p = veil.particles.InverseProblem(lambda x: jnp.array([x[0] + x[1]]), jnp.array([2.0]),
        ...                                   noise_sd=0.5, prior_mean=jnp.zeros(2), prior_sd=1.0)
        >>> res = veil.particles.run(p.target, veil.particles.ALDI(p), key=jax.random.key(0),
        ...                          n_particles=500, max_steps=1000, progress=False)
        >>> round(float(res.particles.sum(1).mean()), 1)
        1.8
    """

    step_size: float = 0.05

    def __check_init__(self):
        if not isinstance(self.problem, InverseProblem):
            raise TypeError(f"ALDI needs a veil.particles.InverseProblem, got {self.problem!r}.")
        _check_positive("step_size", self.step_size)

    def direction(self, target, x, key):
        p = self.problem
        n, d = x.shape
        g, dx, dg = p.ensemble(x)
        cov = dx.T @ dx / n
        c_xg = dx.T @ dg / n
        c_gg = dg.T @ dg / n
        drift = (
            -(c_xg @ ((g - p.observations) / p.noise_sd**2).T).T
            - ((x - p.prior_mean) / p.prior_sd**2) @ cov
            + (d + 1.0) / n * dx
        )
        stiff = (jnp.linalg.norm(c_gg / jnp.outer(p.noise_sd, p.noise_sd))
                 + jnp.linalg.norm(cov / jnp.outer(p.prior_sd, p.prior_sd)))
        dt = self.step_size / jnp.maximum(1.0, stiff)
        # Noise N(0, 2 dt C) for each particle, by the symmetric square root of C (an n x d
        # draw and a d x d eigendecomposition, not the n x n draw of the generalised square
        # root sum_j w_ij (x_j - xbar) / sqrt(n); same law, and it stays in the ensemble's span
        # when C is singular).
        lam, vec = jnp.linalg.eigh(cov)
        half = (vec * jnp.sqrt(jnp.maximum(lam, 0.0))) @ vec.T
        noise = jnp.sqrt(2.0 * dt) * jax.random.normal(key, x.shape) @ half
        return p.neg_log_density(x, g), dt * drift + noise


def _check_kernel(kernel):
    if kernel is not None and not isinstance(kernel, Kernel):
        raise TypeError(
            f"kernel must be None (RBF with the median heuristic) or a veil.kernels.Kernel, got {kernel!r}."
        )


# ------------------------------------------------------------------------------ the driver
class _ParticleLoss(eqx.Module):
    """The driver's loss for a particle method: value ``report``, "gradient" ``-phi`` (see
    the module docstring). ``params`` are the particles ``[n, dim]``."""

    method: ParticleMethod
    target: Target

    @property
    def batches(self):
        return self.target.batches

    def watch(self, z):
        """What the stopping rule watches: each coordinate's particle mean in units of its
        particle sd, and the log of that sd, in the target's coordinates (a mirrored method's
        constrained set, not its dual space). A drift of 0.01 in either is a move of the mean
        by 1% of an sd, or a 1% change of the sd (``drift_atol`` of the default rule)."""
        x = self.method.positions(z)
        sd = jnp.std(x, axis=0)
        return {"location": jnp.mean(x, axis=0) / sd, "log_scale": jnp.log(sd)}

    def value_and_grad(self, x, key, *, batch=None):
        """``((report, None), -phi)``: the driver takes this as the loss and its gradient
        without differentiating anything."""
        target = self.target if batch is None else self.target.on_batch(batch)
        report, phi = self.method.direction(target, x, key)
        return (report, None), -phi



def _initial_particles(key, method: ParticleMethod, target: Target, n_particles: int, init) -> jax.Array:
    """Starting particles in the method's coordinates (checked: count, shape, finite, apart,
    inside the method's set)."""
    _check_count(n_particles)
    if init is None:
        z = _draw_start(key, method, target, int(n_particles))
        method.check_init(np.asarray(method.positions(z)))
        return z
    return method.coordinates(jnp.asarray(_checked_init(method, target, n_particles, init)))


def _check_count(n_particles) -> None:
    if isinstance(n_particles, bool) or not isinstance(n_particles, (int, np.integer)) or n_particles < 2:
        raise ValueError(
            f"n_particles must be an integer >= 2 (the kernel needs pairs of particles), got {n_particles!r}."
        )


def _draw_start(key, method: ParticleMethod, target: Target, n: int) -> jax.Array:
    """``n`` starting particles drawn in the method's coordinates: its prior's draws (the
    gradient-free methods) or standard normal ones."""
    draws = getattr(method, "prior_draws", None)
    return draws(key, n) if draws is not None else jax.random.normal(key, (n, target.dim))


def _checked_init(method: ParticleMethod, target: Target, n_particles: int, init) -> np.ndarray:
    """A host copy of the caller's starting points (target coordinates), checked."""
    # The checks run on one host copy: a device round trip per check and a row sort for
    # "all rows equal" cost 0.4-0.9 ms of a one-step run's ~4 ms on CPU (BENCHMARKS §24).
    host = np.asarray(init)
    if host.shape != (n_particles, target.dim) or not np.issubdtype(host.dtype, np.floating):
        raise ValueError(
            f"init must be a float array of shape (n_particles, dim) = ({n_particles}, {target.dim}) in "
            f"the target's coordinates, got {host.dtype} {host.shape}."
        )
    if not np.isfinite(host).all():
        raise ValueError("init holds non-finite values; give finite starting points.")
    if not (host != host[0]).any():
        raise ValueError(
            "init holds one point repeated: the particles must start apart (the kernel's "
            "bandwidth comes from their distances, and identical particles never separate)."
        )
    method.check_init(host)
    return host


def _start_counts(method, target: Target, z):
    """How many starting particles have a non-finite log density, and a non-finite gradient."""
    if not method.uses_gradients:
        log_p = jax.vmap(target.log_density)(method.positions(z))
        return jnp.sum(~jnp.isfinite(log_p)), jnp.int32(0)
    log_p, scores = method.log_density_and_scores(target, z)
    return jnp.sum(~jnp.isfinite(log_p)), jnp.sum(~jnp.isfinite(scores).all(axis=1))


@eqx.filter_jit
def _start(method, target: Target, key, n: int, init):
    """A run's start in one compiled call: its keys (init, run, diagnostics: ``split(key,
    3)``), the starting particles in the method's coordinates with a leading restart axis
    (``init``, checked on the host, or drawn), :func:`_start_counts`, and the drawn start in
    the target's coordinates (``None`` for a given ``init``). Each eager
    operation it replaces (the split, the transfer, the added axis) is a kernel launch on a
    GPU, where they cost 0.3-0.8 ms of a one-step run's ~5 ms (BENCHMARKS.md section 27)."""
    init_key, run_key, diag_key = jax.random.split(key, 3)
    z = _draw_start(init_key, method, target, n) if init is None else method.coordinates(jnp.asarray(init))
    drawn = method.positions(z) if init is None else None  # for the method's own check
    return jnp.expand_dims(z, 0), run_key, diag_key, _start_counts(method, target, z), drawn


@eqx.filter_jit
def _log_density_and_scores(method, target: Target, z):
    return method.log_density_and_scores(target, z)


@eqx.filter_jit
def _constrained(target: Target, x):
    return jax.vmap(target.to_constrained)(x)


# Particle methods are deterministic given their batches: no step-size decay (a coin method
# has no step to decay), and drift judged against a tolerance (1% of a particle sd, see
# _ParticleLoss.watch) rather than against noise. A window of 150 steps, not the noisy
# ELBO's 200, makes the stage judged at 300 steps (StopRule.min_stage; the driver's chunks
# end there and every 300 steps after), so a run can stop at step 300 rather than 400 or 800:
# measured on 12 rows of benchmarks/particles.py (BENCHMARKS.md sections 24 and 25), every
# stop was within the time-to-accuracy goal; a window of 100 (stages judged at 250) stopped
# four rows later, at 500-750 steps, where 150 stops them at 300.
_DEFAULT_STOP = StopRule(min_window=150, min_decays=0, max_decays=0, drift_atol=0.01, max_drift=2.0)
_MISSING = object()


@typing.no_type_check
def run(
    target: Target,
    method: ParticleMethod | None = None,
    *,
    key: jax.Array,
    n_particles: int = 100,
    max_steps: int | None = None,
    init=None,
    progress: bool = True,
    stop=_MISSING,
    checkpoint=None,
) -> "ParticleResult":
    """Move ``n_particles`` particles with ``method`` (default :class:`CoinSVGD`, which has
    no step size) in veil's compiled driver, and return them as a :class:`ParticleResult`.

    Args:
        target: a :class:`veil.Target` (a minibatched one gives each step a batch's scores),
            or an :class:`InverseProblem` (its posterior).
        method: a :class:`ParticleMethod`.
        key: a JAX PRNG key.
        n_particles: how many particles (at least 2).
        max_steps: cap on the steps (default ``method.default_max_steps``: 5,000; for
            :class:`EKI` its ``num_steps``, which is also the only value it accepts).
        init: starting particles ``[n_particles, dim]`` in unconstrained space; default
            standard-normal draws there.
        progress: show a progress bar.
        stop: a :class:`veil.StopRule`, or ``None`` to run ``max_steps`` steps (the only
            choice for :class:`EKI` and :class:`ALDI`, whose particles may not be averaged).
            The default is ``StopRule(min_window=150, min_decays=0, max_decays=0, drift_atol=0.01,
            max_drift=2.0)``: the trace is the mean
            ``-log p`` of 16 particles drawn at random each step; the run stops once it has settled and, over the last window, no
            coordinate's particle mean has moved by more than 1% of its particle sd nor its
            sd changed by more than 1%; each particle is averaged over that window.
        checkpoint: a path or :class:`veil.checkpoint.Checkpoint`, as for :func:`veil.fit`.

    Raises:
        ValueError / TypeError: bad arguments, or a log density or gradient that is not
            finite at a starting particle, before any compilation of the loop.

    A call costs 2-3 ms besides its steps (start checks, the driver, the result; BENCHMARKS.md
    section 27): for runs of a few milliseconds, or many small ones inside your own program,
    ``state = method.init(key, target, n, init=x0)`` and ``method.step`` in your own jitted
    loop skip it.

    Example:
        >>> import jax, jax.numpy as jnp, veil
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=3)
        >>> res = veil.particles.run(t, key=jax.random.key(0), n_particles=50, progress=False)
        >>> res.draws()["z"].shape   # the particles themselves
        (50, 3)
    """

    if isinstance(target, InverseProblem):
        target = target.target
    if not isinstance(target, Target):
        raise TypeError(
            f"target must be a veil.Target, got {type(target).__name__}; build one with "
            "veil.Target.from_logdensity(fn, dim) or veil.Target.from_numpyro(model, ...)."
        )
    method = CoinSVGD() if method is None else method
    if not isinstance(method, ParticleMethod):
        raise TypeError(f"method must be a veil.particles method such as CoinSVGD(), got {method!r}.")
    _check_key(key)
    fixed = isinstance(method, EKI)
    if fixed and max_steps is not None and max_steps != method.num_steps:
        raise ValueError(
            f"EKI runs exactly num_steps={method.num_steps} tempered steps (their temperatures "
            f"sum to one), so max_steps={max_steps} would stop short of, or past, the "
            "posterior; set EKI(problem, num_steps=...) instead."
        )
    max_steps = _check_positive_int("max_steps", method.default_max_steps if max_steps is None else max_steps)
    if stop is _MISSING:
        stop = _DEFAULT_STOP if method.averageable else None
    if stop is not None and not isinstance(stop, StopRule):
        raise TypeError(f"stop must be a veil.StopRule or None, got {stop!r}.")
    if stop is not None and not method.averageable:
        raise ValueError(
            f"{type(method).__name__}'s particles are draws of a stochastic process: the stopping "
            "rule's window average would shrink their spread. Run a fixed number of steps "
            "(stop=None, max_steps=...)."
        )
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint(checkpoint)
    _check_count(n_particles)
    host_init = None if init is None else _checked_init(method, target, n_particles, init)
    # (a device array goes in as it is: the host copy was for the checks)
    x0, run_key, diag_key, counts, drawn = _start(
        method, target, key, int(n_particles), init if isinstance(init, jax.Array) else host_init)
    counts, drawn = jax.device_get((counts, drawn))  # one device read
    if init is None:
        method.check_init(drawn)
    bad_value, bad_grad = map(int, counts)
    if bad_value or bad_grad:
        raise ValueError(
            f"At {bad_value} starting particle(s) the log density is not finite and at {bad_grad} "
            "its gradient is not: every particle must start where the target is defined and "
            "differentiable. Pass init=... (unconstrained points), or fix the model there."
        )
    fingerprint = None
    if checkpoint is not None:
        fingerprint = {"method": repr(method), "n_particles": int(n_particles), "stop": repr(stop),
                       "key": np.asarray(jax.random.key_data(key)).tolist(), "target": target.kind}
    out = driver.run(
        _ParticleLoss(method, target), x0, method.optimizer, key=run_key, max_steps=max_steps,
        stop_rule=stop, progress=progress, description=type(method).__name__,
        checkpoint=checkpoint, fingerprint=fingerprint,
    )
    coords = jnp.squeeze(out.params, 0)  # (indexing costs a gather's dispatch: 0.2 ms)
    if out.stop_reasons[0] == "nonfinite":
        warnings.warn(
            f"The run stopped early: the particles' log density or its gradient was not finite "
            f"for {out.skipped[0]} steps (100 in a row at the end); the particles are those of "
            "the last finite step. Some particle reached a region where the target is undefined "
            "or overflows: check the model there, or start the particles elsewhere (init=...).",
            RuntimeWarning,
            stacklevel=2,
        )
    return ParticleResult.from_run(out, target, Empirical(method.positions(coords)), diag_key,
                                   method=method, coordinates=coords)


# ------------------------------------------------------------------ repulsive ensembles
class _EnsembleLoss(eqx.Module):
    """``k`` members of one family fitted together: the mean of their losses plus
    ``strength`` times the mean log kernel density of each member's mean among all the
    members' (``(1/k) sum_r log (1/k) sum_j k(m_r, m_j)``), which falls as they spread."""

    target: Target
    objective: Any
    rest: Any
    strength: float

    @property
    def batches(self):
        return self.target.batches

    def __call__(self, params, key, *, batch=None):
        target = self.target if batch is None else self.target.on_batch(batch)
        members = eqx.combine(params, self.rest)
        k = jax.tree.leaves(params)[0].shape[0]
        keys = jax.random.split(key, k)
        losses = eqx.filter_vmap(lambda q, kk: self.objective(q, target, kk)[0])(members, keys)
        if self.strength == 0:  # plain restarts side by side: no term, and no 0 * NaN below
            return jnp.mean(losses), None
        means = eqx.filter_vmap(lambda q: q.mean)(members)
        # Members on one point give a zero median bandwidth; exp(-0 / 0) was NaN, and the run
        # stopped on non-finite values (seen with XLA's optimisations off, where two members
        # fitted side by side met exactly). Any width gives a kernel of 1 between them.
        h = svgd_bandwidth(means)
        h = jnp.where(h > 0, h, 1.0)
        kern = jnp.exp(-_sq_dists(means, means) / (2.0 * h**2))
        repulsion = jnp.mean(jnp.log(jnp.mean(kern, axis=1)))
        return jnp.mean(losses) + self.strength * repulsion, None


@eqx.filter_jit
def _member_elbos(target, members, key, n: int):

    def one(q, kk):
        z, log_q = q.sample_and_log_prob(kk, n)
        return jnp.mean(log_density_rows(target, z) - log_q)

    k = jax.tree.leaves(eqx.filter(members, eqx.is_array))[0].shape[0]
    return eqx.filter_vmap(one)(members, jax.random.split(key, k))


def _sharing(members) -> np.ndarray:
    """How many members (itself included) sit within 2 of member r's own sds of its mean: a
    mode held by m members gets each of their weights divided by m, so it is not counted m
    times."""
    means = np.asarray(eqx.filter_vmap(lambda q: q.mean)(members), np.float64)
    sds = np.asarray(eqx.filter_vmap(lambda q: q.stddev)(members), np.float64)
    z = (means[None, :, :] - means[:, None, :]) / sds[:, None, :]  # [r, j, d]
    return (np.sqrt(np.mean(z**2, axis=2)) < 2.0).sum(axis=1)


@typing.no_type_check
def repulsive_ensemble(
    target: Target,
    q,
    k: int,
    *,
    key: jax.Array,
    strength: float = 10.0,
    polish: bool = True,
    radius: float = 2.0,
    objective=None,
    optimizer=None,
    max_steps: int = 20_000,
    progress: bool = True,
    stop=_MISSING,
) -> VIResult:
    """Fit ``k`` copies of the family ``q`` together, kept apart by a kernel repulsion between
    their means, and return them as one mixture (after "Repulsive Score Distillation for
    Diverse Sampling of Diffusion Models": a coupled variational approximation whose coupling
    is a repulsion regulariser on an ensemble).

    The loss is the members' mean loss (default: ``veil.ELBO()``) plus ``strength`` times
    ``(1/k) sum_r log (1/k) sum_j k(m_r, m_j)``, the log kernel density of each member's mean
    ``m_r`` among the members' (RBF kernel, SVGD's median heuristic over the means): the
    Stein-type repulsion that spreads the members instead of letting several settle in one
    mode, as independent restarts do. The default strength, 10 nats, is strong enough to push
    members over low barriers (see below). The members start at ``q`` with their means moved by
    Uniform(-radius, radius) noise (Stan's initialisation radius). The result's ``q`` is a
    :class:`veil.Mixture` of the fitted members weighted by ``exp(ELBO_r)`` (each member's
    ELBO from 512 draws: for members in separate modes, each mode's share of the mass),
    divided among the members that share a mode (means within 2 sds).
    ``strength=0`` gives plain restarts fitted side by side.

    The repulsion that moves members across a valley also biases them (measured on three
    modes of sd 0.7, 4 to 6 apart, ``k = 3``: strength 10 pushed each mean about 1.1 off its
    mode, strength 1 by 0.12); with ``polish`` (default) a second run without it lets each
    member settle at its basin's optimum. Measured on that target (BENCHMARKS.md section 20),
    six seeds: with strength 10 all three modes were found in 3 of 6 runs, independent fits
    side by side in 0 of 6.

    Trace, steps and skipped steps cover both runs; the stopping rule applies to each.

    Example:
        >>> import jax, jax.numpy as jnp, veil
        >>> def log_p(z):   # two modes, at -3 and +3
        ...     return jnp.logaddexp(-0.5 * jnp.sum((z - 3.0) ** 2), -0.5 * jnp.sum((z + 3.0) ** 2))
        >>> t = veil.Target.from_logdensity(log_p, dim=1)
        >>> res = veil.particles.repulsive_ensemble(t, veil.MeanField(1, init_loc=jnp.array([2.5])), 2,
        ...                                         key=jax.random.key(0), radius=0.5, progress=False)
        >>> sorted(round(float(m), 1) for m in res.q.components.loc[:, 0])   # one per mode
        [-3.0, 3.0]
    """
    from veil.fit import _ADAM_OPTIMIZER, _DEFAULT_OBJECTIVE

    if not isinstance(target, Target):
        raise TypeError(f"target must be a veil.Target, got {type(target).__name__}.")
    if not isinstance(q, Family) or isinstance(q, Mixture) or not hasattr(q, "loc"):
        raise TypeError(f"q must be a veil family with a location (MeanField, FullRank, LowRank), got {q!r}.")
    if q.dim != target.dim:
        raise ValueError(f"The family has dim={q.dim} but the target has dim={target.dim}.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2 (an ensemble), got {k!r}.")
    _check_key(key)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"strength must be a number >= 0, got {strength!r}.")
    max_steps = _check_positive_int("max_steps", max_steps)
    objective = _DEFAULT_OBJECTIVE if objective is None else objective
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a veil objective such as veil.ELBO(), got {objective!r}.")
    objective.check_family(q)
    optimizer = _ADAM_OPTIMIZER if optimizer is None else optimizer  # the components are stacked: no single location
    if stop is _MISSING:
        stop = StopRule(max_drift=2.0)  # the limit this was measured with (BENCHMARKS.md section 22)
    if stop is not None and not isinstance(stop, StopRule):
        raise TypeError(f"stop must be a veil.StopRule or None, got {stop!r}.")
    start_key, run_key, weight_key, diag_key = jax.random.split(key, 4)
    start = Mixture.around(q, k, key=start_key, radius=radius).components
    params = eqx.filter(start, eqx.is_inexact_array)
    rest = eqx.filter(start, eqx.is_inexact_array, inverse=True)
    out = driver.run(
        _EnsembleLoss(target, objective, rest, float(strength)), jax.tree.map(lambda x: x[None], params),
        optimizer, key=run_key, max_steps=max_steps, stop_rule=stop, progress=progress,
        description="ensemble",
    )
    wall = out.wall_time
    if polish and strength > 0:
        # Without the repulsion each member settles at its own basin's optimum: the spread
        # found above is kept (members do not leave their basins), its bias is not.
        first = out
        out = driver.run(
            _EnsembleLoss(target, objective, rest, 0.0), out.params, optimizer,
            key=jax.random.fold_in(run_key, 1), max_steps=max_steps, stop_rule=stop, progress=progress,
            description="polish",
        )
        wall += out.wall_time
        out = out._replace(traces=[np.concatenate([first.traces[0], out.traces[0]])],
                           num_steps=first.num_steps + out.num_steps,
                           skipped=first.skipped + out.skipped)
    members = eqx.combine(jax.tree.map(lambda x: x[0], out.params), rest)
    elbos = np.asarray(_member_elbos(target, members, weight_key, 512), np.float64)
    logits = np.where(np.isfinite(elbos), elbos - np.nanmax(elbos), -np.inf) - np.log(_sharing(members))
    fitted = Mixture([jax.tree.map(lambda x: x[i] if eqx.is_array(x) else x, members) for i in range(k)],
                     logits=jnp.asarray(np.maximum(logits, -1e4)))
    return VIResult.from_run(out, target, fitted, diag_key, wall_time=wall)


# ------------------------------------------------------------------------------ the result
@dataclasses.dataclass(eq=False, repr=False)
class ParticleResult(VIResult):
    """What :func:`run` returns: a :class:`veil.VIResult` whose ``q`` is the particles'
    :class:`veil.families.Empirical` distribution.

    ``draws()`` gives the particles themselves (constrained); ``draws(n, key=...)`` picks
    ``n`` of them with replacement. There is no density, so there is no k-hat or ELBO; the
    verdict reports the kernel Stein discrepancy (:attr:`ksd`) and the stopping reason. The
    trace is the mean ``-log p`` of 16 particles drawn at random each step (of all of them
    for gradient-free methods).
    """

    method: Any = None
    coordinates: Any = None  # the particles in the method's coordinates (see ParticleMethod)

    def __repr__(self) -> str:
        return (
            f"ParticleResult({type(self.method).__name__}, {self.q.num_particles} particles, "
            f"{self.num_steps} steps, stop_reason={self.stop_reason!r}, num_skipped={self.num_skipped})"
        )

    @property
    def particles(self) -> Float[Array, "n dim"]:
        """The particles in the target's coordinates (its unconstrained space; a mirrored
        method's constrained set)."""
        return self.q.particles

    @property
    def khat(self) -> float:
        """Not defined for particles (no density): NaN. See :attr:`ksd`."""
        return math.nan

    @property
    def elbo(self) -> float:
        """Not defined for particles (no density): NaN."""
        return math.nan

    def log_evidence(self, *, key, n=10_000, batch=10_000):
        raise TypeError(
            "Particles have no density, so they cannot be an importance-sampling proposal; fit "
            "a parametric family (veil.fit) to estimate the evidence."
        )

    @functools.cached_property
    def ksd(self) -> float:
        """Kernel Stein discrepancy of the particles from the target (IMQ kernel, see
        :func:`veil.diagnostics.kernel_stein_discrepancy`): zero only if they are
        distributed as the target; it needs no draws from it. With a minibatched target it
        uses the full data. For a mirrored method it is that of the dual particles from the
        dual density, the space where they move."""
        if not self.method.uses_gradients:
            return math.nan
        z = self.coordinates
        return float(kernel_stein_discrepancy(z, _log_density_and_scores(self.method, self.target, z)[1]))

    def draws(self, n: int | None = None, *, key: jax.Array | None = None) -> dict[str, jax.Array]:
        """The particles mapped to constrained space (``n=None``), or ``n`` of them picked
        uniformly with replacement with ``key``: a dict ``name -> [n, ...]``."""
        if n is None:
            x = self.particles
        else:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"n must be a positive integer or None, got {n!r}.")
            if key is None:
                raise TypeError("draws(n, key=...) needs a key to pick the particles; draws() gives them all.")
            x = self.q.sample(key, int(n))
        out = _constrained(self.target, x)
        _warn_nonfinite(out)
        return out

    def to_arviz(self, n: int | None = None, *, key: jax.Array | None = None):
        """An ``arviz.InferenceData``: the particles (or ``n`` picked, as in :meth:`draws`) as
        one chain in ``posterior``, each one's ``lp`` (log target) in ``sample_stats``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import arviz as az
        draws = self.draws(n, key=key)
        x = self.particles if n is None else self.q.sample(key, int(n))
        log_p = np.asarray(_log_density(self.target, x))
        return az.from_dict(posterior={k: np.asarray(v)[None] for k, v in draws.items()},
                            sample_stats={"lp": log_p[None]})

    def verdict(self) -> tuple[list[str], bool]:
        lines, ok = [], True
        if self.method.uses_gradients:
            lines.append(
                f"{self.q.num_particles} particles; kernel Stein discrepancy {self.ksd:.3g} (0 only at "
                "the target; compare runs, lower is closer). No k-hat: particles have no density."
            )
        else:
            lines.append(
                f"{self.q.num_particles} particles of a gradient-free method: no kernel Stein "
                "discrepancy (it needs the target's gradient) and no k-hat (no density)."
            )
        stop = self.stop_reason
        if isinstance(self.method, EKI) and stop == "max_steps":
            lines.append(
                f"Ran EKI's {self.num_steps} tempered steps, prior to posterior: exact for a linear "
                "forward model as the ensemble grows, a Gaussian-type approximation otherwise."
            )
            stop = "fixed"
        elif not self.method.averageable and stop == "max_steps":
            ok = False
            lines.append(
                f"Ran a fixed {self.num_steps} steps of {type(self.method).__name__}: its particles are "
                "draws of a Markov chain, and nothing here checks that the ensemble has reached "
                "equilibrium; compare with a longer run before trusting them."
            )
            stop = "fixed"
        return self._run_lines(lines, ok, self._subject, stop)

    _subject = "these particles"

    def _summary_draws(self):
        return jax.device_get(_constrained(self.target, self.particles))

    def _summary_header(self):
        return (
            f"veil particles: {type(self.method).__name__}, {self.q.num_particles} particles "
            f"(dim={self.q.dim}), {self.num_steps} steps, {self.wall_time:.2f} s"
        )

    def _nonfinite_line(self, bad):
        return f"{bad} particles hold non-finite values (the table leaves them out)."

    def _plot_draws(self):
        return _flat_columns(self._summary_draws())

    _loss_label = "mean −log p of the particles (16 at random for gradient methods)"

    def _plot_quality(self) -> str:
        return f"KSD {self.ksd:.3g}"


@eqx.filter_jit
def _log_density(target, x):
    return jax.vmap(target.log_density)(x)
