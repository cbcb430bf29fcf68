"""Gradient estimators: where gradients flow when a Monte-Carlo objective is differentiated.

An estimator turns ``(q, log_density, key, n)`` into :class:`Draws`: draws ``z`` and the log
weights ``log w = log p(z) - log q(z)`` whose gradient with respect to the family's parameters
is the estimator's choice. Objectives only reduce log weights (mean for the ELBO, log-mean-exp
for importance-weighted bounds), so an objective and an estimator compose freely.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from veil.families.base import Family, stop_gradient

__all__ = ["Estimator", "Reparam", "STL", "Draws"]


class Draws(NamedTuple):
    """What an estimator hands to an objective: draws and their log densities."""

    z: Float[Array, "n dim"]
    log_p: Float[Array, " n"]
    log_q: Float[Array, " n"]

    @property
    def log_weights(self) -> Float[Array, " n"]:
        """``log p(z) - log q(z)``: importance log weights of ``q`` against the target."""
        return self.log_p - self.log_q


class Estimator(eqx.Module):
    """Abstract gradient estimator; concrete ones are small immutable values."""

    @abc.abstractmethod
    def draws(
        self, q: Family, log_density: Callable, key: PRNGKeyArray, n: int
    ) -> Draws:
        """``n`` draws with gradients flowing as the estimator decides."""


class Reparam(Estimator):
    """The reparameterisation ("path-wise") estimator.

    ``z = T_phi(eps)`` and ``log q_phi(z)`` both depend on ``phi``, so the gradient of
    ``E[log p(z) - log q_phi(z)]`` includes the score term ``E[grad_phi log q_phi(z)]``, which
    is zero in expectation but not per sample.

    References:
        Kingma & Welling (2014), Auto-Encoding Variational Bayes;
        Rezende, Mohamed & Wierstra (2014), Stochastic Backpropagation and Approximate
        Inference in Deep Generative Models.
    """

    def draws(self, q, log_density, key, n):
        z, log_q = q.sample_and_log_prob(key, n)
        return Draws(z, jax.vmap(log_density)(z), log_q)


class STL(Estimator):
    """Sticking the landing: the path-wise gradient without the score term.

    ``log q`` is evaluated with stopped parameters, ``log q_{stop(phi)}(T_phi(eps))``, which
    removes the zero-mean score term ``grad_phi log q_phi(z)`` from each sample's gradient. The
    estimator stays unbiased, and when ``q`` equals the target its variance is exactly zero,
    because ``log p(z) - log q(z)`` is then constant in ``z``.

    References:
        Roeder, Wu & Duvenaud (2017), Sticking the Landing: Simple, Lower-Variance Gradient
        Estimators for Variational Inference.
    """

    def draws(self, q, log_density, key, n):
        z = q.sample(key, n)
        log_q = stop_gradient(q).log_prob(z)
        return Draws(z, jax.vmap(log_density)(z), log_q)
