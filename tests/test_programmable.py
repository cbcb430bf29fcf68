"""Programmable objectives: a user-written reduction gets every estimator, unbiased.

The objective is the combined bound of examples/combined_bound.py (CIWAE), not in veil's menu.
"""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import veil
from test_bounds import _assert_same_mean, _replicates
from test_objectives import A, M, Q, full_rank, log_p

_path = pathlib.Path(__file__).parent.parent / "examples" / "combined_bound.py"
_spec = importlib.util.spec_from_file_location("combined_bound", _path)
combined_bound = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(combined_bound)


class _Ciwae(veil.Objective):
    """The example's function as an objective value with a chosen estimator (for vmap)."""

    estimator: veil.Estimator

    def __call__(self, q, target, key):
        return combined_bound.ciwae_loss(q, target, key, self.estimator), None


@pytest.mark.parametrize("estimator", [veil.DReG(), pytest.param(veil.ScoreFunction(), marks=pytest.mark.slow)])
def test_user_reduction_gets_unbiased_gradients_from_every_estimator(key, estimator):
    # Reparam differentiates the user's reduction directly, so it is unbiased by
    # construction; DReG (derived by veil from the reduction's derivatives) and the
    # score-function estimator must agree with it in mean, within 5 standard errors per entry.
    k1, k2 = jax.random.split(key)
    n = 30_000
    _, ref = _replicates(_Ciwae(veil.Reparam()), Q, jax.random.split(k1, n))
    _, got = _replicates(_Ciwae(estimator), Q, jax.random.split(k2, n))
    _assert_same_mean(got, ref)


def test_user_reduction_reduces_to_the_menu_at_its_ends(key):
    # beta = 1 is the ELBO and beta = 0 the IWAE bound, on the same draws, to float tolerance.
    for beta, menu in ((1.0, veil.ELBO(num_samples=8, estimator=veil.DReG())),
                       (0.0, veil.IWAE(k=8))):
        mine, _ = veil.estimate(functools.partial(combined_bound.ciwae, beta=beta), Q, log_p, key,
                                8, veil.DReG())
        np.testing.assert_allclose(mine, -menu(Q, log_p, key)[0], rtol=1e-6)


def test_dreg_of_a_user_reduction_vanishes_at_the_exact_fit(key):
    exact = full_rank(M, jnp.asarray(A))
    _, g = _replicates(_Ciwae(veil.DReG()), exact, jax.random.split(key, 50))
    assert np.abs(g).max() < 1e-4  # zero in exact arithmetic; float32 round-off


def test_fit_takes_a_plain_function(key):
    t = veil.Target.from_logdensity(log_p, dim=3)
    res = veil.fit(t, veil.FullRank(3), key=key, objective=combined_bound.ciwae_loss,
                   progress=False)
    # Exact family: the optimum is the target. 0.05 is well above the averaged iterates'
    # noise (measured ~0.01) and far below the target's smallest sd (0.7).
    np.testing.assert_allclose(res.q.mean, M, atol=0.05)


def test_function_objective_must_return_a_scalar(key):
    t = veil.Target.from_logdensity(log_p, dim=3)

    def vector_loss(q, target, key):
        return q.mean

    with pytest.raises(ValueError, match="scalar"):
        veil.fit(t, veil.MeanField(3), key=key, objective=vector_loss, progress=False)


def test_estimate_validates_its_arguments(key):
    with pytest.raises(ValueError, match="n must be"):
        veil.estimate(jnp.mean, Q, log_p, key, 0)
    with pytest.raises(TypeError, match="estimator"):
        veil.estimate(jnp.mean, Q, log_p, key, 4, estimator="dreg")
