"""ELBO and its estimators against closed forms on Gaussian targets."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import veil

D = 3
A = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.5, 0.7]])
S = A @ A.T  # target covariance
P = jnp.asarray(np.linalg.inv(S))
M = jnp.array([1.0, -2.0, 0.5])


def log_p(z):  # unnormalised: log Z = 0.5 log det(2 pi S)
    r = z - M
    return -0.5 * r @ P @ r


def full_rank(loc, L):
    """A FullRank member with Cholesky factor L."""
    s = jnp.diag(L)
    unit = L / s[:, None]
    q = veil.FullRank(len(loc), init_loc=loc)
    q = eqx.tree_at(lambda q: q.log_scale, q, jnp.log(s))
    return eqx.tree_at(lambda q: q.unit_tril, q, (unit - jnp.eye(len(loc))) * math.sqrt(len(loc)))


def closed_form_elbo(q):
    C, mu = q.cov, q.mean
    r = mu - M
    e_log_p = -0.5 * (jnp.trace(P @ C) + r @ P @ r)
    entropy = 0.5 * jnp.linalg.slogdet(2 * jnp.pi * jnp.e * C)[1]
    return e_log_p + entropy


Q = full_rank(jnp.array([0.5, -1.0, 0.0]), jnp.array([[0.8, 0, 0], [0.2, 1.1, 0], [0.1, -0.3, 0.6]]))


def test_full_rank_helper_builds_requested_factor():
    np.testing.assert_allclose(Q.scale_tril, [[0.8, 0, 0], [0.2, 1.1, 0], [0.1, -0.3, 0.6]], atol=1e-6)


def _bounds_and_grads(objective, q, keys):
    def one(k):
        (loss, aux), g = eqx.filter_value_and_grad(
            lambda q: objective(q, log_p, k), has_aux=True
        )(q)
        return aux.bound, g

    return jax.vmap(one)(keys)


def test_elbo_estimate_is_unbiased(key):
    # 20,000 replicates of a 4-draw estimate; the tolerance is 5 Monte-Carlo standard errors
    # of the replicate mean (false-failure rate ~6e-7).
    keys = jax.random.split(key, 20_000)
    bounds, _ = _bounds_and_grads(veil.ELBO(num_samples=4), Q, keys)
    bounds = np.asarray(bounds, np.float64)
    se = bounds.std(ddof=1) / math.sqrt(len(bounds))
    assert abs(bounds.mean() - float(closed_form_elbo(Q))) < 5 * se


def test_estimators_share_values_and_are_unbiased_for_the_gradient(key):
    keys = jax.random.split(key, 20_000)
    exact = jax.grad(closed_form_elbo)(Q)
    stl_b, stl_g = _bounds_and_grads(veil.ELBO(num_samples=4, estimator=veil.STL()), Q, keys)
    rep_b, rep_g = _bounds_and_grads(veil.ELBO(num_samples=4, estimator=veil.Reparam()), Q, keys)
    # Same draws, same bound: the estimators differ only in where gradients flow.
    np.testing.assert_allclose(stl_b, rep_b, rtol=1e-5, atol=1e-4)
    for g in (stl_g, rep_g):
        for leaf, ex in zip(jax.tree.leaves(g), jax.tree.leaves(exact)):
            leaf = -np.asarray(leaf, np.float64)  # loss = -bound
            se = leaf.std(0, ddof=1) / math.sqrt(leaf.shape[0])
            # 5 standard errors per entry, plus float32 round-off for entries with ~0 variance.
            assert np.all(np.abs(leaf.mean(0) - np.asarray(ex)) <= 5 * se + 1e-5)


def test_stl_has_zero_variance_at_the_exact_fit(key):
    exact = full_rank(M, jnp.asarray(A))
    keys = jax.random.split(key, 200)
    _, stl_g = _bounds_and_grads(veil.ELBO(num_samples=1, estimator=veil.STL()), exact, keys)
    _, rep_g = _bounds_and_grads(veil.ELBO(num_samples=1, estimator=veil.Reparam()), exact, keys)
    stl = np.concatenate([np.ravel(x) for x in jax.tree.leaves(stl_g)])
    rep_sd = max(float(np.std(x, 0).max()) for x in jax.tree.leaves(rep_g))
    # Exactly zero in exact arithmetic; 1e-4 allows float32 round-off in the triangular solve.
    assert np.abs(stl).max() < 1e-4
    assert rep_sd > 0.1  # the plain estimator keeps its score-term noise at the optimum


def test_elbo_of_exact_fit_is_log_normaliser(key):
    exact = full_rank(M, jnp.asarray(A))
    loss, aux = veil.ELBO(num_samples=16)(exact, log_p, key)
    log_z = 0.5 * np.linalg.slogdet(2 * np.pi * S)[1]
    # log p - log q is constant when q is the target: every draw gives log Z exactly.
    np.testing.assert_allclose(aux.log_weights, log_z, rtol=1e-5)
    np.testing.assert_allclose(-loss, log_z, rtol=1e-5)


def test_num_samples_validated():
    import pytest

    with pytest.raises(ValueError, match="num_samples"):
        veil.ELBO(num_samples=0)
