"""veil.Delta and veil.MAP (issue 31, Deliver 5): point estimates, checked where the mode is known
in closed form. The objective is deterministic (every draw is the point), so the tolerances are
the optimiser's, not Monte Carlo's: the stopping rule ends once the loss stops improving, within
about 1e-3 of the optimum on these unit-scale problems."""

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import veil
from tests.unchecked import unchecked

A, B = 3.0, 2.0  # a Gamma(3, 2): mode (a - 1) / b = 1; in log space (with the Jacobian) a / b = 1.5


def _gamma_model():
    numpyro.sample("s", dist.Gamma(A, B))


def test_map_of_a_conjugate_normal_posterior(key):
    # y_i ~ N(mu, 1), mu ~ N(0, 10^2): the posterior is Gaussian, its mode its mean
    # sum(y) / (n + 1/100). No transforms, so MAP() and MAP(jacobian=True) agree.
    y = jnp.array([0.3, 1.9, 1.2, 0.8, 2.4])

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    t = veil.Target.from_numpyro(model, y)
    exact = float(jnp.sum(y)) / (len(y) + 0.01)
    for objective in (veil.MAP(), veil.MAP(jacobian=True)):
        res = veil.fit(t, veil.Delta(1), key=key, objective=objective, progress=False)
        assert float(res.q.loc[0]) == pytest.approx(exact, abs=2e-3)
        assert res.converged


def test_the_jacobian_decides_where_the_point_is(key):
    # MAP() is the classical mode of p(s) (pm.find_MAP's, AutoDelta's, Stan optimize's):
    # (a - 1) / b. MAP(jacobian=True) and the ELBO with a Delta find the mode of the density of
    # u = log s, which carries the term log s: a / b.
    t = veil.Target.from_numpyro(_gamma_model)
    classic = veil.fit(t, veil.Delta(1), key=key, progress=False)
    assert float(classic.draws(1, key=key)["s"][0]) == pytest.approx((A - 1) / B, abs=2e-3)
    for objective in (veil.MAP(jacobian=True), veil.ELBO()):
        res = veil.fit(t, veil.Delta(1), key=key, objective=objective, progress=False)
        assert float(res.draws(1, key=key)["s"][0]) == pytest.approx(A / B, abs=2e-3)
    # The log joint is the log density less the log-Jacobian log s (at u = log s).
    u = jnp.array([0.4])
    assert float(t.log_density(u) - t.log_joint(u)) == pytest.approx(0.4, abs=1e-6)


def test_a_point_estimate_says_what_it_is(key):
    t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum((z - 2.0) ** 2), dim=2)
    res = veil.fit(t, veil.Delta(2), key=key, progress=False)
    with pytest.raises(veil.NotApplicable, match="point estimate"):
        _ = res.khat
    assert getattr(res, "khat", None) is None
    s = res.summary()
    assert s.trustworthy and "point estimate" in "\n".join(s.verdict)
    np.testing.assert_array_equal(s.table[:, 1], 0.0)  # sd: every draw is the point
    assert res.elbo == pytest.approx(0.0, abs=1e-5)  # the log density at the point: the maximum, 0
    draws = res.draws(5, key=key)["z"]
    np.testing.assert_array_equal(np.asarray(draws), np.broadcast_to(np.asarray(res.q.loc), (5, 2)))
    assert float(res.q.log_prob(res.q.loc)) == 0.0 and float(res.q.log_prob(res.q.loc + 1.0)) == -np.inf


def test_bad_input(key):
    t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)
    with pytest.raises(TypeError, match=r"veil.MAP\(\) fits a point estimate \(veil.Delta\), not MeanField"):
        veil.fit(t, veil.MeanField(2), key=key, objective=veil.MAP(), progress=False)
    with pytest.raises(ValueError, match=r"loc must have shape \(2,\)"):
        veil.Delta(2, loc=jnp.zeros(3))
    with pytest.raises(ValueError):
        unchecked(veil.Delta)(0)
