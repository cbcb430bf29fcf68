"""Discrete latents summed out by NumPyro's enumeration (issue 31, Deliver 4), checked on a
Gaussian mixture against EM, whose fixed points are exactly the stationary points of the
marginal posterior of the means and weights (the assignments summed out)."""

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import veil

K = 3
PRIOR_MEAN = np.array([-1.0, 0.0, 1.0])
_rng = np.random.default_rng(0)
X = np.concatenate([_rng.normal(-4, 1, 100), _rng.normal(0, 1, 120), _rng.normal(5, 1, 80)]).astype(np.float32)


def gmm(x):
    w = numpyro.sample("w", dist.Dirichlet(jnp.ones(K)))
    mu = numpyro.sample("mu", dist.Normal(jnp.asarray(PRIOR_MEAN, jnp.float32), 10.0).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        c = numpyro.sample("c", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[c], 1.0), obs=x)


def _em_step(w, mu):
    """One EM step for the MAP of (w, mu) under the flat Dirichlet and the N(m0, 10^2) priors."""
    lr = np.log(w) - 0.5 * (X[:, None] - mu) ** 2
    r = np.exp(lr - lr.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    nk = r.sum(0)
    return nk / len(X), ((r * X[:, None]).sum(0) + PRIOR_MEAN / 100) / (nk + 1 / 100)


def test_the_assignments_are_summed_out():
    t = veil.Target.from_numpyro(gmm, jnp.asarray(X))
    assert t.dim == (K - 1) + K and t.enum_dim is not None and "c" not in t.names
    # The log density is the marginal one: at a point, log p(w, mu) + sum_i log sum_k w_k N(x_i; mu_k, 1)
    # plus the simplex's log-Jacobian (checked through log_joint, which leaves it out).
    z = jnp.asarray(np.random.default_rng(1).normal(size=t.dim), jnp.float32)
    v = t.to_constrained(z)
    w, mu = np.asarray(v["w"], np.float64), np.asarray(v["mu"], np.float64)
    mix = np.log(np.sum(w * np.exp(-0.5 * (X[:, None] - mu) ** 2) / np.sqrt(2 * np.pi), axis=1)).sum()
    prior = float(dist.Dirichlet(jnp.ones(K)).log_prob(v["w"])) + float(
        dist.Normal(jnp.asarray(PRIOR_MEAN, jnp.float32), 10.0).to_event(1).log_prob(v["mu"]))
    assert float(t.log_joint(z)) == pytest.approx(mix + prior, rel=1e-5)


def test_map_is_an_em_fixed_point(key):
    # veil's MAP (the assignments enumerated) must be a fixed point of EM: one EM step from it
    # moves nothing by more than the optimiser's float32 tolerance (measured 2e-6).
    t = veil.Target.from_numpyro(gmm, jnp.asarray(X))
    res = veil.fit(t, veil.Delta(t.dim), key=key, progress=False)
    d = res.draws(1, key=key)
    w, mu = np.asarray(d["w"][0], np.float64), np.asarray(d["mu"][0], np.float64)
    w_em, mu_em = w, mu
    for _ in range(200):  # EM run on from veil's point: it stays there
        w_em, mu_em = _em_step(w_em, mu_em)
    np.testing.assert_allclose(w, w_em, atol=1e-4)
    np.testing.assert_allclose(mu, mu_em, atol=1e-3)
    assert np.allclose(np.sort(mu), [-4, 0, 5], atol=0.4)  # the three clusters, in some order
    # Posterior predictive draws: the assignments are drawn forward, not enumerated.
    assert res.predictive(key, num_samples=7)["x"].shape == (7, len(X))


def test_a_count_without_finite_support_is_fitted_by_the_score_function(key):
    # n ~ Poisson(5), y_j ~ N(n, 1): n cannot be summed out (no finite support), so it is a
    # latent of the target (a count held as a float) and a veil.Poisson family fits it, by the
    # score-function estimator with its leave-one-out baseline, and veil says so. The best
    # Poisson q has the rate maximising the ELBO, computed here by summing over k = 0..79
    # (the mass beyond is < 1e-20): 6.734. Tolerance: the score-function fit's noise where the
    # stopping rule ends (measured 0.02%), 2% allowed; the ELBO within 0.1 nats.
    import warnings

    from scipy import optimize, stats

    y = jnp.array([7.3, 8.1, 6.6])

    def counts(y):
        n = numpyro.sample("n", dist.Poisson(5.0))
        numpyro.sample("y", dist.Normal(n, 1.0), obs=y)

    t = veil.Target.from_numpyro(counts, y)
    assert t.dim == 1 and t.discrete_sites == ("n",)
    ks = np.arange(80)
    log_p = stats.poisson.logpmf(ks, 5.0) + stats.norm.logpdf(np.asarray(y)[:, None], ks, 1.0).sum(0)
    assert float(t.log_density(jnp.array([7.0]))) == pytest.approx(log_p[7], abs=1e-4)

    def neg_elbo(log_rate):
        lq = stats.poisson.logpmf(ks, np.exp(log_rate))
        return -np.sum(np.exp(lq) * (log_p - lq))

    best = optimize.minimize_scalar(neg_elbo, bounds=(0.0, 4.0), method="bounded")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = veil.fit(t, veil.Poisson(1, init_rate=3.0), key=key, progress=False)
    assert any("score-function estimator" in str(w.message) for w in caught)
    assert float(res.q.rate[0]) == pytest.approx(np.exp(best.x), rel=0.02)
    assert res.elbo == pytest.approx(-best.fun, abs=0.1)
    draws = np.asarray(res.draws(50, key=key)["n"])
    assert np.all(draws == np.round(draws)) and draws.min() >= 0


def test_an_enumeration_too_large_is_refused():
    def many(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        total = mu
        for i in range(12):
            total = total + numpyro.sample(f"c{i}", dist.Categorical(jnp.ones(10) / 10))
        with numpyro.plate("data", 100):
            numpyro.sample("y", dist.Normal(total, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"needs a table of about 1e\+14 numbers .* more than veil builds"):
        veil.Target.from_numpyro(many, jnp.zeros(100))
