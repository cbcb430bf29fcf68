"""``Empirical``: the equally weighted point masses a particle method leaves behind."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from veil.family import Family

__all__ = ["Empirical"]


class Empirical(Family):
    """``q = (1/n) sum_i delta(z - x_i)``: the distribution a set of particles stands for.

    Draws pick particles uniformly with replacement. Its moments are the particles' own
    (``cov`` divides by ``n``: it is the covariance of the point masses, not an estimate from
    them). It has no density, so density-based diagnostics (PSIS k-hat, the ELBO, importance
    weights) do not exist for it; :class:`veil.particles.ParticleResult` reports the kernel
    Stein discrepancy instead.

    Examples:
        >>> import jax.numpy as jnp, veil
        >>> q = veil.families.Empirical(jnp.array([[0.0, 1.0], [2.0, 3.0]]))
        >>> q.mean.tolist(), q.dim
        ([1.0, 2.0], 2)
    """

    particles: Float[Array, "n dim"]
    dim: int = eqx.field(static=True)
    reparameterized = False

    def __init__(self, particles):
        if jnp.ndim(particles) != 2 or jnp.shape(particles)[0] < 1:
            raise ValueError(
                f"particles must be a [n, dim] array with n >= 1, got shape {jnp.shape(particles)}."
            )
        self.particles = jnp.asarray(particles)
        self.dim = int(self.particles.shape[1])

    @property
    def num_particles(self) -> int:
        return self.particles.shape[0]

    def sample(self, key: PRNGKeyArray, n: int) -> Float[Array, "n dim"]:
        """``n`` particles picked uniformly with replacement."""
        return self.particles[jax.random.randint(key, (n,), 0, self.num_particles)]

    def sample_and_log_prob(self, key, n):
        raise TypeError(
            "An empirical distribution (a set of particles) has no density, so it has no log q: "
            "use sample(), or fit a parametric family (veil.fit) where a density is needed."
        )

    def log_prob(self, z):
        raise TypeError(
            "An empirical distribution (a set of particles) has no density, so it has no log q."
        )

    def watched(self):
        return eqx.filter(self, eqx.is_inexact_array)

    @property
    def mean(self) -> Float[Array, " dim"]:
        return jnp.mean(self.particles, axis=0)

    @property
    def cov(self) -> Float[Array, "dim dim"]:
        centred = self.particles - self.mean
        return centred.T @ centred / self.num_particles
