"""Mixture families and the stratified estimator."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import veil


def _mixture(d=2):
    return veil.Mixture(
        [
            veil.FullRank(d, init_loc=jnp.full(d, -1.0), init_scale=0.6),
            veil.FullRank(d, init_loc=jnp.full(d, 1.5), init_scale=0.9),
            veil.FullRank(d, init_loc=jnp.zeros(d), init_scale=0.4),
        ],
        logits=jnp.array([0.2, -0.3, 0.5]),
    )


def test_density_draws_and_moments(key):
    q = _mixture()
    # Compiled, not op by op (a third of the time, the same numbers).
    z, lq = eqx.filter_jit(lambda m: m.sample_and_log_prob(key, 64))(q)
    log_prob = eqx.filter_jit(lambda m, x: m.log_prob(x))
    assert z.shape == (64, 2) and lq.shape == (64,) and log_prob(q, z[0]).shape == ()
    np.testing.assert_allclose(log_prob(q, z), lq, rtol=1e-6)
    # Exact: log q = log sum_k w_k q_k, from the components' own densities.
    comps = [jax.tree.map(lambda x: x[i] if isinstance(x, jax.Array) else x, q.components) for i in range(3)]
    manual = jax.scipy.special.logsumexp(
        jnp.stack([jnp.log(w) + log_prob(c, z) for w, c in zip(q.weights, comps)]), axis=0
    )
    np.testing.assert_allclose(lq, manual, rtol=1e-5, atol=1e-5)
    # Closed-form moments against 200k draws: 5 standard errors (sd <= 1.6 here).
    big = eqx.filter_jit(lambda m: m.sample(jax.random.key(1), 200_000))(q)
    np.testing.assert_allclose(big.mean(0), q.mean, atol=5 * 1.6 / math.sqrt(200_000))
    np.testing.assert_allclose(jnp.cov(big.T), q.cov, atol=5 * math.sqrt(2) * 2.6 / math.sqrt(200_000))


def test_density_integrates_to_one():
    # Midpoint rule, 500 x 500 over [-6, 7]^2: smooth integrand, error ~ h^2 ~ 1e-3 relative.
    q = _mixture()
    h = 13.0 / 500
    g = -6.0 + h * (jnp.arange(500) + 0.5)
    pts = jnp.stack(jnp.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    assert abs(float(jnp.sum(jnp.exp(q.log_prob(pts))) * h * h) - 1.0) < 2e-3


# 1-d target and mixture: the ELBO and its gradient by quadrature are exact references.
GRID = jnp.linspace(-12.0, 12.0, 24001)


def _target_1d(z):
    return jnp.logaddexp(jnp.log(0.3) - 0.5 * (z[0] + 2.0) ** 2, jnp.log(0.7) - 0.5 * ((z[0] - 2.5) / 1.5) ** 2)


def _quadrature_elbo(q):
    log_q = q.log_prob(GRID[:, None])
    log_p = jax.vmap(_target_1d)(GRID[:, None])
    return jnp.sum(jnp.exp(log_q) * (log_p - log_q)) * (GRID[1] - GRID[0])


@pytest.mark.parametrize("inner", [veil.STL(), pytest.param(veil.Reparam(), marks=pytest.mark.slow)])
def test_stratified_value_and_gradient_are_unbiased(key, inner):
    q = veil.Mixture(
        [veil.MeanField(1, init_loc=jnp.array([-1.0]), init_scale=0.8), veil.MeanField(1, init_loc=jnp.array([1.0]))],
        logits=jnp.array([0.3, -0.2]),
    )
    objective = veil.ELBO(num_samples=8, estimator=veil.Stratified(inner=inner))
    target = veil.Target.from_logdensity(_target_1d, dim=1)
    exact_value, exact_grad = jax.value_and_grad(_quadrature_elbo)(q)

    @jax.jit
    def one(k):
        return jax.value_and_grad(lambda m: -objective(m, target, k)[0])(q)

    values, grads = jax.vmap(one)(jax.random.split(key, 4000))
    # Mean of 4000 independent estimates within 5 standard errors of the exact value, for the
    # value and for every gradient entry (weights' logits included).
    se = values.std() / math.sqrt(4000)
    assert abs(float(values.mean() - exact_value)) < 5 * se + 1e-4
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(exact_grad)):
        se = g.std(0) / math.sqrt(4000)
        np.testing.assert_array_less(jnp.abs(g.mean(0) - ref), 5 * se + 1e-4)


def test_weights_converge_on_a_separated_bimodal_target(key):
    # Target 0.3 N((-4,-4), I) + 0.7 N((4,4), I) is in the family: the fit must find it,
    # weights within 0.02 (STL gradients vanish at the exact fit, so the iterates settle).
    def log_p(z):
        a = jnp.log(0.3) - 0.5 * jnp.sum((z + 4.0) ** 2)
        b = jnp.log(0.7) - 0.5 * jnp.sum((z - 4.0) ** 2)
        return jnp.logaddexp(a, b) - jnp.log(2 * jnp.pi)

    q = veil.Mixture([veil.MeanField(2, init_loc=-jnp.ones(2)), veil.MeanField(2, init_loc=jnp.ones(2))])
    res = veil.fit(veil.Target.from_logdensity(log_p, dim=2), q, key=key, progress=False)
    assert res.converged
    np.testing.assert_allclose(res.q.weights, [0.3, 0.7], atol=0.02)
    np.testing.assert_allclose(res.q.components.loc, [[-4.0, -4.0], [4.0, 4.0]], atol=0.05)
    assert abs(res.elbo) < 0.01  # log Z = 0


def test_mixture_of_flows(key):
    flow = veil.flows.radial(2, key=key, layers=2)
    q = veil.Mixture.around(flow, 3, key=key)
    z, lq = eqx.filter_jit(lambda m: m.sample_and_log_prob(key, 16))(q)
    np.testing.assert_allclose(eqx.filter_jit(lambda m, x: m.log_prob(x))(q, z), lq, rtol=1e-4, atol=1e-3)
    assert q.components.base.loc.shape == (3, 2)


def test_refusals():
    q = _mixture()
    with pytest.raises(ValueError, match="Stratified"):
        veil.ELBO().check_family(q)  # STL through a mixture's index draw: refused
    with pytest.raises(ValueError, match="needs a veil.Mixture"):
        veil.ELBO(estimator=veil.Stratified()).check_family(veil.FullRank(2))
    with pytest.raises(ValueError, match="linear"):
        veil.IWAE(k=4, estimator=veil.Stratified())
    with pytest.raises(ValueError, match="one family of one shape"):
        veil.Mixture([veil.FullRank(2), veil.MeanField(2)])
    with pytest.raises(ValueError, match="at least two"):
        veil.Mixture([veil.FullRank(2)])
    with pytest.raises(ValueError, match="logits"):
        veil.Mixture([veil.FullRank(2), veil.FullRank(2)], logits=jnp.zeros(3))
    with pytest.raises(ValueError, match="inner"):
        veil.Stratified(inner=veil.DReG())
    with pytest.raises(TypeError, match="no location to spread"):
        veil.Mixture.around(veil.Gamma(2), 2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="k must be"):
        veil.Mixture.around(veil.MeanField(2), 1, key=jax.random.key(0))
