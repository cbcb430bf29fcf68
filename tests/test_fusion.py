"""Sub-posterior fusion (issue 5): consensus products of Gaussian shard fits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import veil
from veil.geometry.pathfinder import gaussian_to_family

N, D, S = 2000, 3, 4
NOISE = 1.0
PRIOR_SD = 2.0


def _data(seed=0):
    r = np.random.default_rng(seed)
    X = r.standard_normal((N, D)).astype(np.float32)
    y = (X @ np.array([1.0, -0.5, 0.25]) + NOISE * r.standard_normal(N)).astype(np.float32)
    return X, y


def _prior(z):
    return -0.5 * jnp.sum(z**2) / PRIOR_SD**2


def _lik(z, b):
    X, y = b
    return jnp.sum(-0.5 * (y - X @ z) ** 2 / NOISE**2)


def _posterior(X, y, prior_power=1.0):
    """Conjugate Bayesian linear regression with the prior raised to ``prior_power``:
    precision power/sd^2 I + X'X / noise^2, mean = cov X'y / noise^2."""
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    prec = prior_power / PRIOR_SD**2 * np.eye(D) + X.T @ X / NOISE**2
    cov = np.linalg.inv(prec)
    return cov @ X.T @ y / NOISE**2, cov


def test_product_of_exact_subposteriors_is_the_posterior():
    """An identity: with each shard's exact sub-posterior (prior^(1/S)), the consensus
    product is the full-data posterior (float32 parameters: 1e-5 relative)."""
    X, y = _data()
    parts = []
    for lo in range(0, N, N // S):
        m, c = _posterior(X[lo:lo + N // S], y[lo:lo + N // S], 1.0 / S)
        parts.append(gaussian_to_family(veil.FullRank(D), m, c))
    q = veil.fusion.consensus(parts)
    m, c = _posterior(X, y)
    np.testing.assert_allclose(q.mean, m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.cov, c, rtol=1e-4, atol=1e-9)
    assert isinstance(q, veil.FullRank)


@pytest.mark.slow  # fits every shard (~17 s); the exact-part tests cover the product
def test_fitted_shards_fuse_to_the_posterior():
    """FullRank fits of the 4 Gaussian sub-posteriors (each on its 500 rows only): the fused
    mean is within 0.01 posterior sd of the exact one and the sds within 1%. A FullRank fit
    of a Gaussian target is exact up to optimisation noise (STL's gradient noise vanishes at
    the optimum); seeds 0-2 gave max mean errors of 1e-4 to 7e-4 sd and sd errors < 1e-4, so
    the bounds leave a 10x margin."""
    X, y = _data()
    parts = veil.fusion.fit_shards(_prior, _lik, (X, y), veil.FullRank(D), dim=D, num_shards=S,
                                   key=jax.random.key(0), progress=False)
    assert len(parts) == S and all(p.target.num_data == N // S for p in parts)
    q = veil.fusion.consensus(parts)
    m, c = _posterior(X, y)
    sd = np.sqrt(np.diag(c))
    assert np.max(np.abs(np.asarray(q.mean) - m) / sd) < 0.01
    np.testing.assert_allclose(np.sqrt(np.diag(np.asarray(q.cov))), sd, rtol=0.01)
    # The same fits fused by sampling (importance resampling of each q_s, then SMC fusion):
    # the tolerances of test_smc_fusion_of_exact_subposterior_draws_is_the_posterior, since
    # each q_s is exact here and the importance weights are flat.
    fused = veil.fusion.fuse_fits(parts, key=jax.random.key(1), num_draws=2000)
    assert np.max(np.abs(np.asarray(fused.mean) - m) / sd) < 0.15
    np.testing.assert_allclose(np.sqrt(np.diag(np.asarray(fused.cov))), sd, rtol=0.10)


def test_mean_field_parts_give_a_mean_field():
    a = gaussian_to_family(veil.MeanField(2), jnp.array([0.0, 1.0]), jnp.diag(jnp.array([1.0, 4.0])))
    b = gaussian_to_family(veil.MeanField(2), jnp.array([2.0, 1.0]), jnp.diag(jnp.array([1.0, 4.0])))
    q = veil.fusion.consensus([a, b])
    assert isinstance(q, veil.MeanField)
    np.testing.assert_allclose(q.mean, [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(q.stddev, [np.sqrt(0.5), np.sqrt(2.0)], rtol=1e-6)


def test_bad_parts():
    flow = veil.flows.coupling(2, key=jax.random.key(0))
    with pytest.raises(TypeError, match="Gaussian fits.*got Flow"):
        veil.fusion.consensus([flow])
    with pytest.raises(ValueError, match="different dimensions"):
        veil.fusion.consensus([veil.MeanField(2), veil.MeanField(3)])
    with pytest.raises(ValueError, match="at least one"):
        veil.fusion.consensus([])
    with pytest.raises(ValueError, match="more than the 3 rows"):
        veil.fusion.shard_targets(_prior, _lik, (np.zeros((3, D)), np.zeros(3)), dim=D, num_shards=4)


# ------------------------------------------------------------------ sample-based fusion
def _exact_shard_draws(X, y, n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for lo in range(0, N, N // S):
        m, c = _posterior(X[lo:lo + N // S], y[lo:lo + N // S], 1.0 / S)
        out.append(rng.multivariate_normal(m, c, size=n).astype(np.float32))
    return out


def test_smc_fusion_of_exact_subposterior_draws_is_the_posterior():
    """2000 exact draws of each of the 4 Gaussian sub-posteriors, fused in a tree of 3
    fusions: the fused draws' mean is within 0.15 posterior sd of the exact mean and their sds
    within 10%. Why: every fusion keeps an ESS of about half its 2000 particles between
    resamplings, so the draws are worth at least ~500 independent ones: the Monte Carlo sd
    of a mean is ~0.045 sd (0.15 is 3.3 of them) and of an sd ~3% (10% is 3.3 of them).
    The trapezoid rule's bias is below that here (seeds 0-2: max mean error 0.09 sd, sd
    errors under 2.5%)."""
    X, y = _data()
    targets = veil.fusion.shard_targets(_prior, _lik, (X, y), dim=D, num_shards=S)
    out = veil.fusion.smc_fusion(targets, _exact_shard_draws(X, y, 2000), key=jax.random.key(0))
    m, c = _posterior(X, y)
    sd = np.sqrt(np.diag(c))
    assert out.draws.shape == (2000, D) and len(out.nodes) == S - 1
    assert out.nodes[-1].shards == (0, 1, 2, 3) and out.min_ess > 0.3
    assert np.max(np.abs(np.asarray(out.mean) - m) / sd) < 0.15
    np.testing.assert_allclose(np.sqrt(np.diag(np.asarray(out.cov))), sd, rtol=0.10)


def test_bad_fusion_input():
    X, y = _data()
    targets = veil.fusion.shard_targets(_prior, _lik, (X, y), dim=D, num_shards=2)
    good = [np.random.default_rng(i).normal(size=(50, D)).astype(np.float32) for i in range(2)]
    with pytest.raises(ValueError, match="one array of draws per target: got 2 targets and 1"):
        veil.fusion.smc_fusion(targets, good[:1], key=jax.random.key(0))
    with pytest.raises(ValueError, match="same number of draws"):
        veil.fusion.smc_fusion(targets, [good[0], good[1][:40]], key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"Sub-posterior 1: draws of shape \(50, 2\)"):
        veil.fusion.smc_fusion(targets, [good[0], good[1][:, :2]], key=jax.random.key(0))
    bad = good[1].copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="sub-posterior 1 hold NaN"):
        veil.fusion.smc_fusion(targets, [good[0], bad], key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"sub-posterior\(s\) \[1\] are degenerate \(2 distinct"):
        veil.fusion.smc_fusion(targets, [good[0], np.repeat(good[1][:2], 25, axis=0)], key=jax.random.key(0))
    with pytest.raises(TypeError, match="not a fit result"):
        veil.fusion.fuse_fits([veil.MeanField(D)], key=jax.random.key(0))
