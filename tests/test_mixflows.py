"""MixFlows (Xu, Chen & Campbell 2023): the map, its inverse and Jacobian, the density of the
draws, the ELBO estimator, tuning, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import veil
from veil.families.mixflows import MixFlow, laplace_cdf, laplace_icdf

MU = jnp.array([1.0, -1.0])
SD = jnp.array([1.0, 2.0])


def _gauss_logpdf(z):
    # Normalised, so log Z = 0 and the importance-sampling identity below is exact.
    return jnp.sum(jax.scipy.stats.norm.logpdf(z, MU, SD))


TARGET = veil.Target.from_logdensity(_gauss_logpdf, dim=2)
# A deliberately mismatched reference (wrong location and scales) so the maps have work to do.
REFERENCE = veil.MeanField(2, init_loc=jnp.array([0.3, 0.0]), init_scale=1.5)


def _flow(num_maps=12, step_size=0.2, num_leapfrog=4, target=TARGET, reference=REFERENCE):
    return MixFlow(target, reference, step_size=step_size, num_leapfrog=num_leapfrog, num_maps=num_maps)


@jax.jit
def _weights(key):
    q = _flow()
    x, log_q = q.sample_and_log_prob(key, 4000)
    return x, jax.vmap(TARGET.log_density)(x) - log_q


def test_laplace_cdf_and_inverse_match_numpyro_and_invert_in_both_tails():
    r = jnp.linspace(-15.0, 15.0, 301)
    p = laplace_cdf(r)
    np.testing.assert_allclose(p, dist.Laplace(0.0, 1.0).cdf(r), rtol=1e-5, atol=1e-7)
    # The lower tail keeps full relative precision (values down to 1.5e-7); the upper tail is
    # limited by the spacing of float32 below 1 (6e-8), which costs about 1e-7 / (1 - p) in r.
    back = laplace_icdf(p)
    low = r < 0
    np.testing.assert_allclose(back[low], r[low], rtol=1e-5, atol=1e-5)
    upper_tol = 1e-6 / (1.0 - np.asarray(p[~low])) + 1e-5
    assert np.all(np.abs(np.asarray(back[~low] - r[~low])) <= upper_tol)


def _flat_map(q, direction):
    """The map on the flat vector (y, rho, u) for jax.jacobian."""

    def f(v):
        s = q._start(v[:2], v[2:4], v[4])
        s, log_jac = (q.forward if direction > 0 else q.backward)(s)
        return jnp.concatenate([s.y, s.rho, s.u[None]]), log_jac

    return f


@pytest.mark.parametrize("direction", [1, -1])
def test_log_jacobian_of_one_map_matches_jax_jacobian(direction):
    q = _flow()
    v = jnp.array([0.4, -0.7, 0.8, -1.3, 0.37])
    f = _flat_map(q, direction)
    jac = jax.jacfwd(lambda v: f(v)[0])(v)
    _, logdet = jnp.linalg.slogdet(jac)
    # float32 Jacobian of 4 leapfrog steps: agreement to ~1e-5 relative.
    np.testing.assert_allclose(f(v)[1], logdet, atol=2e-4)


def test_backward_inverts_forward_and_log_jacobians_cancel():
    q = _flow()
    s0 = q._start(jnp.array([0.4, -0.7]), jnp.array([0.8, -1.3]), jnp.asarray(0.37))
    s1, lj_fwd = q.forward(s0)
    s2, lj_bwd = q.backward(s1)
    for a, b in [(s2.y, s0.y), (s2.rho, s0.rho), (s2.u, s0.u)]:
        np.testing.assert_allclose(a, b, atol=2e-5)
    np.testing.assert_allclose(lj_fwd + lj_bwd, 0.0, atol=1e-4)


def test_trajectory_density_equals_the_direct_backward_density():
    """log q_N at a draw, read off the shared trajectory window, equals log_prob_extended
    computed by its own backward pass (two code paths for the same quantity)."""
    q = _flow(num_maps=7)
    s0 = q._reference_state(jax.random.key(5))
    for pick in [0, 3, 6]:
        chosen, a_ext, l_pos, _ = q._trajectory(s0, jnp.asarray(pick))
        window = q._log_qn_window(a_ext, l_pos, pick) - q._log_det()
        direct = q.log_prob_extended(q._to_x(chosen.y), chosen.rho, chosen.u)
        np.testing.assert_allclose(window, direct, atol=2e-4)


def test_draws_follow_their_own_density_importance_identity():
    """E_{q_N}[pi_bar(z) / q_N(z)] = Z = 1 holds exactly when q_N is the density of the
    draws: a wrong Jacobian, window or inverse breaks it. 4000 draws; tolerance 4 standard
    errors of the estimate (delta method)."""
    _, lw = _weights(jax.random.key(1))
    lw = np.asarray(lw, np.float64)
    assert np.isfinite(lw).all()
    est, se = veil.result.log_evidence_from_weights(lw)
    assert abs(est) < 4 * se, (est, se)
    assert se < 0.05  # the check has power: the weights are not degenerate


def test_trajectory_elbo_matches_the_plain_estimator():
    """The paper's trajectory estimator and the mean log weight of i.i.d. draws estimate the
    same extended ELBO; independent, so they agree within 4 combined standard errors."""
    q = _flow()
    elbo, se = q.elbo(jax.random.key(2), 128)
    _, lw = _weights(jax.random.key(3))
    lw = np.asarray(lw, np.float64)
    plain, plain_se = lw.mean(), lw.std(ddof=1) / math.sqrt(lw.size)
    assert abs(elbo - plain) < 4 * math.hypot(se, plain_se), (elbo, se, plain, plain_se)
    assert elbo <= 0.0 + 4 * se  # a lower bound on log Z = 0


def test_sample_alone_draws_the_same_law_as_sample_and_log_prob():
    q = _flow()
    a = np.asarray(jax.jit(lambda k: q.sample(k, 4000))(jax.random.key(7)))
    b = np.asarray(_weights(jax.random.key(8))[0])
    # Means of two independent samples of 4000: difference sd = sd * sqrt(2 / 4000).
    sd = np.sqrt(0.5 * (a.var(0) + b.var(0)))
    assert np.all(np.abs(a.mean(0) - b.mean(0)) < 4 * sd * math.sqrt(2 / 4000))


def _marginal_density_1d(q, xs):
    """The position marginal of q_N in 1-d: log_prob_extended integrated over rho and u on a
    grid (trapezoid in rho over [-14, 14], midpoints in u). The density jumps where the
    refreshment wraps around the circle, so the u grid must be fine: 48 points lose 1.5% of
    the mass, 192 points 0.1%."""
    rho = jnp.linspace(-14.0, 14.0, 561)
    u = (jnp.arange(192) + 0.5) / 192
    grid_r, grid_u = jnp.meshgrid(rho, u, indexing="ij")

    def at(x):
        lp = jax.vmap(lambda r, v: q.log_prob_extended(x[None], r[None], v))(grid_r.ravel(), grid_u.ravel())
        dens = jnp.exp(lp).reshape(grid_r.shape).mean(axis=1)
        return jnp.trapezoid(dens, rho)

    return jax.jit(jax.vmap(at))(xs)


@pytest.mark.slow
def test_one_dimensional_histogram_matches_the_marginal_density():
    """Draws of x fall into bins with the probabilities the MixFlow's own density gives them
    (density marginalised over momentum and pseudo-time by quadrature). Tolerance per bin:
    4 binomial sds of the empirical frequency plus the quadrature error, bounded by how far
    the quadrature's total mass is from 1."""
    t = veil.Target.from_logdensity(lambda z: jnp.sum(jax.scipy.stats.norm.logpdf(z, 1.0, 0.7)), dim=1)
    q = MixFlow(t, veil.MeanField(1, init_scale=1.2), step_size=0.3, num_leapfrog=3, num_maps=6)
    edges = np.linspace(-3.0, 4.5, 16)
    xs = jnp.linspace(-6.0, 7.0, 261)
    dens = np.asarray(_marginal_density_1d(q, xs))
    mass = np.trapezoid(dens, np.asarray(xs))
    quad_err = abs(mass - 1.0) + 1e-3
    assert quad_err < 0.01, mass
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(np.asarray(xs)))])
    probs = np.diff(np.interp(edges, np.asarray(xs), cdf))
    n = 20000
    x = np.asarray(jax.jit(lambda k: q.sample(k, n))(jax.random.key(11)))[:, 0]
    freq = np.histogram(x, edges)[0] / n
    tol = 4 * np.sqrt(probs * (1 - probs) / n) + quad_err
    assert np.all(np.abs(freq - probs) <= tol), np.c_[freq, probs, tol]


@pytest.mark.slow  # a long fit (~15 s); the identities above cover the map and density
def test_mixflow_improves_on_its_reference():
    """On the Gaussian target the tuned MixFlow's ELBO beats the mismatched reference's
    (-KL(reference || target) = -0.659 in closed form) by more than 3 standard errors of the
    estimate (96 trajectories), the search keeps the best step size, and the reports work."""
    res = veil.mixflow(TARGET, REFERENCE, key=jax.random.key(0), num_maps=40, num_leapfrog=5,
                       step_sizes=(0.05, 0.8), num_elbo_draws=96)
    m, s = REFERENCE.mean, REFERENCE.stddev
    kl = jnp.sum(jnp.log(SD / s) + (s**2 + (m - MU) ** 2) / (2 * SD**2) - 0.5)
    assert res.elbo > -float(kl) + 3 * res.elbo_se, (res.elbo, res.elbo_se, float(kl))
    assert res.elbo == res.elbos.max() and res.step_size == 0.05
    z = np.asarray(res.draws(4000, key=jax.random.key(2))["z"])
    # The mean moves towards the truth (40 maps still average in early, reference-like
    # pushforwards; the slow test below runs 200).
    assert np.linalg.norm(z.mean(0) - MU) < 0.8 * np.linalg.norm(m - MU)
    text = str(res.summary())
    assert "Step size chosen by ELBO" in text and "edge of the grid" in text
    assert np.isfinite(res.khat) and res.roundtrip_error < 0.1
    assert res.to_arviz(52, key=jax.random.key(3)).posterior["z"].shape == (4, 13, 2)


@pytest.mark.slow
def test_long_mixflow_recovers_the_moments():
    """With 200 maps the MixFlow's moments are close to the target's (measured: mean
    (0.94, -0.80), sd (1.03, 1.98)); tolerances 0.3 on the mean and 8% on the sd leave room
    for the Monte-Carlo error (sd/63) and the bias still decaying with more maps."""
    res = veil.mixflow(TARGET, REFERENCE, key=jax.random.key(0), num_maps=200, num_leapfrog=5,
                       step_sizes=(0.05, 0.2), num_elbo_draws=32)
    z = np.asarray(res.draws(4000, key=jax.random.key(2))["z"])
    np.testing.assert_allclose(z.mean(0), MU, atol=0.3)
    np.testing.assert_allclose(z.std(0), SD, rtol=0.08)
    assert res.khat < 0.5


def test_log_prob_of_the_marginal_refuses_with_the_remedy():
    with pytest.raises(NotImplementedError, match="log_prob_extended"):
        _flow().log_prob(jnp.zeros(2))


def test_bad_input_is_refused_before_any_work():
    with pytest.raises(TypeError, match="MeanField or veil.FullRank"):
        MixFlow(TARGET, veil.LowRank(2, 1), step_size=0.1)
    with pytest.raises(ValueError, match="step_size"):
        MixFlow(TARGET, REFERENCE, step_size=-1.0)
    with pytest.raises(ValueError, match="num_maps"):
        MixFlow(TARGET, REFERENCE, step_size=0.1, num_maps=0)
    with pytest.raises(ValueError, match="dim"):
        MixFlow(TARGET, veil.MeanField(3), step_size=0.1)
    with pytest.raises(ValueError, match="step sizes"):
        veil.mixflow(TARGET, REFERENCE, key=jax.random.key(0), step_sizes=(0.1, float("nan")))
    with pytest.raises(ValueError, match="num_elbo_draws"):
        veil.mixflow(TARGET, REFERENCE, key=jax.random.key(0), num_elbo_draws=1)
    with pytest.raises(TypeError, match="veil.mixflow"):
        veil.fit(TARGET, _flow(), key=jax.random.key(0), progress=False)
