"""Likelihood-weighted and beta-weighted ELBOs, and the target's likelihood split."""

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import veil

Y = jnp.array([1.0, 2.0, 0.5, 1.5])


def model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_numpyro_likelihood_is_the_observed_sites_log_density():
    t = veil.Target.from_numpyro(model, Y)
    z = jnp.array([0.3])
    np.testing.assert_allclose(t.log_likelihood(z), jnp.sum(dist.Normal(0.3, 1.0).log_prob(Y)), rtol=1e-6)
    # log density = log prior + log likelihood for this unconstrained model.
    np.testing.assert_allclose(t.log_density(z) - t.log_likelihood(z), dist.Normal(0, 1).log_prob(0.3), rtol=1e-6)


def test_weighted_elbo_is_the_elbo_of_the_tempered_target(key):
    t = veil.Target.from_numpyro(model, Y)
    q = veil.FullRank(1, init_loc=jnp.array([0.4]), init_scale=0.7)
    for k, b in ((2.0, 1.0), (1.0, 3.0), (0.5, 2.0)):
        loss, aux = veil.ELBO(likelihood_weight=k, beta=b)(q, t, key)

        def tempered(z, r=k / b):
            return t.log_density(z) + (r - 1.0) * t.log_likelihood(z)

        ref, _ = veil.ELBO()(q, tempered, key)  # same key, same draws
        np.testing.assert_allclose(loss, b * ref, rtol=1e-5)
        np.testing.assert_allclose(aux.bound, -loss, rtol=1e-6)
    plain = veil.ELBO(likelihood_weight=1.0, beta=1.0)(q, t, key)[0]
    np.testing.assert_allclose(plain, veil.ELBO()(q, t, key)[0], rtol=1e-7)


@pytest.mark.parametrize("k, b", [(2.0, 1.0), (1.0, 2.0)])
def test_weighted_fit_reaches_the_tempered_posterior(key, k, b):
    # Conjugate: with the likelihood raised to r = k / b, the posterior of mu is
    # N(r sum(y) / (1 + r n), 1 / (1 + r n)); a FullRank(1) family is exact. The tolerance is
    # 0.02, ~5x the iterate-averaging noise measured on this target, far below the sd (~0.33).
    r, n = k / b, len(Y)
    res = veil.fit(veil.Target.from_numpyro(model, Y), veil.FullRank(1), key=key,
                   objective=veil.ELBO(likelihood_weight=k, beta=b), progress=False)
    np.testing.assert_allclose(res.q.mean, [r * float(Y.sum()) / (1 + r * n)], atol=0.02)
    np.testing.assert_allclose(res.q.stddev, [(1 / (1 + r * n)) ** 0.5], rtol=0.05)


def test_plain_log_density_target_takes_a_likelihood(key):
    def log_lik(z):
        return jnp.sum(dist.Normal(z[0], 1.0).log_prob(Y))

    def log_joint(z):
        return dist.Normal(0.0, 1.0).log_prob(z[0]) + log_lik(z)

    t = veil.Target.from_logdensity(log_joint, dim=1, log_likelihood=log_lik)
    tn = veil.Target.from_numpyro(model, Y)
    q = veil.MeanField(1, init_scale=0.5)
    obj = veil.ELBO(likelihood_weight=3.0)
    np.testing.assert_allclose(obj(q, t, key)[0], obj(q, tn, key)[0], rtol=1e-5)


def test_weights_need_a_likelihood_and_positive_values(key):
    t = veil.Target.from_logdensity(lambda z: -jnp.sum(z**2), dim=1)
    with pytest.raises(ValueError, match="log_likelihood"):
        veil.ELBO(likelihood_weight=2.0)(veil.MeanField(1), t, key)
    with pytest.raises(ValueError, match="log likelihood"):
        t.log_likelihood(jnp.zeros(1))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="likelihood_weight"):
            veil.ELBO(likelihood_weight=bad)
        with pytest.raises(ValueError, match="beta"):
            veil.ELBO(beta=bad)
