"""Composite (per-block) families."""

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import veil

COUNTS = jnp.array([3.0, 5.0, 4.0, 6.0])
Y = jnp.array([0.8, 1.4, 1.1])


def model(counts, y):
    # lam: Gamma(2, 1) prior, Poisson counts -> posterior Gamma(2 + 18, 1 + 4).
    # mu: N(0, 1) prior, N(mu, 1) data -> posterior N(sum(y) / 4, 1 / 4).
    lam = numpyro.sample("lam", dist.Gamma(2.0, 1.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("c", dist.Poisson(lam), obs=counts)
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_blocks_compose_densities_and_moments(key):
    q = veil.Composite([veil.Gamma(2, init_scale=0.3), veil.FullRank(3, init_scale=0.5)])
    z, lq = q.sample_and_log_prob(key, 500)
    assert z.shape == (500, 5) and q.dim == 5
    np.testing.assert_allclose(lq, q.log_prob(z), rtol=1e-5, atol=1e-5)
    manual = q.blocks[0].log_prob(z[:, :2]) + q.blocks[1].log_prob(z[:, 2:])
    np.testing.assert_allclose(lq, manual, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(q.cov[:2, 2:], 0.0)
    np.testing.assert_allclose(jnp.diag(q.cov), q.stddev**2, rtol=1e-6)


@pytest.mark.parametrize(
    "est",
    # RSVI through a composite is the slow run's (12 s); RSVI fits alone are in the default
    # run (test_constrained_families), and so is the composite with STL.
    [veil.STL(), pytest.param(veil.RSVI(), marks=pytest.mark.slow)],
    ids=["stl", "rsvi"],
)
def test_per_site_families_fit_a_mixed_model(key, est):
    target = veil.Target.from_numpyro(model, COUNTS, Y)
    q = veil.Composite.for_target(target, {"lam": veil.Gamma})  # mu gets MeanField
    assert [type(b).__name__ for b in q.blocks] == ["Gamma", "MeanField"]
    res = veil.fit(target, q, key=key, objective=veil.ELBO(estimator=est), progress=False)
    gamma, normal = res.q.blocks
    # Both blocks are exact families for their conjugate posteriors; 5% / 0.03 are ~5x
    # the averaged iterates' noise measured on this model.
    np.testing.assert_allclose(gamma.concentration, [20.0], rtol=0.05)
    np.testing.assert_allclose(gamma.rate, [5.0], rtol=0.05)
    np.testing.assert_allclose(normal.loc, [float(Y.sum()) / 4], atol=0.03)
    np.testing.assert_allclose(normal.scale, [0.5], rtol=0.05)
    draws = res.draws(2000, key=key)
    assert float(draws["lam"].min()) > 0.0


def test_composite_misuse():
    target = veil.Target.from_numpyro(model, COUNTS, Y)
    with pytest.raises(ValueError, match="No site named"):
        veil.Composite.for_target(target, {"rate": veil.Gamma})
    with pytest.raises(ValueError, match="dim=2"):
        veil.Composite.for_target(target, {"lam": veil.Gamma(2)})
    with pytest.raises(ValueError, match="at least one"):
        veil.Composite([])
    with pytest.raises(TypeError, match="veil family"):
        veil.Composite([veil.MeanField(2), "gamma"])
