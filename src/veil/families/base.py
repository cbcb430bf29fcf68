"""The family interface: an ``equinox.Module`` whose array fields are the variational parameters."""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

__all__ = ["Family", "MonteCarloMoments"]

_MOMENT_KEY = 20240229


class Family(eqx.Module):
    """Abstract variational family ``q_phi(z)`` on ``R^dim``.

    Concrete families are final ``equinox.Module`` classes. Their array fields are the
    parameters ``phi``; every constraint (positive scales, positive Cholesky diagonals) comes
    from the parameterisation (``exp`` of an unconstrained field), never from clipping, so any
    optax optimizer can update every field freely.

    ``sample`` and ``sample_and_log_prob`` are reparameterised: ``z = T_phi(eps)`` with ``eps``
    drawn independently of ``phi``, so gradients flow from ``z`` to ``phi``.
    """

    dim: eqx.AbstractVar[int]
    # Whether draws are differentiable in the parameters (path-wise estimators need it).
    reparameterized: ClassVar[bool] = True

    @abc.abstractmethod
    def sample_and_log_prob(
        self, key: PRNGKeyArray, n: int
    ) -> tuple[Float[Array, "n dim"], Float[Array, " n"]]:
        """``n`` reparameterised draws and their log densities under ``q``."""

    @abc.abstractmethod
    def log_prob(self, z: Float[Array, "... dim"]) -> Float[Array, "..."]:
        """``log q(z)``, batched over leading axes."""

    @property
    def noise_dim(self) -> int:
        """Dimension of the standard-normal noise ``eps`` that :meth:`transform_and_log_prob`
        maps to draws; only families defined by such a map (the Gaussians) have one."""
        raise NotImplementedError(
            f"{type(self).__name__} is not a transform of standard-normal noise, so it cannot use "
            "quasi-Monte Carlo or unscented base points; use the default i.i.d. draws."
        )

    def transform_and_log_prob(
        self, eps: Float[Array, "n noise"]
    ) -> tuple[Float[Array, "n dim"], Float[Array, " n"]]:
        """Draws ``z = T_phi(eps)`` from given standard-normal noise, and ``log q(z)``."""
        raise NotImplementedError(
            f"{type(self).__name__} is not a transform of standard-normal noise."
        )

    def sample_with_stopped_log_prob(
        self, key: PRNGKeyArray, n: int
    ) -> tuple[Float[Array, "n dim"], Float[Array, " n"]]:
        """``n`` reparameterised draws and ``log q(z)`` at *stopped* parameters: the pair
        that sticking-the-landing, DReG and sigma-point gradients use (the draws carry the
        path gradient to the parameters, ``log q`` only its gradient in ``z``). A family that
        can get that from the noise more cheaply than :meth:`log_prob` overrides this and
        :meth:`transform_with_stopped_log_prob`."""
        z = self.sample(key, n)
        return z, stop_gradient(self).log_prob(z)

    def transform_with_stopped_log_prob(
        self, eps: Float[Array, "n noise"]
    ) -> tuple[Float[Array, "n dim"], Float[Array, " n"]]:
        """As :meth:`sample_with_stopped_log_prob`, from given noise ``eps``."""
        z = self.transform_and_log_prob(eps)[0]
        return z, stop_gradient(self).log_prob(z)

    def whiten(self, z: Float[Array, "n dim"]) -> Float[Array, "n dim"]:
        """The noise ``eps`` with ``z = T_phi(eps)``: the inverse of
        :meth:`transform_and_log_prob`, for families whose noise has the dimension of ``z``."""
        raise NotImplementedError(
            f"{type(self).__name__} has no invertible map from noise of its own dimension."
        )

    def watched(self):
        """What ``veil.fit``'s stopping rule watches for drift (a pytree of arrays): by
        default the parameters themselves. A family whose parameters are not identified (a
        flow's network weights wander while its distribution stays put) returns summaries
        of its distribution instead."""
        return eqx.filter(self, eqx.is_inexact_array)

    def sample(self, key: PRNGKeyArray, n: int) -> Float[Array, "n dim"]:
        """``n`` reparameterised draws."""
        return self.sample_and_log_prob(key, n)[0]

    @property
    @abc.abstractmethod
    def mean(self) -> Float[Array, " dim"]:
        """Mean of ``q``."""

    @property
    @abc.abstractmethod
    def cov(self) -> Float[Array, "dim dim"]:
        """Covariance of ``q``."""

    @property
    def stddev(self) -> Float[Array, " dim"]:
        """Marginal standard deviations of ``q``."""
        return jax.numpy.sqrt(jax.numpy.diagonal(self.cov))


def stop_gradient(q: Family) -> Family:
    """The same family with every parameter behind ``lax.stop_gradient``."""
    return jax.tree.map(lambda x: jax.lax.stop_gradient(x) if eqx.is_array(x) else x, q)


@eqx.filter_jit
def _monte_carlo_moments(q):
    z = q.sample(jax.random.key(_MOMENT_KEY), q.moment_draws)
    return jax.numpy.mean(z, axis=0), jax.numpy.atleast_2d(jax.numpy.cov(z.T))


class MonteCarloMoments:
    """Mixin: ``mean`` and ``cov`` of a family without closed-form moments, as Monte-Carlo
    estimates from ``moment_draws`` draws with a fixed key (deterministic; standard error
    ``sd / sqrt(moment_draws)``), compiled once per family structure."""

    moment_draws: ClassVar[int] = 10_000

    @property
    def mean(self):
        return _monte_carlo_moments(self)[0]

    @property
    def cov(self):
        return _monte_carlo_moments(self)[1]
