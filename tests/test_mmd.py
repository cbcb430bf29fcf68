"""MMD against its closed form between Gaussians, kernels, and sums of objectives."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import veil
from veil.kernels import IMQ, RBF


def _expected_rbf(mean, cov, h):
    """E exp(-|u|^2 / (2 h^2)) for u ~ N(mean, cov)."""
    d = len(mean)
    a = np.eye(d) + cov / h**2
    return np.linalg.det(a) ** -0.5 * math.exp(-0.5 * mean @ np.linalg.solve(h**2 * np.eye(d) + cov, mean))


def test_mmd_estimate_is_unbiased_for_the_closed_form(key):
    # q = N(m1, diag s1^2), reference N(m2, diag s2^2), RBF with h = 1.5: MMD^2 in closed form
    # from three Gaussian expectations. 4,000 replicates; 5 standard errors.
    m1, s1 = np.array([0.3, -0.2]), np.array([0.8, 1.2])
    m2, s2 = np.array([-0.4, 0.5]), np.array([1.0, 0.7])
    q = veil.MeanField(2, init_loc=jnp.asarray(m1, jnp.float32))
    q = eqx.tree_at(lambda q: q.log_scale, q, jnp.log(jnp.asarray(s1, jnp.float32)))
    ref = dist.Normal(jnp.asarray(m2, jnp.float32), jnp.asarray(s2, jnp.float32)).to_event(1)
    h = 1.5
    exact = (_expected_rbf(np.zeros(2), 2 * np.diag(s1**2), h) + _expected_rbf(np.zeros(2), 2 * np.diag(s2**2), h)
             - 2 * _expected_rbf(m1 - m2, np.diag(s1**2 + s2**2), h))
    mmd = veil.MMD(ref, kernel=RBF(h), num_samples=16)
    vals = np.asarray(jax.vmap(lambda k: mmd(q, None, k)[0])(jax.random.split(key, 4000)), np.float64)
    se = vals.std(ddof=1) / math.sqrt(len(vals))
    assert abs(vals.mean() - exact) < 5 * se
    assert exact > 0.01  # the distributions differ: the check is not trivially about zero


@pytest.mark.slow  # a whole fit (8 s); the default run keeps MMD's exactness and gradient checks
def test_fit_to_mmd_alone_matches_the_reference(key):
    # MMD with a characteristic kernel is zero only at q = reference: a MeanField fit to the
    # MMD alone recovers the reference's mean and sds. Tolerances 0.1 / 15%: the MMD's
    # gradient is weak near its minimum (quadratic in the mismatch), so the fit is looser
    # than an ELBO fit; measured errors are below half of these.
    ref = veil.MeanField(2, init_loc=jnp.array([1.0, -1.0]), init_scale=0.5)
    t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)  # unused by MMD
    res = veil.fit(t, veil.MeanField(2), key=key, objective=veil.MMD(ref, num_samples=64),
                   progress=False)
    np.testing.assert_allclose(res.q.mean, [1.0, -1.0], atol=0.1)
    np.testing.assert_allclose(res.q.stddev, [0.5, 0.5], rtol=0.15)


def test_sums_of_objectives_are_weighted_sums_with_split_keys(key):
    log_p = lambda z: -0.5 * jnp.sum(z**2)  # noqa: E731
    q = veil.MeanField(2, init_scale=0.5)
    a, b = veil.ELBO(), veil.IWAE(k=4)
    total = a + 0.5 * b
    k1, k2 = jax.random.split(key)
    np.testing.assert_allclose(total(q, log_p, key)[0], a(q, log_p, k1)[0] + 0.5 * b(q, log_p, k2)[0], rtol=1e-6)
    # Sums flatten and weights multiply.
    triple = 2.0 * (a + b) + veil.MMD(veil.MeanField(2, init_scale=1.0))
    assert triple.weights == (2.0, 2.0, 1.0) and len(triple.terms) == 3


@pytest.mark.slow  # a full fit (9 s); the sum's value is checked above in the default run
def test_a_sum_of_objectives_fits(key):
    log_p = lambda z: -0.5 * jnp.sum(z**2)  # noqa: E731
    res = veil.fit(veil.Target.from_logdensity(log_p, dim=2), veil.MeanField(2), key=key,
                   objective=veil.ELBO() + 0.1 * veil.MMD(veil.MeanField(2, init_scale=1.0)),
                   progress=False)
    np.testing.assert_allclose(res.q.mean, 0.0, atol=0.05)  # both terms agree on N(0, I)


def test_kernels_and_bad_input():
    x = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    k = RBF(1.0)(x, x)
    np.testing.assert_allclose(jnp.diag(k), 1.0)
    np.testing.assert_allclose(k[0, 1], math.exp(-0.5), rtol=1e-6)
    np.testing.assert_allclose(IMQ(1.0)(x, x)[0, 2], 1.0 / 5.0, rtol=1e-6)
    assert np.all(np.linalg.eigvalsh(np.asarray(RBF().resolve(x)(x, x))) > -1e-6)  # PSD
    with pytest.raises(ValueError, match="bandwidth"):
        RBF(-1.0)
    with pytest.raises(ValueError, match="num_samples"):
        veil.MMD(veil.MeanField(2), num_samples=1)
    with pytest.raises(TypeError, match="reference"):
        veil.MMD("normal")
    with pytest.raises(TypeError):
        veil.ELBO() + 3.0
