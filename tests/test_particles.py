"""Particle methods (veil.particles): the Stein direction and discrepancy against direct
double sums, the median by bisection against a sort, moments of Gaussian targets, the step API
against the driver, minibatches, bad input and the result type."""

import math
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import veil
from veil.result import NotApplicable
from veil.diagnostics import _drift_statistic, kernel_stein_discrepancy
from veil.kernels import IMQ, RBF, _sq_dists
from veil.particles import SVGD, CoinSVGD, run, stein_direction, svgd_bandwidth
from veil.particles.base import _pair_median, _pair_median_bisection, _pair_median_sorted

COV = np.array([[1.0, 0.6], [0.6, 2.0]])
MU = np.array([1.0, -1.0])
PREC = jnp.asarray(np.linalg.inv(COV))


def _gaussian():
    return veil.Target.from_logdensity(lambda z: -0.5 * (z - MU) @ PREC @ (z - MU), dim=2)


def _direct_direction(k, x, s):
    """phi(x_i) = (1/n) sum_j [k(x_j, x_i) s_j + grad_{x_j} k(x_j, x_i)], one pair at a time."""
    term = lambda xj, sj, xi: k(xj, xi) * sj + jax.grad(k)(xj, xi)  # noqa: E731
    pairs = jax.vmap(jax.vmap(term, (0, 0, None)), (None, None, 0))(x, s, x)  # [i, j, d]
    return pairs.mean(axis=1)


def test_stein_direction_matches_the_double_sum():
    # An identity (float32 round-off only): the RBF closed form and the autodiff repulsion of
    # any other kernel against the definition written pair by pair.
    x = jax.random.normal(jax.random.key(0), (7, 3))
    s = jax.random.normal(jax.random.key(1), (7, 3))
    h = 1.3
    rbf = lambda a, b: jnp.exp(-jnp.sum((a - b) ** 2) / (2 * h**2))  # noqa: E731
    np.testing.assert_allclose(stein_direction(RBF(h), x, s), _direct_direction(rbf, x, s), atol=1e-5)
    imq = lambda a, b: 2.0 / (2.0 + jnp.sum((a - b) ** 2))  # noqa: E731
    np.testing.assert_allclose(stein_direction(IMQ(2.0), x, s), _direct_direction(imq, x, s), atol=1e-5)
    # The default: RBF with the median heuristic.
    np.testing.assert_allclose(
        stein_direction(None, x, s), stein_direction(RBF(svgd_bandwidth(x)), x, s), atol=1e-6
    )


def test_pair_median_is_the_lower_median_of_the_pairs():
    for m, seed in [(2, 0), (5, 1), (37, 2), (128, 3)]:
        x = jax.random.normal(jax.random.key(seed), (m, 3))
        d2 = _sq_dists(x, x)
        i, j = np.triu_indices(m, 1)
        pairs = np.sort(np.asarray(d2)[i, j])
        exact = pairs[(len(pairs) + 1) // 2 - 1]
        # Bisection (the CPU's choice) to 2^-24 of the range [0, max]; the sort (other
        # backends') exactly.
        # Compiled (as in the particle loops): run op by op, this test took 17 s.
        bisection = jax.jit(_pair_median_bisection, static_argnames="unroll")
        for median in (bisection(d2), bisection(d2, unroll=True)):
            assert abs(float(median) - exact) <= 2.0**-24 * pairs[-1] * 1.01 + 1e-7
        assert float(jax.jit(_pair_median_sorted)(d2)) == exact
        assert float(jax.jit(_pair_median)(d2)) == float(bisection(d2))  # this CPU run


def test_kernel_stein_discrepancy_matches_the_double_sum():
    x = jax.random.normal(jax.random.key(0), (6, 2))
    s = jax.random.normal(jax.random.key(1), (6, 2))
    k = lambda a, b: (1.0 + jnp.sum((a - b) ** 2)) ** -0.5  # noqa: E731
    gx, gy = jax.grad(k, 0), jax.grad(k, 1)
    cross = jax.jacfwd(jax.grad(k, 1), 0)

    def kp(a, sa, b, sb):
        return sa @ sb * k(a, b) + sa @ gy(a, b) + sb @ gx(a, b) + jnp.trace(cross(a, b))

    pairs = jax.vmap(jax.vmap(kp, (None, None, 0, 0)), (0, 0, None, None))(x, s, x, s)
    direct = math.sqrt(float(jnp.sum(pairs))) / 6
    assert float(kernel_stein_discrepancy(x, s)) == pytest.approx(direct, rel=1e-5)


def test_drift_tolerance_settles_a_slow_deterministic_trend():
    # A noiseless trend: any drop is "significant" against zero noise; within drift_atol it
    # counts as settled.
    rows = np.linspace(0.0, 1e-3, 40)[:, None] * np.ones((1, 3))
    assert _drift_statistic(rows, 10) > 2.0
    assert _drift_statistic(rows, 10, atol=1e-2) == 0.0
    assert _drift_statistic(rows * 100, 10, atol=1e-2) > 2.0


@pytest.mark.parametrize("method", [SVGD(), CoinSVGD()], ids=["svgd", "coin"])
def test_particles_match_a_gaussian(method):
    # SVGD's fixed point for n particles is deterministic; its finite-n bias is a slight
    # underdispersion (measured here: sd ratios 0.96-0.98 with 200 particles; veil's SVGD gives
    # the same particles as BlackJAX's to 3 decimals in 5-d). Tolerances: mean within 0.03
    # (3% of the smallest sd), sd ratios in [0.9, 1.02], correlation within 0.03.
    res = run(_gaussian(), method, key=jax.random.key(0), n_particles=200, progress=False)
    assert res.converged, res.stop_reason
    x = np.asarray(res.particles)
    assert np.abs(x.mean(0) - MU).max() < 0.03
    ratio = x.std(0) / np.sqrt(np.diag(COV))
    assert np.all((ratio > 0.9) & (ratio < 1.02)), ratio
    assert abs(np.corrcoef(x.T)[0, 1] - 0.6 / math.sqrt(2.0)) < 0.03
    assert res.num_skipped == 0


@pytest.mark.slow  # two 3,000-step runs (~10 s); the default run checks coin SVGD on a Gaussian and its bets
def test_coin_svgd_needs_no_step_size_where_svgd_does():
    # A target 100x wider than the start: AdaGrad at its default step moves each particle
    # ~0.1 per step and has not spread in 3,000 steps; the coin's bets grow with its wins.
    wide = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum((z / 100.0) ** 2), dim=2)
    coin = run(wide, CoinSVGD(), key=jax.random.key(0), n_particles=100, max_steps=3000, progress=False)
    svgd = run(wide, SVGD(), key=jax.random.key(0), n_particles=100, max_steps=3000, progress=False)
    assert coin.converged
    assert np.all(np.abs(np.asarray(coin.particles).std(0) / 100.0 - 1.0) < 0.1)
    assert svgd.stop_reason == "max_steps"
    assert np.all(np.asarray(svgd.particles).std(0) < 20.0)


def test_coin_svgd_is_the_papers_betting_rule():
    # An identity (float32 round-off only): six steps of CoinSVGD() against Sharrock & Nemeth's
    # recursion written out in numpy, per coordinate: L = max |phi|, G = sum |phi|,
    # R = max(R + phi (x - x0), 0), x = x0 + (sum phi) / (L (G + L)) (L + R). The first move
    # is exactly half a unit along the sign of phi.
    t, method = _gaussian(), CoinSVGD()
    state = method.init(jax.random.key(0), t, 9)
    x0 = np.asarray(state.particles, np.float64)
    x, big, total, abs_total, reward = x0.copy(), 0.0, 0.0, 0.0, 0.0
    for i in range(6):
        key = jax.random.key(i)
        phi = np.asarray(method.direction(t, jnp.asarray(x, jnp.float32), key)[1], np.float64)
        big, total, abs_total = np.maximum(big, np.abs(phi)), total + phi, abs_total + np.abs(phi)
        reward = np.maximum(reward + phi * (x - x0), 0.0)
        x = x0 + total / (big * (abs_total + big)) * (big + reward)
        if i == 0:
            np.testing.assert_allclose(x - x0, 0.5 * np.sign(phi), atol=1e-6)
        state, _ = method.step(key, state)
        np.testing.assert_allclose(np.asarray(state.particles), x, atol=2e-5)


@pytest.mark.parametrize("method", [SVGD(), CoinSVGD()], ids=["svgd", "coin"])
def test_step_api_is_the_driver_update(method):
    # The same update in a user's loop and in the driver: deterministic methods give the same
    # particles up to float32 round-off in the surrogate gradient (the driver scales it), which
    # the coin's bets, ratios of running sums, carry to ~2e-5 after 30 steps: hence 5e-5, far
    # below any real difference of rule (a step is ~0.1-0.5 here).
    t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)
    x0 = jax.random.normal(jax.random.key(5), (20, 2))
    state = method.init(jax.random.key(0), t, 20, init=x0)
    step = jax.jit(method.step)
    for i in range(30):
        state, info = step(jax.random.key(i), state)
    assert bool(info.finite)
    res = run(t, method, key=jax.random.key(0), n_particles=20, init=x0, stop=None, max_steps=30, progress=False)
    np.testing.assert_allclose(np.asarray(state.particles), np.asarray(res.particles), atol=5e-5)
    assert res.trace.shape == (30,)


def test_step_skips_a_non_finite_direction():
    t = veil.Target.from_logdensity(lambda z: jnp.where(z[0] > 0, jnp.nan, -0.5 * jnp.sum(z**2)), dim=2)
    x0 = jnp.array([[-1.0, 0.0], [-2.0, 1.0], [0.5, 0.0]])
    state = SVGD().init(jax.random.key(0), t, 3, init=x0)
    new, info = SVGD().step(jax.random.key(1), state)
    assert not bool(info.finite)
    np.testing.assert_array_equal(np.asarray(new.particles), np.asarray(x0))


def test_minibatched_target():
    # Logistic regression, 2,000 rows, batches of 100: Coin SVGD on batch scores ends within
    # 0.5 posterior sd of the full-data particles' mean (measured 0.02-0.08 sd).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 2)).astype(np.float32)
    y = (rng.uniform(size=2000) < 1 / (1 + np.exp(-x @ np.array([1.0, -0.5])))).astype(np.float32)
    log_prior = lambda z: -0.5 * jnp.sum(z**2)  # noqa: E731
    log_lik = lambda z, b: jnp.sum(b[1] * (b[0] @ z) - jnp.logaddexp(0.0, b[0] @ z))  # noqa: E731
    full = veil.Target.from_logdensity(lambda z: log_prior(z) + log_lik(z, (x, y)), dim=2)
    mb = veil.Target.minibatched(log_prior, log_lik, (jnp.asarray(x), jnp.asarray(y)), dim=2, batch_size=100)
    ref = np.asarray(run(full, CoinSVGD(), key=jax.random.key(0), n_particles=50, progress=False).particles)
    res = run(mb, CoinSVGD(), key=jax.random.key(0), n_particles=50, max_steps=3000, progress=False)
    z = np.asarray(res.particles)
    assert np.all(np.abs(z.mean(0) - ref.mean(0)) / ref.std(0) < 0.5)


def test_bad_input_is_refused_before_the_run():
    t = _gaussian()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="n_particles must be an integer >= 2"):
        run(t, key=key, n_particles=1, progress=False)
    with pytest.raises(ValueError, match="shape"):
        run(t, key=key, n_particles=4, init=jnp.zeros((4, 3)), progress=False)
    with pytest.raises(ValueError, match="one point repeated"):
        run(t, key=key, n_particles=4, init=jnp.ones((4, 2)), progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        run(t, key=key, n_particles=2, init=jnp.array([[0.0, jnp.nan], [1.0, 1.0]]), progress=False)
    log_z = veil.Target.from_logdensity(lambda z: jnp.sum(jnp.log(z)), dim=2)
    with pytest.raises(ValueError, match="starting particle"):
        run(log_z, key=key, n_particles=10, progress=False)
    with pytest.raises(TypeError, match="method"):
        run(t, "svgd", key=key, progress=False)
    with pytest.raises(ValueError, match="step_size"):
        SVGD(step_size=-1.0)
    with pytest.raises(TypeError, match="kernel"):
        CoinSVGD(kernel="rbf")


def test_nonfinite_run_stops_and_warns():
    # Finite at the start, undefined beyond z0 > 3: the particles that cross are never moved
    # there (those steps are skipped), and a deterministic method repeats the skipped step
    # until the run stops.
    t = veil.Target.from_logdensity(lambda z: jnp.where(z[0] > 3.0, jnp.nan, -0.5 * jnp.sum((z - 5.0) ** 2)), dim=2)
    x0 = jax.random.normal(jax.random.key(1), (10, 2))
    with pytest.warns(RuntimeWarning, match="not finite"):
        res = run(t, SVGD(step_size=0.5), key=jax.random.key(0), n_particles=10, init=x0, progress=False)
    assert res.stop_reason == "nonfinite" and res.num_skipped >= 100
    assert np.isfinite(np.asarray(res.particles)).all()
    assert "do NOT trust" in str(res.summary())


def test_result_with_constrained_sites(tmp_path):
    def model():
        numpyro.sample("sigma", dist.LogNormal(0.0, 0.5))
        numpyro.sample("mu", dist.Normal(0.0, 1.0).expand([2]))

    t = veil.Target.from_numpyro(model)
    res = run(t, key=jax.random.key(0), n_particles=60, progress=False)
    draws = res.draws()
    assert draws["sigma"].shape == (60,) and draws["mu"].shape == (60, 2)
    assert np.all(np.asarray(draws["sigma"]) > 0)
    assert res.draws(7, key=jax.random.key(1))["mu"].shape == (7, 2)
    with pytest.raises(TypeError, match="key"):
        res.draws(7)
    # No density: k-hat, the ELBO and the evidence do not apply, and say so (not NaN).
    for name in ("khat", "elbo"):
        with pytest.raises(NotApplicable, match="particles"):
            getattr(res, name)
    assert getattr(res, "khat", None) is None  # an AttributeError: absent, for code that asks
    with pytest.raises(NotApplicable, match="no density"):
        res.log_evidence(key=jax.random.key(2))
    summary = res.summary()
    assert "kernel Stein discrepancy" in str(summary) and summary.names[0] == "mu[0]"
    # E[log sigma] = 0 with sd 0.5: the particles' mean of log sigma within 0.1.
    assert abs(np.log(np.asarray(draws["sigma"])).mean()) < 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        idata = res.to_arviz()
    assert idata.posterior["mu"].shape == (1, 60, 2) and idata.sample_stats["lp"].shape == (1, 60)
    assert np.isfinite(res.ksd) and res.ksd > 0
    import matplotlib

    matplotlib.use("Agg")
    fig = res.plot()
    assert "KSD" in fig.axes[0].get_title()
    assert isinstance(res, veil.VIResult) and "CoinSVGD" in repr(res)
    # A checkpoint: the second call resumes the finished run and returns the same particles.
    path = tmp_path / "particles.npz"
    a = run(t, key=jax.random.key(3), n_particles=20, max_steps=300, stop=None, progress=False, checkpoint=path)
    b = run(t, key=jax.random.key(3), n_particles=20, max_steps=300, stop=None, progress=False, checkpoint=path)
    np.testing.assert_array_equal(np.asarray(a.particles), np.asarray(b.particles))


ALPHA = np.array([2.0, 3.0, 5.0, 0.7])


def _dirichlet_target():
    def log_p(t):
        full = jnp.concatenate([t, 1.0 - jnp.sum(t, keepdims=True)])
        return jnp.sum((ALPHA - 1.0) * jnp.log(full))

    return veil.Target.from_logdensity(log_p, dim=3)


def test_mirror_maps_are_inverse_pairs_with_their_jacobians():
    # Identities: dual(primal(eta)) = eta; hess_inv_vp is d theta / d eta (the Jacobian of
    # primal, by autodiff) and hess_vp its inverse; log_det_jacobian its log determinant; kernel_pairs the pair sum.
    eta = jax.random.normal(jax.random.key(0), (5, 3))
    k = jnp.exp(-_sq_dists(eta, eta))
    v = jax.random.normal(jax.random.key(1), (5, 3))
    for m in [veil.particles.mirror.Simplex(), veil.particles.mirror.Positive(), veil.particles.mirror.Box(-1.0, 2.0)]:
        theta = m.primal(eta)
        assert not m.outside(np.asarray(theta)).any()
        np.testing.assert_allclose(m.dual(theta), eta, atol=1e-5)
        jac = jax.vmap(jax.jacfwd(m.primal))(eta)
        np.testing.assert_allclose(m.hess_inv_vp(theta, v), jnp.einsum("nab,nb->na", jac, v), atol=1e-6)
        np.testing.assert_allclose(m.hess_vp(theta, m.hess_inv_vp(theta, v)), v, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            jax.vmap(m.log_det_jacobian)(eta), jnp.linalg.slogdet(jac)[1], atol=1e-4)
        pairs = jnp.einsum("ij,iab,jb->ja", k, jac, theta)
        np.testing.assert_allclose(m.kernel_pairs(k, theta), pairs, atol=1e-5)


@pytest.mark.parametrize("method", [
    veil.particles.MirroredSVGD(veil.particles.mirror.Simplex(), step_size=0.5),
    # ~10 s (an eigendecomposition per step); its direction is checked against the paper's
    # exactly in the default run.
    pytest.param(veil.particles.SVMD(veil.particles.mirror.Simplex()), marks=pytest.mark.slow),
], ids=["msvgd", "svmd"])
def test_mirrored_methods_keep_particles_in_the_simplex_and_match_a_dirichlet(method):
    # Dirichlet(2, 3, 5, 0.7): SVGD-type particles are slightly underdispersed (measured sd
    # ratios 0.89-0.98 at 200 particles for both methods); means within 0.01 (about 0.1 sd),
    # sds within 15%.
    res = run(_dirichlet_target(), method, key=jax.random.key(0), n_particles=200, progress=False)
    x = np.asarray(res.particles)
    full = np.concatenate([x, 1.0 - x.sum(1, keepdims=True)], axis=1)
    assert (full > 0).all()
    mean = ALPHA / ALPHA.sum()
    sd = np.sqrt(mean * (1 - mean) / (ALPHA.sum() + 1))
    assert np.abs(full.mean(0) - mean).max() < 0.01
    ratio = full.std(0) / sd
    assert np.all((ratio > 0.85) & (ratio < 1.05)), ratio
    assert res.converged


def test_mirrored_init_outside_the_set_is_refused():
    m = veil.particles.MirroredSVGD(veil.particles.mirror.Simplex())
    bad = jnp.array([[0.2, 0.3, 0.1], [0.5, 0.6, 0.1], [0.1, 0.1, 0.1]])  # row 1 sums past 1
    with pytest.raises(ValueError, match="outside the open simplex.*row 1"):
        run(_dirichlet_target(), m, key=jax.random.key(0), n_particles=3, init=bad, progress=False)
    with pytest.raises(TypeError, match="mirror"):
        veil.particles.MirroredSVGD("simplex")
    with pytest.raises(ValueError, match="low < high"):
        veil.particles.mirror.Box(1.0, 0.0)


@eqx.filter_jit
def _direction(method, target, x):
    return method.direction(target, x, None)


def _paper_direction(x, log_p, metric, kernel, threshold):
    """The adaptive-kernel Stein direction of Shi, Liu & Mackey (2022) written out as the paper
    defines it, in the target's coordinates: K(x_k, y) = sum_ij sqrt(mu_i mu_j) v_ki u_j(y)
    Gamma_ij with u_j the Nystrom eigenfunctions of the Gram matrix and Gamma_ij = mean_m
    v_mi v_mj G(x_m), and g(x_k) = mean_l [K(x_k, x_l) G_l^{-1} grad log p(x_l) +
    div_y (K(x_k, y) G(y)^{-1}) at y = x_l], the divergence by autodiff, pair by pair."""
    n = x.shape[0]
    gram = jax.vmap(lambda a: jax.vmap(lambda b: kernel(a, b))(x))(x)
    lam, vec = jnp.linalg.eigh(gram)
    desc = lam[::-1]
    keep = np.asarray(((jnp.cumsum(desc) - desc) / jnp.sum(desc) < threshold)[::-1] & (lam > 1e-5 * lam[-1]))
    mu, v = lam[keep] / n, vec[:, keep] * np.sqrt(n)
    gamma = jnp.einsum("mi,mj,mab->ijab", v, v, jax.vmap(metric)(x)) / n

    def k_row(k, y):
        u = jax.vmap(lambda b: kernel(y, b))(x) @ v / (n * mu)
        return jnp.einsum("i,j,i,j,ijab->ab", jnp.sqrt(mu), jnp.sqrt(mu), v[k], u, gamma)

    def term(k, y):
        kg = lambda y: k_row(k, y) @ jnp.linalg.inv(metric(y))  # noqa: E731
        return kg(y) @ jax.grad(log_p)(y) + jnp.einsum("abb->a", jax.jacfwd(kg)(y))

    pairs = jax.jit(jax.vmap(jax.vmap(term, (None, 0)), (0, None)))(jnp.arange(n), x)  # [k, l, d]
    return pairs.mean(axis=1)


@pytest.mark.slow
def test_svmd_and_svng_are_the_papers_direction():
    # Identities (float32 round-off): the fast O(n^2 d) forms against the definition, for
    # SVMD on the simplex (where veil works in the dual space with the dual scores; the two
    # operators agree because div hess psi^{-1} = -hess psi^{-1} grad log det hess psi) and
    # SVNG with a metric that varies (so the divergence of G^{-1} is not zero). Eigenvalues
    # making up 90% of the trace kept (of 6), so the truncation is tested too.
    threshold = 0.9
    eta = jax.random.normal(jax.random.key(3), (6, 3))
    simplex = veil.particles.mirror.Simplex()
    theta = simplex.primal(eta)
    t = _dirichlet_target()

    def hess_psi(th):  # of psi = sum_k theta_k log theta_k over all d + 1 coordinates
        return jnp.diag(1.0 / th) + 1.0 / (1.0 - jnp.sum(th))

    h = float(svgd_bandwidth(theta))
    rbf = lambda a, b: jnp.exp(-jnp.sum((a - b) ** 2) / (2 * h**2))  # noqa: E731
    ref = _paper_direction(theta, t.log_density, hess_psi, rbf, threshold)
    _, fast = _direction(veil.particles.SVMD(simplex, eigen_threshold=threshold), t, eta)
    np.testing.assert_allclose(fast, ref, atol=2e-4 * float(jnp.abs(ref).max()))

    def metric(y):
        return jnp.eye(3) + 0.3 * jnp.outer(jnp.tanh(y), jnp.tanh(y)) + 0.2 * jnp.diag(jnp.exp(0.3 * y))

    quartic = veil.Target.from_logdensity(lambda y: -0.5 * jnp.sum(y**2) - 0.1 * jnp.sum(y**4), dim=3)
    x = 1.5 * eta
    mean_metric = jnp.mean(jax.vmap(metric)(x), 0)
    h = float(svgd_bandwidth(x @ jnp.linalg.cholesky(mean_metric)))
    mahalanobis = lambda a, b: jnp.exp(-(a - b) @ mean_metric @ (a - b) / (2 * h**2))  # noqa: E731
    ref = jnp.linalg.solve(jax.vmap(metric)(x), _paper_direction(x, quartic.log_density, metric, mahalanobis,
                                                                 threshold)[..., None])[..., 0]
    _, fast = _direction(veil.particles.SVNG(metric, eigen_threshold=threshold), quartic, x)
    np.testing.assert_allclose(fast, ref, atol=2e-4 * float(jnp.abs(ref).max()))


def test_adaptive_kernel_with_the_identity_metric_is_svgd():
    # An identity: with G = I and every eigenvalue kept, SVNG's direction is SVGD's.
    x = jax.random.normal(jax.random.key(0), (7, 3))
    t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2) - 0.1 * jnp.sum(z**4), dim=3)
    _, phi = _direction(veil.particles.SVNG(jnp.eye(3), eigen_threshold=1.0), t, x)
    scores = jax.vmap(jax.grad(t.log_density))(x)
    np.testing.assert_allclose(phi, stein_direction(None, x, scores), atol=1e-5)


def test_svng_is_right_where_scales_differ_by_100():
    # N(0, diag(0.1^2, 10^2)) with its precision as the metric: the metric's kernel makes the
    # problem isotropic, so both sds come out as SVGD's on N(0, I) would (0.95-0.96 measured at
    # 100 particles; SVGD's fixed point is slightly underdispersed). A Euclidean kernel gave
    # 3.9 in the narrow coordinate. Means within 0.05 sd.
    prec = jnp.diag(jnp.array([100.0, 0.01]))
    t = veil.Target.from_logdensity(lambda z: -0.5 * z @ prec @ z, dim=2)
    res = run(t, veil.particles.SVNG(prec), key=jax.random.key(0), n_particles=100, progress=False)
    ratio = np.asarray(res.particles.std(0)) / np.array([0.1, 10.0])
    assert np.all((ratio > 0.9) & (ratio < 1.02)), ratio
    assert np.abs(np.asarray(res.particles.mean(0)) / np.array([0.1, 10.0])).max() < 0.05
    assert res.converged


def test_adaptive_kernel_bad_input():
    with pytest.raises(ValueError, match="eigen_threshold"):
        veil.particles.SVMD(veil.particles.mirror.Simplex(), eigen_threshold=1.5)
    with pytest.raises(ValueError, match="not positive definite"):
        veil.particles.SVNG(jnp.diag(jnp.array([1.0, -1.0])))
    with pytest.raises(ValueError, match="not symmetric"):
        veil.particles.SVNG(jnp.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square float array"):
        veil.particles.SVNG(jnp.ones(3))
    # A metric function is checked at the starting particles, before the run compiles; any
    # metric against the target's dimension.
    t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)
    with pytest.raises(ValueError, match="3 x 3 but the target has dim=2"):
        run(t, veil.particles.SVNG(jnp.eye(3)), key=jax.random.key(0), n_particles=5, progress=False)
    with pytest.raises(ValueError, match="metric\\(x\\) at a starting particle is not positive definite"):
        run(t, veil.particles.SVNG(lambda z: jnp.diag(z)), key=jax.random.key(0), n_particles=5, progress=False)


def _linear_problem(forward_kind):
    rng = np.random.default_rng(0)
    d, m, noise = 3, 5, 0.3
    a = rng.normal(size=(m, d)).astype(np.float32)
    y = (a @ rng.normal(size=d) + noise * rng.normal(size=m)).astype(np.float32)
    s0 = np.array([1.0, 2.0, 0.5])
    cov = np.linalg.inv(np.diag(1 / s0**2) + a.T @ a / noise**2)
    mean = cov @ (a.T @ y / noise**2)
    if forward_kind == "callback":
        # A black box: NumPy behind pure_callback has no derivative, so any jax.grad of it fails.
        def forward(x):
            return jax.pure_callback(lambda v: (np.asarray(v) @ a.T).astype(np.float32),
                                     jax.ShapeDtypeStruct((m,), jnp.float32), x, vmap_method="broadcast_all")
    else:
        aj = jnp.asarray(a)
        forward = lambda x: aj @ x  # noqa: E731
    problem = veil.particles.InverseProblem(forward, y, noise_sd=noise, prior_mean=np.zeros(d), prior_sd=s0)
    return problem, mean, np.sqrt(np.diag(cov))


@pytest.mark.parametrize("method", ["eki", "aldi"])
def test_gradient_free_ensembles_recover_a_linear_gaussian_posterior(method):
    # 1,000 particles: the Monte-Carlo standard error of a mean is sd / sqrt(1000) = 0.03 sd and
    # of an sd ratio about 0.022; tolerances 0.15 and 0.1 (about 5 standard errors; EKI's
    # perturbed observations and ALDI's finite run add their own noise).
    problem, mean, sd = _linear_problem("callback" if method == "eki" else "jax")
    m = veil.particles.EKI(problem) if method == "eki" else veil.particles.ALDI(problem)
    res = run(problem, m, key=jax.random.key(0), n_particles=1000,
              max_steps=None if method == "eki" else 1500, progress=False)
    x = np.asarray(res.particles)
    assert np.abs(x.mean(0) - mean).max() / sd.min() < 0.15
    assert np.abs(x.std(0) / sd - 1).max() < 0.1
    with pytest.raises(NotApplicable, match="gradient"):  # gradient-free: no KSD, said so
        res.ksd
    assert res.num_steps == (20 if method == "eki" else 1500)


def test_gradient_free_bad_input():
    problem, _, _ = _linear_problem("jax")
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="stochastic process"):
        run(problem, veil.particles.ALDI(problem), key=key, stop=veil.StopRule(), progress=False)
    with pytest.raises(ValueError, match="num_steps=20"):
        run(problem, veil.particles.EKI(problem), key=key, max_steps=100, progress=False)
    with pytest.raises(ValueError, match="shape"):
        veil.particles.InverseProblem(lambda x: x, jnp.zeros(4), noise_sd=1.0, prior_mean=jnp.zeros(3), prior_sd=1.0)
    with pytest.raises(ValueError, match="noise_sd must be positive"):
        veil.particles.InverseProblem(lambda x: x, jnp.zeros(3), noise_sd=0.0, prior_mean=jnp.zeros(3), prior_sd=1.0)
    with pytest.raises(TypeError, match="InverseProblem"):
        veil.particles.EKI("problem")


@pytest.mark.slow  # two ensemble fits (~7 s); the doctest runs one, docs/benchmarks/repulsive-ensembles-three-modes.md the study
def test_repulsive_ensemble_finds_a_second_mode_that_restarts_miss():
    # Two unit-sd modes at -3 and +3 of equal mass; both members start in the +3 basin
    # (2.5 +- 0.5). Side by side without repulsion both end at +3; the repulsion pushes one
    # over the barrier, and after the polish (no repulsion) each sits at its mode's centre
    # (0.05: the fits' own Monte-Carlo noise), weighted 1/2 each (ELBO weights, 512 draws).
    def log_p(z):
        return jnp.logaddexp(-0.5 * jnp.sum((z - 3.0) ** 2), -0.5 * jnp.sum((z + 3.0) ** 2))

    t = veil.Target.from_logdensity(log_p, dim=1)
    q = veil.MeanField(1, init_loc=jnp.array([2.5]))
    alone = veil.particles.repulsive_ensemble(t, q, 2, key=jax.random.key(0), strength=0.0, radius=0.5, progress=False)
    apart = veil.particles.repulsive_ensemble(t, q, 2, key=jax.random.key(0), radius=0.5, progress=False)
    np.testing.assert_allclose(np.asarray(alone.q.components.loc[:, 0]), [3.0, 3.0], atol=0.05)
    np.testing.assert_allclose(np.sort(np.asarray(apart.q.components.loc[:, 0])), [-3.0, 3.0], atol=0.05)
    np.testing.assert_allclose(np.asarray(apart.q.weights), [0.5, 0.5], atol=0.05)
    assert isinstance(apart.q, veil.Mixture) and apart.num_steps > alone.num_steps
    with pytest.raises(ValueError, match="k must be an integer >= 2"):
        veil.particles.repulsive_ensemble(t, q, 1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="strength"):
        veil.particles.repulsive_ensemble(t, q, 2, key=jax.random.key(0), strength=-1.0)
    with pytest.raises(TypeError, match="location"):
        veil.particles.repulsive_ensemble(t, veil.Mixture([q, q]), 2, key=jax.random.key(0))


def test_watch_plan_cache_matches_a_fresh_trace():
    # The driver caches what the drift test watches by the loss's static structure and array
    # shapes; a cached answer must be the one a fresh trace gives, and losses that differ in
    # dimension or method must not share an entry.
    from veil.loop import driver
    from veil.particles import MirroredSVGD
    from veil.particles.runner import _ParticleKernel

    for dim in (2, 3):
        t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=dim)
        for method in (SVGD(), MirroredSVGD(veil.particles.mirror.Simplex())):
            loss, params = _ParticleKernel(method, t), jnp.full((1, 7, dim), 0.1)
            fresh = jax.eval_shape(jax.vmap(loss.watched), params)
            shapes, probe, groups = driver._watch_plan(loss, params)
            assert shapes == fresh
            assert driver._watch_plan(_ParticleKernel(method, t), params)[0] == fresh  # the cached one
            want_probe, want_groups = driver.probe_indices(fresh)
            np.testing.assert_array_equal(probe, want_probe)
            np.testing.assert_array_equal(groups, want_groups)
            assert fresh["location"].shape == (1, dim)
