"""What every particle method shares: its state, the Stein direction and the kernel
bandwidth, and the :class:`ParticleMethod` interface (``init``/``step``)."""

from __future__ import annotations

import abc
import collections.abc
import functools
import math
import typing
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from veil._config import cheap_branches
from veil.kernels import RBF, Kernel, _sq_dists
from veil.loop.kernel import all_finite, keep_if
from veil.target import Target


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

    Examples:
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
    a CPU, by a sort elsewhere. Measured (``benchmarks/studies/bandwidth.py``,
    docs/benchmarks/mirrored-and-natural-gradient-stein.md): XLA's
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

    Examples:
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
    """A rule that moves particles: a direction ``phi`` and the move along it.

    Subclasses define :meth:`direction`, and :meth:`init_move` and :meth:`move` (an optax
    transformation of ``-phi`` for the gradient methods, :class:`OptaxMethod`; the direction
    itself for the gradient-free ensembles); :meth:`init`, :meth:`step` and :func:`run` are
    shared.
    """

    @abc.abstractmethod
    def direction(
        self, target: Target, x: Float[Array, "n dim"], key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Float[Array, "n dim"]]:
        """``(report, phi)``: a scalar the run reports (its trace) and the ascent direction."""

    @abc.abstractmethod
    def init_move(self, z: Float[Array, "n dim"]) -> Any:
        """The state the move carries between steps (an optimizer's moments), for particles ``z``."""

    @abc.abstractmethod
    def move(self, z: Float[Array, "n dim"], move_state: Any, phi: Float[Array, "n dim"], scale) -> tuple[Any, Any]:
        """The particles moved along ``phi``, the move scaled by ``scale`` (the stopping
        rule's step-size factor), and the move's new state."""

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
        return ParticleState(z, self.init_move(z), target)

    def step(self, key: PRNGKeyArray, state: ParticleState) -> tuple[ParticleState, StepInfo]:
        """One move of every particle. A step whose report or direction is not finite is
        not taken (the particles and the move's state stay as they were), and says so."""
        report, phi = self.direction(state.target, state.particles, key)
        ok = all_finite(report, phi)
        z, move_state = keep_if(ok, lambda a: self.move(*a, phi, 1.0), (state.particles, state.opt_state))
        return ParticleState(z, move_state, state.target), StepInfo(report, ok)


class OptaxMethod(ParticleMethod):
    """A particle method whose move is an optax transformation (its ``optimizer``) of ``-phi``
    (a descent direction, as optax expects): AdaGrad for SVGD, coin betting for Coin SVGD."""

    @property
    @abc.abstractmethod
    def optimizer(self) -> optax.GradientTransformation:
        """The optax transformation applied to ``-phi``."""

    def init_move(self, z):
        return self.optimizer.init(z)

    def move(self, z, move_state, phi, scale):
        updates, move_state = self.optimizer.update(-phi, move_state, z)
        return z + scale * updates, move_state


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


def _check_kernel(kernel):
    if kernel is not None and not isinstance(kernel, Kernel):
        raise TypeError(
            f"kernel must be None (RBF with the median heuristic) or a veil.kernels.Kernel, got {kernel!r}."
        )


def _initial_particles(key, method: ParticleMethod, target: Target, n_particles: int, init) -> jax.Array:
    """Starting particles in the method's coordinates (checked: count, shape, finite, apart,
    inside the method's set)."""
    _check_particle_count(n_particles)
    if init is None:
        z = _draw_start(key, method, target, int(n_particles))
        method.check_init(np.asarray(method.positions(z)))
        return z
    return method.coordinates(jnp.asarray(_checked_init(method, target, n_particles, init)))


def _check_particle_count(n_particles) -> None:
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
    # "all rows equal" cost 0.4-0.9 ms of a one-step run's ~4 ms on CPU (docs/benchmarks/coin-svgd-uncapped-bets.md).
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
    GPU, where they cost 0.3-0.8 ms of a one-step run's ~5 ms (docs/benchmarks/particle-run-fixed-cost-gpu.md)."""
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

