"""Gradient-free ensemble methods for inverse problems: ensemble Kalman inversion (EKI) and
affine-invariant Langevin dynamics (ALDI)."""

from __future__ import annotations

import functools
import typing

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from veil._checks import check_positive as _check_positive
from veil.target import Target
from veil.particles.base import ParticleMethod


# ------------------------------------------------------------------ gradient-free ensembles
class InverseProblem(eqx.Module):
    """A Bayesian inverse problem with a black-box forward model: ``y = G(x) + e``,
    ``e ~ N(0, diag(noise_sd^2))``, prior ``x ~ N(prior_mean, diag(prior_sd^2))``.

    ``forward`` maps one parameter vector ``[dim]`` to predicted observations ``[m]``; the
    gradient-free methods (:class:`EKI`, :class:`ALDI`) only evaluate it (it may wrap a
    simulator through ``jax.pure_callback``). ``target`` is the posterior as a
    :class:`veil.Target` (what :func:`run` reports and summarises; other methods may use it
    if ``forward`` is differentiable).

    Examples:
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

    def init_move(self, z):
        return ()  # the move carries nothing between steps

    def move(self, z, move_state, phi, scale):
        """The direction is the move itself (an ensemble Kalman update, a Langevin step)."""
        return z + scale * phi, move_state

    def log_density_fn(self, target):
        raise TypeError(f"{type(self).__name__} does not differentiate the target.")

    def prior_draws(self, key, n):
        return self.problem.prior_mean + self.problem.prior_sd * jax.random.normal(key, (n, self.problem.prior_mean.shape[0]))




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

    Examples:
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

    Examples:
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
