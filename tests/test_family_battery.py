"""The property battery over every family veil ships (issue 30, STYLE.md habit 9): each family
is registered with the checks it supports, from what it declares (an exact density, closed-form
or Monte-Carlo moments, a reparameterised draw), so a new family joins by one line here.

Gaussian-only checks (NumPyro's density, the scale operators) stay in test_families.py."""

import equinox as eqx
import flowjax.distributions as fjd
import paramax
import flowjax.flows as fjf
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import veil
from veil.family import MonteCarloMoments

D = 4
_NORMAL = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=D)

def _battery_model():
    numpyro.sample("mu", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.sample("s", dist.HalfNormal(1.0).expand([2]).to_event(1))


def _battery_guide():
    positive = dist.constraints.positive
    numpyro.sample("mu", dist.Normal(numpyro.param("loc", jnp.zeros(2)),
                                     numpyro.param("scale", jnp.ones(2), constraint=positive)).to_event(1))
    numpyro.sample("s", dist.LogNormal(numpyro.param("a", jnp.zeros(2)),
                                       numpyro.param("b", jnp.ones(2), constraint=positive)).to_event(1))


# name -> (factory, checks). Checks: "exact" (log_prob is the density of the draws: it agrees
# with sample_and_log_prob and its gradient with finite differences, both in float64 so that
# the identities are sharp), "moments" (mean and cov agree with draws; positive definite cov).
REGISTRY = {
    "MeanField": (lambda k: veil.MeanField(D), {"exact", "moments"}),
    "FullRank": (lambda k: veil.FullRank(D), {"exact", "moments"}),
    "LowRank": (lambda k: veil.LowRank(D, 2), {"exact", "moments"}),
    "HierarchicalGaussian": (lambda k: veil.HierarchicalGaussian(D), {"exact", "moments"}),
    "Gamma": (lambda k: veil.Gamma(D), {"exact", "moments"}),
    "Beta": (lambda k: veil.Beta(D), {"exact", "moments"}),
    "Dirichlet": (lambda k: veil.Dirichlet(D + 1), {"exact", "moments"}),
    "VonMises": (lambda k: veil.VonMises(D), {"exact"}),
    "Poisson": (lambda k: veil.Poisson(D, init_rate=3.0), {"exact", "moments"}),
    "Composite": (lambda k: veil.Composite([veil.MeanField(2), veil.Gamma(2)]), {"exact", "moments"}),
    "Mixture": (lambda k: veil.Mixture([veil.MeanField(D, init_loc=-jnp.ones(D)), veil.MeanField(D, init_loc=jnp.ones(D))]),
                {"exact", "moments"}),
    "Flow": (lambda k: veil.flows.coupling(D, key=k), {"exact", "moments"}),
    "FlowJAX": (lambda k: veil.FlowJAX(fjf.masked_autoregressive_flow(k, base_dist=fjd.Normal(jnp.zeros(D)))),
                {"exact", "moments"}),
    "SemiImplicit": (lambda k: veil.SemiImplicit(D, key=k, width=8), {"moments"}),
    "MixFlow": (lambda k: veil.MixFlow(_NORMAL, veil.MeanField(D, init_scale=1.0), step_size=0.05, num_leapfrog=3,
                                       num_maps=5), {"moments"}),
    "Guide": (lambda k: veil.Guide(_battery_guide, veil.Target.from_numpyro(_battery_model)), {"exact", "moments"}),
    # A point mass: no density to check, and a zero covariance (test_delta.py checks it).
    "Delta": (lambda k: veil.Delta(D), set()),
}


# Families whose moments are themselves Monte-Carlo estimates without the MonteCarloMoments
# mixin: the draws behind them.
MC_MOMENTS = {"Dirichlet": 4096}
# How far parameters move off their start (default 0.2). A flow's weights moved by 0.2 give a
# map with variances in the hundreds and tails too heavy for 100k draws to pin its moments;
# 0.05 still leaves every layer far from the identity it starts at.
PERTURB = {"Flow": 0.05, "FlowJAX": 0.05}
# The spline flows' inverse is a quadratic's root, which loses digits near a knot: 1e-3 nats.
DENSITY_ATOL = {"FlowJAX": 1e-3}


def _split(q):
    """``(trainable, rest)``: the floating-point parameters a fit moves, and the rest (integer
    arrays, and FlowJAX's non-trainable arrays such as autoregressive masks)."""
    return eqx.partition(q, eqx.is_inexact_array, is_leaf=lambda x: isinstance(x, paramax.NonTrainable))


def _perturbed(q, key, dtype, scale):
    """``q`` with every trainable parameter moved off its initial value (a generic member:
    unequal scales, non-zero off-diagonals, unequal weights), in ``dtype``."""
    params, rest = _split(q)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    moved = [x.astype(dtype) + scale * jax.random.normal(k, x.shape, dtype) for x, k in zip(leaves, keys)]
    return eqx.combine(jax.tree.unflatten(tree, moved), rest)


def _registered(check):
    return [name for name, (_, checks) in REGISTRY.items() if check is None or check in checks]


def _family(name, key, dtype=jnp.float32):
    make, _ = REGISTRY[name]
    return _perturbed(make(jax.random.key(7)), key, dtype, PERTURB.get(name, 0.2))


def test_every_family_veil_exports_is_registered():
    exported = {n for n in veil.families.__all__ if isinstance(getattr(veil, n, None), type)
                and issubclass(getattr(veil, n), veil.Family) and n not in ("Family", "Empirical")}
    assert exported <= set(REGISTRY), exported - set(REGISTRY)


@pytest.mark.parametrize("name", _registered(None))
def test_shapes(name, key):
    q = _family(name, key)
    z, lq = q.sample_and_log_prob(key, 7)
    assert z.shape == (7, q.dim) and lq.shape == (7,)
    assert q.sample(key, 3).shape == (3, q.dim)
    assert bool(jnp.all(jnp.isfinite(z))) and bool(jnp.all(jnp.isfinite(lq)))


@pytest.mark.parametrize("name", _registered("exact"))
def test_log_prob_is_the_density_of_the_draws(name, key):
    # The same density two ways (with the draws, and from z by the inverse map), in float64:
    # equal to 1e-8 (in float32 a perturbed flow's inverse loses up to 0.1 nats to round-off).
    with jax.enable_x64(True):
        q = _family(name, key, jnp.float64)
        z, lq = q.sample_and_log_prob(key, 64)
        np.testing.assert_allclose(np.asarray(q.log_prob(z)), np.asarray(lq), rtol=1e-8, atol=DENSITY_ATOL.get(name, 1e-8))


@pytest.mark.parametrize("name", _registered("exact"))
def test_log_prob_gradient_matches_finite_differences(name, key, grads_match_finite_differences):
    # Central differences with Richardson extrapolation (conftest: 2e-3 relative), the first 6
    # entries of every trainable parameter, in float64 (in float32 the differences of a log
    # density of size ~20 lose ~1e-3 relative to round-off, the tolerance itself) with steps of
    # 1e-4 (a flow's log density curves sharply in some weights; float64 round-off over 1e-4
    # is ~1e-12 relative).
    with jax.enable_x64(True):
        q = _family(name, key, jnp.float64)
        z = q.sample(key, 1)[0]
        params, rest = _split(q)
        leaves, tree = jax.tree.flatten(params)

        @jax.jit  # compiled once: op by op, a flow's 70 evaluations took 30 s
        def f(flat):
            return eqx.combine(jax.tree.unflatten(tree, flat), rest).log_prob(z)

        grads_match_finite_differences(f, leaves, entries=6, h=1e-4)


@pytest.mark.parametrize("name", _registered("moments"))
def test_mean_and_cov_agree_with_draws(name, key):
    # n = 100k fresh draws against q's moments. Standard errors from the draws themselves (the
    # sd of each coordinate, and of each centred product for the covariance: no normal-theory
    # shortcut, as flows' and constrained families' tails are heavier); a Monte-Carlo family's
    # moments average moment_draws draws of their own, so the two errors add. 5 standard errors
    # of the difference (false failure ~1e-6 per entry) set each tolerance.
    q = _family(name, key)
    n = 100_000
    z = np.asarray(q.sample(jax.random.fold_in(key, 1), n), np.float64)
    mean, cov = np.asarray(q.mean, np.float64), np.asarray(q.cov, np.float64)
    n_ref = q.moment_draws if isinstance(q, MonteCarloMoments) else MC_MOMENTS.get(name, np.inf)
    inflate = np.sqrt(1 + n / n_ref)  # se of (mean of n) - (mean of n_ref), relative to that of n
    c = z - z.mean(0)
    products = c[:, :, None] * c[:, None, :]
    np.testing.assert_array_less(np.abs(z.mean(0) - mean), 5 * inflate * z.std(0) / np.sqrt(n))
    np.testing.assert_array_less(np.abs(np.cov(z.T) - cov), 5 * inflate * products.std(0) / np.sqrt(n) + 1e-12)
    assert np.all(np.linalg.eigvalsh(cov) > 0)
