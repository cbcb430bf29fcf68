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

    with pytest.raises(ValueError, match="only latent site\\(s\\) 'component' are discrete"):
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


# ---------------------------------------------------------------- arrays a log density closes over
def _closure_target(n=20_000, d=20, **kw):
    """A logistic-regression density closing over X (n*d*4 bytes: 1.6 MB by default, above
    the 1 MiB hoisting threshold) and y."""
    r = np.random.default_rng(0)
    X = jnp.asarray(r.standard_normal((n, d), dtype=np.float32))
    y = jnp.asarray((r.random(n) < 0.5).astype(np.float32))

    def loglik(z):
        f = X @ z
        return jnp.sum(y * f - jnp.logaddexp(0.0, f))

    def logp(z):
        return loglik(z) - 0.5 * jnp.sum(z**2)

    return logp, loglik, X


def test_large_closed_over_arrays_become_program_inputs():
    logp, loglik, X = _closure_target()
    t = veil.Target.from_logdensity(logp, dim=20, log_likelihood=loglik)
    z = jnp.linspace(-0.5, 0.5, 20)
    # The same computation: the jaxpr is evaluated with the arrays as inputs. The value is
    # equal exactly; the gradient to a few ulps (X as a program input rather than a constant
    # may be reduced in another order: 1 ulp on one entry at XLA's optimisation level 0).
    np.testing.assert_array_equal(t.log_density(z), logp(z))
    np.testing.assert_allclose(jax.grad(t.log_density)(z), jax.grad(logp)(z), rtol=1e-6)
    np.testing.assert_array_equal(t.log_likelihood(z), loglik(z))
    zs = jnp.stack([z, -z, 2 * z])
    np.testing.assert_allclose(jax.vmap(t.log_density)(zs), jax.vmap(logp)(zs), rtol=1e-6)
    # The compiled program no longer carries X: its text is far smaller than X's 1.6 MB
    # (embedded, the constant's digits alone are several MB of text).
    text = jax.jit(lambda tt, z: tt.log_density(z)).lower(t, z).as_text()
    assert len(text) < X.nbytes / 20
    embedded = jax.jit(logp).lower(z).as_text()
    assert len(embedded) > X.nbytes  # what the hoisting avoids
    # Checkpoint fingerprints name the user's function, not the wrapper.
    assert t.fn.__qualname__ == logp.__qualname__


def test_hoisted_density_is_reused_and_small_closures_stay_as_written():
    logp, _, _ = _closure_target()
    t1 = veil.Target.from_logdensity(logp, dim=20)
    t2 = veil.Target.from_logdensity(logp, dim=20)
    # One wrapper for the same function over the same arrays: the second fit's compiled
    # program is the first's (static fields equal).
    assert t1.fn is t2.fn and jax.tree.structure(t1) == jax.tree.structure(t2)
    small = jnp.ones(10)

    def f(z):
        return -0.5 * jnp.sum((z - small) ** 2)

    assert veil.Target.from_logdensity(f, dim=10).fn is f  # 40 bytes: embedding is cheaper


def test_hoisted_density_called_at_another_dtype_runs_the_function_as_written():
    logp, _, _ = _closure_target()
    t = veil.Target.from_logdensity(logp, dim=20)
    z = jnp.linspace(-0.5, 0.5, 20)
    np.testing.assert_allclose(t.log_density(z.astype(jnp.bfloat16)), logp(z.astype(jnp.bfloat16)))


def test_a_fit_on_a_large_closure_matches_the_same_fit_written_with_a_small_one():
    logp, _, X = _closure_target()
    t = veil.Target.from_logdensity(logp, dim=20)
    # The same density with everything embedded (hoisting off by a higher threshold).
    import veil.target.core as vt

    old, vt._HOIST_BYTES = vt._HOIST_BYTES, 1 << 62
    try:
        embedded = veil.Target.from_logdensity(lambda z: logp(z), dim=20)
    finally:
        vt._HOIST_BYTES = old
    assert embedded.data is None
    fit = lambda tt: veil.fit(tt, veil.MeanField(20), key=jax.random.key(3), max_steps=50,  # noqa: E731
                              stop=None, progress=False)
    a, b = fit(t), fit(embedded)
    # Same key, same arithmetic up to XLA's choice of fusion (constants can be folded).
    np.testing.assert_allclose(a.q.mean, b.q.mean, rtol=1e-4, atol=1e-5)

