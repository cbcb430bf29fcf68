"""Expectations under a Gaussian from gradients alone, shared by variational Newton
(:mod:`veil.geometry.newton`) and the mean-drift check of a fit's result (:mod:`veil.result`).

For ``q = N(mu, L L^T)`` and points ``z = mu + L eps``, Stein's lemma gives
``E[grad log p(z) eps^T] = E[hess log p(z)] L``: the expected Hessian from gradients, without
second derivatives. The points are orthogonal antithetic pairs (a stochastic spherical-radial
rule, Genz & Monahan 1998), each exactly ``N(0, I)``; see :mod:`veil.geometry.newton`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp


@eqx.filter_jit
def _estimate(target, mu, chol, key):
    """What one iteration needs from ``2 dim`` orthogonal antithetic points of
    ``N(mu, chol chol^T)``: the mean gradient, the cross moment ``E[g eps^T]`` and the points'
    second moment (the expected Hessian is solved from these on the host), whether every
    value and gradient was finite, the ELBO estimate with its standard error, and the mean
    gradient's covariance."""
    d = mu.shape[0]
    k_rot, k_rad = jax.random.split(key)
    q, r = jnp.linalg.qr(jax.random.normal(k_rot, (d, d)))
    q = q * jnp.sign(jnp.diagonal(r))  # Haar-distributed rotation (sign fix of the QR)
    radii = jnp.sqrt(jax.random.chisquare(k_rad, d, (d,)))
    half = (q * radii).T  # rows r_i Q e_i: each exactly N(0, I)
    eps = jnp.concatenate([half, -half])
    values, grads = jax.vmap(jax.value_and_grad(target.log_density))(mu + eps @ chol.T)
    finite = jnp.all(jnp.isfinite(grads)) & jnp.all(jnp.isfinite(values))
    # The ELBO of this Gaussian from the same points, free with the gradients: the mean of
    # log p plus the entropy. Its standard error from the antithetic pairs' means (one
    # independent-ish value per direction).
    entropy = 0.5 * d * (1.0 + jnp.log(2 * jnp.pi)) + jnp.sum(jnp.log(jnp.abs(jnp.diagonal(chol))))
    pairs = 0.5 * (values[:d] + values[d:])
    elbo, elbo_se = jnp.mean(values) + entropy, jnp.std(pairs) / jnp.sqrt(d)
    g_mean = jnp.mean(grads, axis=0)
    # E[g eps^T] = E[hess] L E[eps eps^T]: solve with the points' own second moment, which
    # for these points is Q diag(r^2 / d) Q^T, not exactly I.
    cross = grads.T @ eps / eps.shape[0]
    second = eps.T @ eps / eps.shape[0]
    # The mean gradient's noise: its covariance from the pairs' mean gradients (the pairs
    # are exchangeable, each an unbiased estimate of E_q[grad log p]).
    g_pairs = 0.5 * (grads[:d] + grads[d:])
    g_cov = jnp.cov(g_pairs, rowvar=False).reshape(d, d) / d
    return g_mean, cross, second, finite, elbo, elbo_se, g_cov
