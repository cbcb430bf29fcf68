"""Predictive draws and ArviZ's model-comparison groups (issue 31, Deliver 6), checked on a
conjugate Gaussian model where the posterior, the predictive and leave-one-out are closed forms.

Model: y_i ~ N(mu, 1), i = 1..n, mu ~ N(m0, s0^2). The posterior is N(M, V) with
1/V = 1/s0^2 + n and M = V (m0/s0^2 + sum y); the posterior predictive of y_i is N(M, 1 + V);
leaving y_i out gives the same with n - 1 and the sum without y_i. A FullRank fit is exact here
(k-hat reads it), so every tolerance is Monte Carlo's, stated where it is used."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy import stats

import veil

N = 30
Y = np.asarray(0.2 + np.random.default_rng(1).standard_normal(N), np.float32)


def model(y=None, *, m0=0.0, s0=1.0, n=N):
    mu = numpyro.sample("mu", dist.Normal(m0, s0))
    numpyro.deterministic("two_mu", 2.0 * mu)
    with numpyro.plate("data", n):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def _posterior(y, m0, s0):
    v = 1.0 / (1.0 / s0**2 + len(y))
    return v * (m0 / s0**2 + np.sum(y)), v


def _exact_loo(y, m0, s0):
    y = np.asarray(y, np.float64)
    total = 0.0
    for i in range(len(y)):
        m, v = _posterior(np.delete(y, i), m0, s0)
        total += stats.norm.logpdf(y[i], m, np.sqrt(1.0 + v))
    return total


def _log_evidence(y, m0, s0):
    y = np.asarray(y, np.float64)
    cov = np.eye(len(y)) + s0**2 * np.ones((len(y), len(y)))
    return stats.multivariate_normal.logpdf(y, np.full(len(y), m0), cov)


def _fit(m0, s0, key):
    t = veil.Target.from_numpyro(model, jnp.asarray(Y), m0=m0, s0=s0)
    return veil.fit(t, veil.FullRank(1), key=key, progress=False)


@pytest.fixture(scope="module")
def good():
    return _fit(0.0, 1.0, jax.random.key(0))


def test_posterior_predictive_moments(good):
    # Replicates of y_i under 4000 draws: mean M (se sqrt((1 + V) / 4000) ~ 0.016; 4 se), variance
    # 1 + V (se of a variance ~ (1 + V) sqrt(2 / 4000) ~ 0.023; 4 se), the same for every i.
    m, v = _posterior(Y, 0.0, 1.0)
    rep = np.asarray(good.predictive(jax.random.key(1), num_samples=4000)["y"])
    assert rep.shape == (4000, N)
    assert np.all(np.abs(rep.mean(0) - m) < 4 * np.sqrt((1 + v) / 4000) + 0.01)  # + q's own error in M
    pooled_var = rep.var(0).mean()  # the columns share their mu draws: pooled, still ~1/sqrt(4000)
    assert abs(pooled_var - (1 + v)) < 4 * (1 + v) * np.sqrt(2 / 4000)
    # New inputs: three new observations, not the data.
    new = good.predictive(jax.random.key(2), num_samples=50, n=3)
    assert new["y"].shape == (50, 3) and new["two_mu"].shape == (50,)


def test_prior_predictive_moments():
    # y ~ N(m0, 1 + s0^2) a priori: with m0 = 1, s0 = 2, mean 1 (se sqrt(5 / 4000) ~ 0.035; 4 se).
    t = veil.Target.from_numpyro(model, jnp.asarray(Y), m0=1.0, s0=2.0)
    out = t.prior_predictive(jax.random.key(3), num_samples=4000)
    assert set(out) == {"mu", "two_mu", "y"} and out["y"].shape == (4000, N)
    assert abs(float(out["mu"].mean()) - 1.0) < 4 * np.sqrt(4 / 4000)
    assert abs(float(out["y"][:, 0].mean()) - 1.0) < 4 * np.sqrt(5 / 4000)
    np.testing.assert_allclose(np.asarray(out["two_mu"]), 2 * np.asarray(out["mu"]), rtol=1e-6)
    assert not np.allclose(np.asarray(out["y"][0]), Y)  # drawn, not the data


def test_arviz_groups_and_loo_against_the_closed_form(good):
    # az.loo on the fit's pointwise log likelihood: PSIS-LOO with 4000 exact-posterior draws
    # differs from the closed-form LOO by its Monte-Carlo error, ~0.01 nats per observation at
    # most here (k-hat small): 0.1 nats in total.
    import arviz as az

    idata = good.to_arviz(4000, key=jax.random.key(4))
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data", "sample_stats"):
        assert hasattr(idata, group), group
    assert idata.log_likelihood["y"].shape == (4, 1000, N)
    assert idata.posterior_predictive["y"].shape == (4, 1000, N)
    np.testing.assert_array_equal(idata.observed_data["y"].values, Y)
    # The pointwise log likelihood is each observation's own log density under each draw.
    mu = idata.posterior["mu"].values
    np.testing.assert_allclose(idata.log_likelihood["y"].values[..., 5],
                               stats.norm.logpdf(Y[5], mu, 1.0), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loo = az.loo(idata)
    assert loo.elpd_loo == pytest.approx(_exact_loo(Y, 0.0, 1.0), abs=0.1)


def test_compare_ranks_two_models_as_the_evidence_does(good):
    # A prior far from the data (mu ~ N(3, 0.3^2)) against a sensible one: the exact evidence
    # prefers the sensible one by tens of nats, and so must LOO through az.compare.
    import arviz as az

    bad = _fit(3.0, 0.3, jax.random.key(5))
    assert _log_evidence(Y, 0.0, 1.0) - _log_evidence(Y, 3.0, 0.3) > 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's notes and pandas' deprecations inside az.compare
        table = az.compare({"sensible": good.to_arviz(2000, key=jax.random.key(6)),
                            "far": bad.to_arviz(2000, key=jax.random.key(6))})
    assert list(table.index) == ["sensible", "far"]
    assert table.loc["far", "elpd_diff"] > 2 * table.loc["far", "dse"]


def test_model_parameters_are_used_at_their_fitted_values(key):
    # A learned observation scale: the predictive spread is the fitted sigma's.
    def scaled(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        sigma = numpyro.param("sigma", 1.0, constraint=dist.constraints.positive)
        with numpyro.plate("data", 200):
            numpyro.sample("y", dist.Normal(mu, sigma), obs=y)

    y = jnp.asarray(3.0 * np.random.default_rng(2).standard_normal(200), jnp.float32)
    res = veil.fit(veil.Target.from_numpyro(scaled, y), veil.MeanField(1), key=key, progress=False)
    sigma = float(res.params["sigma"])
    assert sigma == pytest.approx(float(jnp.std(y)), rel=0.05)  # the ML estimate, ~3
    rep = np.asarray(res.predictive(jax.random.key(7), num_samples=500)["y"])
    assert rep.std() == pytest.approx(sigma, rel=0.05)  # 1e5 values: se of an sd ~0.3%; + q's spread


def test_targets_without_a_model_say_what_to_use(key):
    t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=1)
    res = veil.fit(t, veil.MeanField(1), key=key, progress=False, max_steps=50, stop=None)
    with pytest.raises(NotImplementedError, match="no generative model to run forward"):
        res.predictive(key)
    with pytest.raises(NotImplementedError, match="runs a NumPyro model forward"):
        t.prior_predictive(key)
    assert not hasattr(res.to_arviz(40, key=key), "log_likelihood")
