"""Pathfinder: the quasi-Newton algebra exactly, the algorithm statistically, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import veil
from veil.geometry.pathfinder import (
    Gaussian,
    gaussian_from_lbfgs,
    gaussian_to_family,
    inverse_hessian_factors,
    update_diagonal,
)

MU = jnp.array([0.0, 1.0, 2.0, 3.0])
COV = jnp.array(
    [[2.0, 0.5, 0.0, 0.0], [0.5, 1.0, 0.3, 0.0], [0.0, 0.3, 0.5, 0.0], [0.0, 0.0, 0.0, 3.0]]
)
PREC = jnp.linalg.inv(COV)


def _gaussian_log_p(z):
    return -0.5 * (z - MU) @ PREC @ (z - MU)


# One target object for the whole module: Pathfinder's program compiles once per target
# function and number of paths, and compiling it (nested while loops) dominates these tests.
TARGET = veil.Target.from_logdensity(_gaussian_log_p, dim=4)


def pairs(key, d=6, m=4):
    """Curvature pairs of a random SPD quadratic (``y = A s``, so ``s.y > 0``) and a positive
    diagonal."""
    k1, k2, k3 = jax.random.split(key, 3)
    a = jax.random.normal(k1, (d, d))
    a = a @ a.T + d * jnp.eye(d)
    s = jax.random.normal(k2, (m, d))
    return s, s @ a, jnp.exp(0.3 * jax.random.normal(k3, (d,)))


def bfgs_inverse(alpha, s, y):
    """Dense BFGS inverse-Hessian recursion from ``diag(alpha)``, the definition the compact
    form must reproduce."""
    h = jnp.diag(alpha)
    for si, yi in zip(s, y):
        rho = 1.0 / (si @ yi)
        v = jnp.eye(len(alpha)) - rho * jnp.outer(yi, si)
        h = v.T @ h @ v + rho * jnp.outer(si, si)
    return h


@pytest.mark.parametrize("valid", [[True] * 4, [False, False, True, True], [False] * 4])
def test_compact_form_is_the_bfgs_recursion(key, valid):
    s, y, alpha = pairs(key)
    valid = jnp.array(valid)
    s_buf, y_buf = jnp.where(valid[:, None], s, 0.0), jnp.where(valid[:, None], y, 0.0)
    b, g = inverse_hessian_factors(alpha, s_buf, y_buf, valid)
    expected = bfgs_inverse(alpha, s[valid], y[valid])
    # float32 algebra on O(1) entries: a few ulps times the condition of R.
    np.testing.assert_allclose(jnp.diag(alpha) + b @ g @ b.T, expected, rtol=1e-4, atol=1e-5)


def test_diagonal_update_is_the_scaled_bfgs_diagonal(key):
    s, y, alpha = pairs(key)
    s, y = s[0], y[0]
    tau = jnp.sum(alpha * y**2) / (y @ s)  # Oren-Luenberger scaling of diag(1/alpha)
    b0 = tau * jnp.diag(1.0 / alpha)
    b1 = b0 - jnp.outer(b0 @ s, b0 @ s) / (s @ b0 @ s) + jnp.outer(y, y) / (y @ s)
    np.testing.assert_allclose(1.0 / update_diagonal(alpha, s, y), jnp.diag(b1), rtol=1e-4)


def test_factored_gaussian_density_draws_and_covariance(key):
    s, y, alpha = pairs(key)
    x, grad = jnp.arange(6.0), jnp.linspace(-1, 1, 6)
    eps = jax.random.normal(key, (50, 6))

    @jax.jit  # one compiled program rather than op by op: a third of the time
    def compute(s, y, alpha, eps):
        gauss = gaussian_from_lbfgs(x, grad, alpha, s, y, jnp.ones(4, bool))
        b, g = inverse_hessian_factors(alpha, s, y, jnp.ones(4, bool))
        h = jnp.diag(alpha) + b @ g @ b.T
        z, log_q = gauss.transform_and_log_prob(eps)
        reference = dist.MultivariateNormal(gauss.loc, covariance_matrix=h).log_prob(z)
        # The draw map is linear in eps with Jacobian A; A A^T must be the covariance exactly.
        jac = jax.jacobian(lambda e: gauss.transform_and_log_prob(e[None])[0][0])(eps[0])
        return gauss.cov, gauss.loc, h, log_q, reference, gauss.log_prob(z), jac

    cov, loc, h, log_q, reference, log_prob, jac = compute(s, y, alpha, eps)
    np.testing.assert_allclose(cov, h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loc, x + h @ grad, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(log_q, reference, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(log_prob, log_q, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(jac @ jac.T, h, rtol=1e-4, atol=1e-5)


def test_finds_a_gaussian_target_and_resamples_it(key):
    pf = veil.pathfinder(TARGET, key=key)
    assert pf.num_paths == 4 and np.isfinite(np.asarray(pf.paths.elbo)).all()
    # ELBO of any Gaussian <= log Z = 0.5 log det(2 pi COV), with equality at the target.
    log_z = 0.5 * float(jnp.linalg.slogdet(2 * jnp.pi * COV)[1])
    assert pf.elbo <= log_z + 0.3  # 0.3: a few se of a 25-draw estimate near the optimum
    assert pf.elbo > log_z - 0.5
    assert pf.khat < 0.5
    z = pf.draws(4000, key=jax.random.key(1))["z"]
    sd = jnp.sqrt(jnp.diag(COV))
    # 4000 resampled draws of a k-hat < 0.5 proposal: effective size well above 1000, so
    # the mean's se is below 0.03 sd; 0.15 sd is five of them. Sd within 10%: its relative
    # se at ESS 1000 is ~2%.
    np.testing.assert_array_less(jnp.abs(z.mean(0) - MU) / sd, 0.15)
    np.testing.assert_allclose(z.std(0) / sd, 1.0, atol=0.1)
    # q itself: a FullRank with the best path's Gaussian, usable everywhere.
    assert isinstance(pf.q, veil.FullRank)
    np.testing.assert_allclose(pf.q.cov, pf.gaussian.cov, rtol=1e-3, atol=1e-4)


def test_gradient_counts_match_the_evaluations_made(key):
    calls = []

    def log_p(z):
        jax.debug.callback(lambda _: calls.append(1), z[0])
        return -0.5 * jnp.sum((z - 1.0) ** 2 / jnp.arange(1.0, 4.0))

    target = veil.Target.from_logdensity(log_p, dim=3)
    calls.clear()  # building the target checked the function at a few points
    pf = veil.pathfinder(target, key=key, num_paths=1, num_elbo_draws=7)
    iters = int(pf.paths.num_iters[0])
    assert pf.num_logp_evals == 7 * iters
    # Made: the start (1) + line-search trials + ELBO draws, plus the one discarded gradient
    # per iteration that vmap's select computes (see the module docstring).
    assert len(calls) == pf.num_grad_evals + pf.num_logp_evals + iters


@pytest.mark.slow  # several paths on a bimodal target (~7 s)
def test_paths_cover_two_separated_modes(key):
    # Equal mixture of N(+-3, 0.5^2 I) in 2-d; a single path finds one mode, eight paths
    # from uniform(-2, 2) starts find both, and resampling with the mixture density as the
    # proposal weighs each mode by its own mass.
    def log_p(z):
        a = -jnp.sum((z - 3.0) ** 2) / 0.5
        b = -jnp.sum((z + 3.0) ** 2) / 0.5
        return jnp.logaddexp(a, b)

    pf = veil.pathfinder(veil.Target.from_logdensity(log_p, dim=2), key=key, num_paths=8)
    modes = np.sign(np.asarray(pf.paths.gaussian.loc[:, 0]))
    assert set(modes) == {-1.0, 1.0}
    z = np.asarray(pf.draws(4000, key=jax.random.key(3))["z"])
    frac = np.mean(z[:, 0] > 0)
    # Weights are near-constant within a mode, so the fraction is a binomial proportion up to
    # the uneven split of paths: 0.5 +- 0.15 allows a 3:1 split of ESS between modes.
    assert 0.35 < frac < 0.65


def test_moves_families_to_its_gaussian(key):
    loc = jnp.arange(5.0)
    w = jax.random.normal(key, (5, 2))
    cov = 0.3 * jnp.eye(5) + w @ w.T  # isotropic diagonal + rank 2: LowRank(2) holds it
    fr = gaussian_to_family(veil.FullRank(5), loc, cov)
    np.testing.assert_allclose(fr.cov, cov, rtol=1e-4, atol=1e-5)
    mf = gaussian_to_family(veil.MeanField(5), loc, cov)
    np.testing.assert_allclose(mf.stddev**2, jnp.diag(cov), rtol=1e-5)
    lr = gaussian_to_family(veil.LowRank(5, 2), loc, cov)
    np.testing.assert_allclose(lr.cov, cov, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lr.mean, loc)
    with pytest.raises(TypeError, match="MeanField, FullRank and LowRank"):
        gaussian_to_family(veil.Gamma(5), loc, cov)


def test_init_starts_fit_at_the_path(key):
    t = TARGET
    pf = veil.pathfinder(t, key=key)
    q0 = pf.init(veil.FullRank(4))
    np.testing.assert_allclose(q0.mean, pf.gaussian.loc, rtol=1e-5)
    res = veil.fit(t, q0, key=key, progress=False, max_steps=3000)
    np.testing.assert_allclose(res.q.mean, MU, atol=0.1)


def test_summary_and_arviz(key):
    pf = veil.pathfinder(TARGET, key=key)
    s = pf.summary()
    assert s.trustworthy and "pathfinder" in s.header and len(s.names) == 4
    idata = pf.to_arviz(200, key=key)
    assert idata.posterior["z"].shape == (4, 50, 4)  # exchangeable draws, split as 4 chains
    assert "PathfinderResult(dim=4, 4 paths" in repr(pf)


@pytest.mark.slow  # compiles a NumPyro potential into Pathfinder's loop (~5 s)
def test_numpyro_target_draws_are_constrained(key):
    import numpyro

    def model():
        numpyro.sample("s", dist.LogNormal(0.0, 0.5))

    pf = veil.pathfinder(veil.Target.from_numpyro(model), key=key, num_paths=2)
    s = pf.draws(2000, key=key)["s"]
    assert s.shape == (2000,) and bool(jnp.all(s > 0))
    # log s ~ N(0, 0.25): median 1 within a few se (ESS > 500 -> se of log-median < 0.03).
    assert abs(float(jnp.median(jnp.log(s)))) < 0.1


def test_bad_input_is_refused_before_running(key):
    t = TARGET
    with pytest.raises(ValueError, match="num_paths"):
        veil.pathfinder(t, key=key, num_paths=0)
    with pytest.raises(ValueError, match="init must have shape"):
        veil.pathfinder(t, key=key, init=jnp.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        veil.pathfinder(t, key=key, init=jnp.full(4, jnp.nan))
    with pytest.raises(ValueError, match="init_radius"):
        veil.pathfinder(t, key=key, init_radius=-1.0)
    with pytest.raises(TypeError):
        veil.pathfinder(t, key=0)
    with pytest.raises(ValueError, match="needs init"):
        veil.pathfinder(lambda z: -jnp.sum(z**2), key=key)
    bad = veil.Target.from_logdensity(lambda z: jnp.where(z[0] > 10.0, 0.0, -jnp.inf), dim=2)
    with pytest.raises(ValueError, match="not finite at any of the 4 starting points"):
        veil.pathfinder(bad, key=key)
    pf = veil.pathfinder(t, key=key)
    with pytest.raises(ValueError, match="n must be"):
        pf.draws(0, key=key)


def test_plain_function_with_init(key):
    pf = veil.pathfinder(lambda z: -0.5 * jnp.sum((z - 2.0) ** 2), key=key, init=jnp.zeros(3), num_paths=1)
    np.testing.assert_allclose(pf.q.mean, 2.0, atol=1e-2)
    assert isinstance(pf.gaussian, Gaussian)
