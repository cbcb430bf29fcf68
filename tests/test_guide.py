"""veil.Guide (issue 31, Deliver 3): a NumPyro guide program as a veil family. Its draws and its
log density must be one distribution (checked exactly), it must reach the same optimum as the
equivalent veil family, and a guide that does not match its model is an error before compiling.

Model: y_i ~ N(mu, s), mu ~ N(0, 10), s ~ HalfNormal(2). Guide: mu ~ N(loc, scale),
s ~ LogNormal(a, b): in veil's unconstrained coordinates (mu, log s) that is exactly a
MeanField Gaussian, so both fits target the same optimum."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import veil

Y = jnp.array([1.0, 2.0, 3.0, 2.5, 1.7, 2.2, 0.9, 1.8])


def model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    s = numpyro.sample("s", dist.HalfNormal(2.0))
    numpyro.sample("y", dist.Normal(mu, s), obs=y)


def guide(y):
    loc = numpyro.param("loc", 0.0)
    scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
    numpyro.sample("mu", dist.Normal(loc, scale))
    a = numpyro.param("a", 0.0)
    b = numpyro.param("b", 0.5, constraint=dist.constraints.positive)
    numpyro.sample("s", dist.LogNormal(a, b))


@pytest.fixture(scope="module")
def target():
    return veil.Target.from_numpyro(model, Y)


def test_draws_and_density_are_one_distribution(target):
    # log q of a draw from sample_and_log_prob and from log_prob agree (float32 round-off), and
    # both are the Gaussian density with the same parameters in (mu, log s): the LogNormal's
    # log density plus log s (the Jacobian of s = exp(u)) is the Normal's density of u.
    g = veil.Guide(guide, target)
    z, lq = jax.jit(lambda g: g.sample_and_log_prob(jax.random.key(0), 64))(g)
    np.testing.assert_allclose(np.asarray(g.log_prob(z)), np.asarray(lq), rtol=1e-5, atol=1e-5)
    normal = jax.scipy.stats.norm.logpdf(z[:, 0], 0.0, 1.0) + jax.scipy.stats.norm.logpdf(z[:, 1], 0.0, 0.5)
    np.testing.assert_allclose(np.asarray(normal), np.asarray(lq), rtol=1e-5, atol=1e-5)


def test_same_optimum_as_the_equivalent_family(target, key):
    # Both fits end where the stopping rule finds the ELBO flat, within their SGD noise (measured:
    # means 0.04 sd apart, sds 4%): means within 0.15 q-sd, sds within 10%.
    res = veil.fit(target, veil.Guide(guide, target), key=key, progress=False)
    ref = veil.fit(target, veil.MeanField(2), key=key, progress=False)
    assert res.converged and ref.converged
    sd = np.asarray(ref.q.stddev)
    p = res.q.constrained_params()
    got_mean = np.array([float(p["loc"]), float(p["a"])])
    got_sd = np.array([float(p["scale"]), float(p["b"])])
    assert np.all(np.abs(got_mean - np.asarray(ref.q.mean)) < 0.15 * sd)
    assert np.all(np.abs(got_sd / sd - 1) < 0.1)
    assert np.isfinite(res.khat) and res.draws(5, key=key)["s"].shape == (5,)


def test_other_objectives_and_estimators_apply(target, key):
    # IWAE with DReG gradients needs draws and log q only: the guide gives both. The IWAE
    # optimum differs from the ELBO's, but mu's location stays at the posterior mean (the data's
    # mean, pulled by less than 0.01 by the prior): within 0.2 of it.
    res = veil.fit(target, veil.Guide(guide, target), key=key, progress=False,
                   objective=veil.IWAE(8, estimator=veil.DReG()))
    assert float(res.q.constrained_params()["loc"]) == pytest.approx(float(jnp.mean(Y)), abs=0.2)


def test_a_guide_that_does_not_match_its_model(target):
    def extra(y):
        guide(y)
        numpyro.sample("tau", dist.Normal(numpyro.param("t", 0.0), 1.0))

    def missing(y):
        numpyro.sample("mu", dist.Normal(numpyro.param("loc", 0.0), 1.0))

    def no_params(y):
        numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("s", dist.LogNormal(0.0, 1.0))

    def outside(y):
        numpyro.sample("mu", dist.Normal(0.0, numpyro.param("scale", -1.0, constraint=dist.constraints.positive)))
        numpyro.sample("s", dist.LogNormal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"samples site\(s\) 'tau' that the model does not have"):
        veil.Guide(extra, target)
    with pytest.raises(ValueError, match=r"does not sample the model's latent site\(s\) 's'"):
        veil.Guide(missing, target)
    with pytest.raises(ValueError, match="no numpyro.param site"):
        veil.Guide(no_params, target)
    with pytest.raises(ValueError, match="'scale' starts at .* outside its constraint"):
        with numpyro.validation_enabled(False):
            veil.Guide(outside, target)
    plain = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)
    with pytest.raises(TypeError, match="needs the veil.Target.from_numpyro"):
        veil.Guide(guide, plain)
