"""``veil.HierarchicalGaussian`` and ``veil.dadvi`` (deterministic ADVI)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import veil
from veil.geometry.dadvi import _fixed_draws

D = 4


def _perturbed(q, key, size=0.3):
    """The family with every parameter moved off its start (non-zero mix and slopes)."""
    leaves, tree = jax.tree.flatten(q)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [x + size * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _funnel(z):
    """Neal's funnel in ``len(z)`` dimensions: ``x0 ~ N(0, 9)``, ``x_i | x0 ~ N(0, e^{x0})``."""
    return (jax.scipy.stats.norm.logpdf(z[0], 0.0, 3.0)
            + jnp.sum(jax.scipy.stats.norm.logpdf(z[1:], 0.0, jnp.exp(z[0] / 2))))


# ---------------------------------------------------------------- the family
def test_hierarchical_density_draws_and_inverse_agree(key):
    q = _perturbed(veil.HierarchicalGaussian(D), key)
    eps = jax.random.normal(jax.random.fold_in(key, 1), (64, D))
    z, lq = q.transform_and_log_prob(eps)
    assert z.shape == (64, D) and lq.shape == (64,)
    # The same quantities along two float32 paths (forward map; triangular solve and D
    # passes back): round-off ~1e-6 relative, tolerance 1e-4.
    np.testing.assert_allclose(q.whiten(z), eps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(q.log_prob(z), lq, rtol=1e-5, atol=1e-4)
    assert q.log_prob(z[0]).shape == () and q.whiten(z[0]).shape == (D,)


def test_hierarchical_log_prob_is_the_change_of_variables(key):
    # log q(z) = log N(eps) + log |d eps / d z|, the Jacobian by autodiff: an identity.
    q = _perturbed(veil.HierarchicalGaussian(D), key)
    z = q.sample(jax.random.fold_in(key, 2), 5)
    jac_logdet = jax.vmap(lambda x: jnp.linalg.slogdet(jax.jacobian(q.whiten)(x))[1])(z)
    eps = q.whiten(z)
    expected = jnp.sum(jax.scipy.stats.norm.logpdf(eps), -1) + jac_logdet
    np.testing.assert_allclose(q.log_prob(z), expected, rtol=1e-5, atol=1e-4)


def test_hierarchical_mean_and_cov_are_the_closed_forms(key):
    q = _perturbed(veil.HierarchicalGaussian(D), key)
    n = 400_000
    z = np.asarray(q.sample(jax.random.fold_in(key, 3), n), np.float64)
    # Tolerances: 5 Monte-Carlo standard errors, each from the draws' own spread (the
    # lognormal scales make the second moments' errors larger than a Gaussian's).
    np.testing.assert_allclose(z.mean(0), q.mean, atol=5 * z.std(0).max() / np.sqrt(n))
    c = z - z.mean(0)
    prods = c[:, :, None] * c[:, None, :]
    np.testing.assert_allclose(prods.mean(0), q.cov, atol=5 * prods.std(0).max() / np.sqrt(n))


def test_hierarchical_without_slopes_is_a_full_rank_gaussian(key):
    import equinox as eqx

    q = _perturbed(veil.HierarchicalGaussian(D), key)
    q = eqx.tree_at(lambda f: f.slope, q, jnp.zeros((D, D)))
    chol = q.lower() * jnp.exp(q.log_scale)
    mvn = jax.scipy.stats.multivariate_normal
    z = q.sample(key, 16)
    np.testing.assert_allclose(q.log_prob(z), mvn.logpdf(z, q.loc, chol @ chol.T), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(q.cov, chol @ chol.T, rtol=1e-6, atol=1e-6)


def test_the_funnel_is_a_member():
    import equinox as eqx

    d = 5
    q = veil.HierarchicalGaussian(d)
    # s = (log 3, 0, ...), A_{i0} = 3/2 (slopes() divides the field by sqrt(d)).
    q = eqx.tree_at(lambda f: (f.log_scale, f.slope), q,
                    (jnp.zeros(d).at[0].set(jnp.log(3.0)), jnp.zeros((d, d)).at[1:, 0].set(1.5 * jnp.sqrt(d))))
    z = jax.random.normal(jax.random.key(0), (32, d)) * jnp.array([3.0, 1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(q.log_prob(z), jax.vmap(_funnel)(z), rtol=1e-5, atol=1e-4)
    # The sd of x_i is sqrt(E e^{x0}) = e^{9/4}, in closed form.
    np.testing.assert_allclose(q.stddev, jnp.array([3.0] + [np.exp(9 / 4)] * (d - 1)), rtol=1e-5)


def test_hierarchical_density_integrates_to_one(key):
    # 2-d: a 1201^2 midpoint grid over a box holding all but ~1e-7 of the mass (slopes mild
    # enough that the lognormal scale's tail stays inside); the rule's error is far smaller.
    import equinox as eqx

    q = eqx.tree_at(lambda f: (f.log_scale, f.slope, f.mix), veil.HierarchicalGaussian(2),
                    (jnp.array([0.0, -0.3]), jnp.array([[0.0, 0.0], [0.5, 0.0]]), jnp.array([[0.0, 0.0], [0.4, 0.0]])))
    g = jnp.linspace(-12, 12, 1201)
    h = g[1] - g[0]
    zz = jnp.stack(jnp.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    total = float(jnp.sum(jnp.exp(q.log_prob(zz))) * h * h)
    assert abs(total - 1.0) < 1e-3


def test_hierarchical_gradients_match_finite_differences(key, grads_match_finite_differences):
    # Gradients in every parameter of log_prob at a fixed z and of the draws from fixed noise
    # (the path dadvi and veil.fit differentiate), against central differences with
    # Richardson extrapolation (conftest: tolerance 2e-3 relative), every entry.
    q = _perturbed(veil.HierarchicalGaussian(3), key)
    eps = jax.random.normal(jax.random.fold_in(key, 4), (2, 3))
    z = q.sample(jax.random.fold_in(key, 5), 1)[0]
    leaves, tree = jax.tree.flatten(q)

    @jax.jit
    def f(flat):
        qq = jax.tree.unflatten(tree, flat)
        draws, lq = qq.transform_and_log_prob(eps)
        return qq.log_prob(z) + jnp.sum(jnp.sin(draws)) + jnp.sum(lq)

    grads_match_finite_differences(f, leaves)


def test_hierarchical_invalid_construction():
    with pytest.raises(ValueError, match="dim"):
        veil.HierarchicalGaussian(0)
    with pytest.raises(ValueError, match="init_scale"):
        veil.HierarchicalGaussian(3, init_scale=0.0)
    with pytest.raises(ValueError, match="init_loc"):
        veil.HierarchicalGaussian(3, init_loc=jnp.zeros(2))


# ---------------------------------------------------------------- dadvi
def test_dadvi_on_a_gaussian_solves_the_sample_average_equations_exactly():
    # For log p = -(z - m)' P (z - m) / 2 and q = N(mu, C C'), the sample-average loss is
    # minimised where mu + C mean(eps) = m and C S C' = P^{-1}, S = mean(eps eps') of the
    # fixed draws. The draws are antithetic, so mean(eps) = 0 and mu = m exactly; C S C' = Sigma
    # is an identity of the optimum, not a Monte-Carlo statement. Tolerance: L-BFGS to float32
    # round-off on entries of size ~1.
    m = jnp.array([1.0, -2.0, 0.5])
    a = jnp.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.2, 0.5]])
    sigma = a @ a.T
    prec = jnp.linalg.inv(sigma)
    t = veil.Target.from_logdensity(lambda z: -0.5 * (z - m) @ prec @ (z - m), dim=3)
    key = jax.random.key(5)
    res = veil.dadvi(t, veil.FullRank(3), key=key, num_draws=64)
    assert res.stop_reason.startswith("converged")
    eps = _fixed_draws(jax.random.split(key, 3)[0], 64, 3)
    assert float(jnp.abs(eps.mean(0)).max()) < 1e-6
    s = eps.T @ eps / 64
    c = res.q.scale_tril
    np.testing.assert_allclose(res.q.mean, m, atol=2e-4)
    np.testing.assert_allclose(c @ s @ c.T, sigma, atol=2e-4)
    # Bookkeeping: each objective evaluation costs num_draws gradients.
    assert res.num_grad_evals % 64 == 0 and res.num_grad_evals >= 64 * res.num_steps
    assert res.trace.shape == (res.num_steps,) and np.all(np.diff(res.trace) <= 1e-4)
    assert np.isfinite(res.khat) and res.draws(100, key=jax.random.key(1))["z"].shape == (100, 3)


def test_dadvi_recovers_a_funnel_with_the_hierarchical_family():
    # 2-d funnel: the member is s0 = log 3, A_10 = 3/2. The fixed draws' error shrinks as
    # 1/sqrt(N): over 10 seeds at N = 4096 the estimates' sd was 0.017 (s0) and 0.025 (A_10),
    # with means within 0.004 of the truth; tolerances are 4 of those sds.
    t = veil.Target.from_logdensity(_funnel, dim=2)
    res = veil.dadvi(t, veil.HierarchicalGaussian(2), key=jax.random.key(0), num_draws=4096)
    assert res.stop_reason.startswith("converged")
    assert abs(float(res.q.log_scale[0]) - np.log(3.0)) < 4 * 0.017
    assert abs(float(res.q.slopes()[1, 0]) - 1.5) < 4 * 0.025


@pytest.mark.slow
def test_dadvi_gets_the_funnel_sds_within_ten_percent():
    # Issue 4's goal on the 10-d funnel: every sd within 10%. The family's sds are closed
    # form, so the only error is the fixed draws'. At N = 16384 one coordinate's sd ratio
    # varies by about 0.045 between seeds (0.09 at N = 4096 in 2-d, halved by 4x the draws):
    # 10% is ~2 of those, so this pins seed 0 and checks the goal for it
    # (docs/benchmarks/dadvi-hierarchical-gaussian-funnel.md gives five seeds).
    t = veil.Target.from_logdensity(_funnel, dim=10)
    res = veil.dadvi(t, veil.HierarchicalGaussian(10), key=jax.random.key(0), num_draws=16384)
    ratio = np.asarray(res.q.stddev) / np.array([3.0] + [np.exp(9 / 4)] * 9)
    assert np.all(np.abs(ratio - 1) < 0.10), ratio


def test_dadvi_warns_when_out_of_iterations_and_when_tuned_to_its_draws():
    t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2 / jnp.arange(1.0, 7.0)), dim=6)
    with pytest.warns(RuntimeWarning, match="max_iters"):
        res = veil.dadvi(t, veil.MeanField(6), key=jax.random.key(0), num_draws=64, max_iters=2)
    assert res.stop_reason == "max_iters" and res.num_steps == 2
    # Two draws: each scale fits |eps_i| of one draw, and fresh draws see a different q.
    with pytest.warns(RuntimeWarning, match="tuned to its draws"):
        veil.dadvi(t, veil.MeanField(6), key=jax.random.key(1), num_draws=2)


def test_dadvi_bad_input():
    t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)
    with pytest.raises(ValueError, match="even"):
        veil.dadvi(t, veil.MeanField(2), key=jax.random.key(0), num_draws=7)
    with pytest.raises(ValueError, match="dimension"):
        veil.dadvi(t, veil.MeanField(3), key=jax.random.key(0))
    with pytest.raises(TypeError, match="standard-normal noise"):
        veil.dadvi(t, veil.Mixture([veil.MeanField(2), veil.MeanField(2)]), key=jax.random.key(0))
    with pytest.raises(ValueError, match="max_iters"):
        veil.dadvi(t, veil.MeanField(2), key=jax.random.key(0), max_iters=0)
    mb = veil.Target.minibatched(lambda z: -0.5 * jnp.sum(z**2), lambda z, b: jnp.sum(b * z[0]),
                                 jnp.ones(10), dim=2, batch_size=5)
    with pytest.raises(ValueError, match="minibatched"):
        veil.dadvi(mb, veil.MeanField(2), key=jax.random.key(0))
    # A log density that is not finite where q starts: an error before any optimisation.
    bad = veil.Target.from_logdensity(lambda z: jnp.where(z[0] > 0, -0.5 * jnp.sum(z**2), -jnp.inf), dim=2)
    with pytest.raises(ValueError, match="not finite at q's start"):
        veil.dadvi(bad, veil.MeanField(2), key=jax.random.key(0), num_draws=16)
