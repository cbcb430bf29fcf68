"""One battery of property tests over every registered family (STYLE.md, habit 9)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import veil

D = 4


def _perturbed(q, key):
    """The family with every parameter moved off its initial value, so tests see a generic
    member (non-zero off-diagonals, unequal scales)."""
    leaves, tree = jax.tree.flatten(q)
    keys = jax.random.split(key, len(leaves))
    new = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, new)


FAMILIES = {
    "MeanField": lambda: veil.MeanField(D),
    "FullRank": lambda: veil.FullRank(D),
    "LowRank": lambda: veil.LowRank(D, 2),
}


@pytest.fixture(params=list(FAMILIES))
def family(request, key):
    return _perturbed(FAMILIES[request.param](), key)


def test_shapes(family, key):
    z, lq = family.sample_and_log_prob(key, 7)
    assert z.shape == (7, D) and lq.shape == (7,)
    assert family.sample(key, 3).shape == (3, D)
    assert family.log_prob(z).shape == (7,)
    assert family.log_prob(z[0]).shape == ()
    assert family.mean.shape == (D,) and family.cov.shape == (D, D)


def test_log_prob_matches_sampling_density(family, key):
    # The same density computed two ways (from eps, from z): equal to float32 round-off.
    z, lq = family.sample_and_log_prob(key, 64)
    np.testing.assert_allclose(lq, family.log_prob(z), rtol=1e-5, atol=1e-4)


def test_log_prob_matches_numpyro_distribution(family, key):
    z = family.sample(key, 16)
    np.testing.assert_allclose(family.log_prob(z), family.distribution.log_prob(z), rtol=1e-5, atol=1e-4)


def test_sample_moments_match_mean_and_cov(family, key):
    # n = 200k draws: the MC standard error of a mean is sd/sqrt(n) <= 0.01 * sd for these
    # scales; 5 standard errors (false-failure rate ~1e-6 per entry) gives the tolerance.
    n = 200_000
    z = np.asarray(family.sample(key, n), np.float64)
    sd = np.sqrt(np.diag(family.cov))
    np.testing.assert_allclose(z.mean(0), family.mean, atol=float(5 * sd.max() / np.sqrt(n)))
    # Covariance entries have sd <= sqrt(2) * var / sqrt(n); same 5-sigma rule.
    tol = 5 * np.sqrt(2) * float(sd.max() ** 2) / np.sqrt(n)
    np.testing.assert_allclose(np.cov(z.T), family.cov, atol=tol)


def test_cov_is_positive_definite(family):
    assert np.all(np.linalg.eigvalsh(np.asarray(family.cov, np.float64)) > 0)


def test_stopped_log_prob_draws_match_the_generic_form(family, key):
    # sample_with_stopped_log_prob must equal "draw, then log_prob at stopped parameters" in
    # value and in the gradient it passes to the parameters through the draws (FullRank
    # reuses the noise to save a triangular solve). Both sides are the same quantity in
    # float32 arithmetic along different paths: round-off ~1e-6 relative, tolerance 1e-4.
    from veil.family import stop_gradient

    def loss(q, use_method):
        if use_method:
            z, lq = q.sample_with_stopped_log_prob(key, 8)
        else:
            z = q.sample(key, 8)
            lq = stop_gradient(q).log_prob(z)
        # A log-target with curvature, so the z-gradient does not cancel against log q's.
        return jnp.mean(-0.5 * jnp.sum((z - 1.0) ** 2 * jnp.arange(1, D + 1), -1) - lq), lq

    (v1, lq1), g1 = jax.value_and_grad(loss, has_aux=True)(family, True)
    (v0, lq0), g0 = jax.value_and_grad(loss, has_aux=True)(family, False)
    np.testing.assert_allclose(lq1, lq0, rtol=1e-5, atol=1e-4)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))


def test_scale_operators_are_the_draws_jacobian_and_its_transpose(family, key):
    # z = loc + A eps is linear in eps, so A is exactly the Jacobian of the draw in the noise
    # (jax.jacobian, any eps), scale_matvec(u) = A u and scale_rmatvec(g) = A^T g. Same float32
    # quantities along different paths: tolerance 1e-5 relative.
    eps0 = jax.random.normal(key, (family.noise_dim,))
    A = jax.jacobian(lambda e: family.transform_and_log_prob(e[None])[0][0])(eps0)
    u = jax.random.normal(jax.random.fold_in(key, 1), (family.noise_dim,))
    g = jax.random.normal(jax.random.fold_in(key, 2), (D,))
    np.testing.assert_allclose(family.scale_matvec(u), A @ u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(family.scale_rmatvec(g), A.T @ g, rtol=1e-5, atol=1e-6)


def test_log_prob_gradient_matches_finite_differences(family, key, grads_match_finite_differences):
    # Central differences with Richardson extrapolation (conftest: tolerance 2e-3 relative),
    # the first 6 entries of every parameter.
    z = family.sample(key, 1)[0]
    leaves, tree = jax.tree.flatten(family)

    def f(flat_leaves):
        return family.__class__.log_prob(jax.tree.unflatten(tree, flat_leaves), z)

    grads_match_finite_differences(f, leaves, entries=6)


def test_invalid_construction():
    with pytest.raises(ValueError, match="dim"):
        veil.MeanField(0)
    with pytest.raises(TypeError, match="dim"):
        veil.FullRank(2.5)
    with pytest.raises(ValueError, match="rank"):
        veil.LowRank(3, 5)
    with pytest.raises(ValueError, match="init_loc"):
        veil.FullRank(3, init_loc=jnp.zeros(2))
    with pytest.raises(ValueError, match="init_scale"):
        veil.MeanField(3, init_scale=-1.0)


def test_initial_scale_and_location():
    q = veil.FullRank(3, init_loc=jnp.array([1.0, 2.0, 3.0]), init_scale=0.5)
    np.testing.assert_allclose(q.mean, [1, 2, 3])
    np.testing.assert_allclose(q.cov, 0.25 * np.eye(3), rtol=1e-6)
    lr = veil.LowRank(5, 2)
    assert float(jnp.abs(lr.cov_factor).max()) > 0  # W = 0 would be a stationary point
