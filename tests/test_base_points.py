"""Quasi-Monte Carlo (Sobol) and unscented base points for the Gaussian families."""

import math

import jax
import numpy as np
import pytest

import veil
from test_bounds import _replicates
from test_objectives import Q, closed_form_elbo, log_p


def test_unscented_elbo_is_exact_for_a_gaussian_target(key):
    # log w is quadratic in z when target and q are Gaussian, and sigma points integrate
    # quadratics exactly: value and gradient equal the closed form up to float32 round-off.
    # (Compiled once per family rather than run op by op: the same numbers, a third of the time.)
    obj = veil.ELBO(estimator=veil.Unscented())
    loss = jax.jit(lambda q: obj(q, log_p, key)[0])
    np.testing.assert_allclose(-loss(Q), closed_form_elbo(Q), rtol=1e-5)
    g = jax.jit(jax.grad(loss))(Q)
    exact = jax.grad(closed_form_elbo)(Q)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(exact)):
        np.testing.assert_allclose(-np.asarray(a), np.asarray(b), atol=2e-4)
    for family in (veil.MeanField(3, init_scale=0.5), veil.LowRank(3, 1, init_scale=0.5)):
        np.testing.assert_allclose(-loss(family), closed_form_elbo(family), rtol=1e-5)


@pytest.mark.parametrize("estimator", [veil.STL, veil.Reparam, veil.DReG])
def test_sobol_elbo_is_unbiased_and_less_variable(key, estimator):
    # 4,000 replicates of a 16-point estimate: the mean matches the closed form within 5
    # standard errors; randomised QMC's variance is well below i.i.d. draws' (measured ~7x
    # lower for value and gradient on this smooth target; the test asks for 2x).
    keys = jax.random.split(key, 4000)
    qmc = veil.ELBO(num_samples=16, estimator=estimator(noise=veil.Sobol()))
    iid = veil.ELBO(num_samples=16, estimator=estimator())
    b_qmc, g_qmc = _replicates(qmc, Q, keys)
    b_iid, g_iid = _replicates(iid, Q, keys)
    se = b_qmc.std(ddof=1) / math.sqrt(len(b_qmc))
    assert abs(b_qmc.mean() - float(closed_form_elbo(Q))) < 5 * se
    assert b_qmc.var() < 0.5 * b_iid.var()
    assert g_qmc.var(0).sum() < 0.5 * g_iid.var(0).sum()


def test_sobol_points_are_marginally_standard_normal(key):
    pts = jax.vmap(lambda k: veil.Sobol().normal(k, 8, 3))(jax.random.split(key, 5000))
    pts = np.asarray(pts).reshape(-1, 3)
    assert np.all(np.isfinite(pts))
    # 40,000 points: se of the mean 0.005, of the variance ~0.007.
    np.testing.assert_allclose(pts.mean(0), 0.0, atol=0.03)
    np.testing.assert_allclose(pts.var(0), 1.0, atol=0.04)


def test_base_point_misuse_is_refused(key):
    with pytest.raises(ValueError, match="power-of-two"):
        veil.ELBO(num_samples=6, estimator=veil.STL(noise=veil.Sobol()))(Q, log_p, key)
    with pytest.raises(ValueError, match="sigma points"):
        veil.IWAE(k=4, estimator=veil.Unscented())
    with pytest.raises(ValueError, match="kappa"):
        veil.Unscented(kappa=-1.0)


def test_fit_with_sobol_and_unscented(key):
    t = veil.Target.from_logdensity(log_p, dim=3)
    for est in (veil.STL(noise=veil.Sobol()), veil.Unscented()):
        res = veil.fit(t, veil.FullRank(3), key=key, objective=veil.ELBO(estimator=est), progress=False)
        # Exact family: the optimum is the target; 0.05 as in the other recovery tests.
        np.testing.assert_allclose(res.q.mean, [1.0, -2.0, 0.5], atol=0.05)
