"""Targets: NumPyro adapter against hand-written densities, and bad input caught early."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.stats import norm

import veil


def scale_model(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = numpyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def test_from_numpyro_matches_hand_written_density():
    y = jnp.array([0.5, -1.0, 2.0])
    t = veil.Target.from_numpyro(scale_model, y)
    assert t.dim == 2 and t.names == ("mu", "sigma")
    z = jnp.array([0.3, -0.4])  # sigma = exp(-0.4) through NumPyro's bijection
    mu, log_sigma = z
    sigma = jnp.exp(log_sigma)
    # log p(mu) + log p(sigma) + log|d sigma / d log_sigma| + log-likelihood
    expected = (
        norm.logpdf(mu, 0, 2)
        + dist.LogNormal(0.0, 1.0).log_prob(sigma)
        + log_sigma
        + norm.logpdf(y, mu, sigma).sum()
    )
    np.testing.assert_allclose(t.log_density(z), expected, rtol=1e-6)
    c = t.to_constrained(z)
    np.testing.assert_allclose(c["sigma"], sigma, rtol=1e-6)
    np.testing.assert_allclose(c["mu"], mu)


def test_new_data_same_shapes_reuse_the_target_structure():
    t1 = veil.Target.from_numpyro(scale_model, jnp.zeros(3))
    t2 = veil.Target.from_numpyro(scale_model, jnp.ones(3))
    # Same static structure: jit caches treat them as the same program.
    assert jax.tree.structure(t1) == jax.tree.structure(t2)


def test_from_logdensity_names_and_identity_map():
    t = veil.Target.from_logdensity(lambda z: -jnp.sum(z**2), dim=3)
    assert t.names == ("z",)
    np.testing.assert_array_equal(t.to_constrained(jnp.arange(3.0))["z"], jnp.arange(3.0))


def test_nonscalar_log_density_is_rejected():
    with pytest.raises(ValueError, match="must return a scalar"):
        veil.Target.from_logdensity(lambda z: -(z**2), dim=3)


def test_wrong_dimension_is_rejected():
    def f(z):
        return -0.5 * z @ jnp.eye(4) @ z

    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        veil.Target.from_logdensity(f, dim=3)


@pytest.mark.parametrize("dim", [0, -2])
def test_nonpositive_dim_is_rejected(dim):
    with pytest.raises(ValueError, match="positive integer"):
        veil.Target.from_logdensity(lambda z: -jnp.sum(z**2), dim=dim)


def test_discrete_latent_site_is_named():
    def mixture(y=None):
        c = numpyro.sample("component", dist.Bernoulli(0.3))
        numpyro.sample("y", dist.Normal(c * 2.0, 1.0), obs=y)

    with pytest.raises(NotImplementedError, match="'component'"):
        veil.Target.from_numpyro(mixture, jnp.array(1.0))


def test_nan_in_data_is_rejected_and_data_untouched():
    y = jnp.array([0.5, jnp.nan, 2.0])
    y_copy = np.asarray(y).copy()
    with pytest.raises(ValueError, match=r"\[0\] holds 1 non-finite value\(s\).*the first at index 1\."):
        veil.Target.from_numpyro(scale_model, y)
    np.testing.assert_array_equal(np.asarray(y), y_copy)  # nothing the user gave is modified


def test_model_without_latent_sites_is_rejected():
    def observed_only(y=None):
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    with pytest.raises(ValueError, match="no latent"):
        veil.Target.from_numpyro(observed_only, jnp.array(0.0))
