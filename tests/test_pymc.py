"""``veil.Target.from_pymc`` (issue 29): PyMC's own log density, transforms and names, compiled
to JAX; checked against hand-written NumPyro versions of the same models."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pymc as pm
import pytest
from numpyro.infer.util import log_density as numpyro_log_joint

import veil
from reference_checks import assert_fits_german_credit
from veil.demo import eight_schools, eight_schools_data, german_credit, german_credit_data

S8, Y8 = (np.asarray(a, np.float64) for a in eight_schools_data())  # (sigma, y)


def pymc_eight_schools():
    with pm.Model(coords={"school": list("ABCDEFGH")}) as m:
        mu = pm.Normal("mu", 0.0, 5.0)
        tau = pm.HalfCauchy("tau", 5.0)
        theta_tilde = pm.Normal("theta_tilde", 0.0, 1.0, dims="school")
        theta = pm.Deterministic("theta", mu + tau * theta_tilde, dims="school")
        pm.Normal("y", theta, pm.Data("sigma", S8), observed=Y8, dims="school")
    return m


def pymc_german_credit(x, y):
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=x.shape[1])
        pm.Bernoulli("y", logit_p=pm.math.dot(x, w), observed=y)
    return m


def _points(dim, n=5, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0.0, 1.0, (n, dim)), jnp.float32)


def test_eight_schools_log_density_equals_numpyro():
    # The same model, the same unconstrained coordinates (mu, log tau, theta_tilde: both use
    # exp for a positive scale, whose log-Jacobian both include): the log densities agree to
    # float32 round-off of values ~50 (rtol 1e-5).
    t = veil.Target.from_pymc(pymc_eight_schools())
    ref = veil.Target.from_numpyro(eight_schools, *eight_schools_data())
    assert t.dim == ref.dim == 10 and [s.name for s in t.sites] == ["mu", "tau_log__", "theta_tilde"]
    for z in _points(10):
        np.testing.assert_allclose(float(t.log_density(z)), float(ref.log_density(z)), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(jax.grad(t.log_density)(z)),
                                   np.asarray(jax.grad(ref.log_density)(z)), rtol=1e-4, atol=1e-5)


def test_constrained_values_and_names_round_trip():
    t = veil.Target.from_pymc(pymc_eight_schools())
    assert t.names == ("mu", "tau", "theta_tilde", "theta")
    z = _points(10)[0]
    out = t.to_constrained(z)
    assert float(out["tau"]) == pytest.approx(math.exp(float(z[1])), rel=1e-6)
    np.testing.assert_allclose(out["theta"], out["mu"] + out["tau"] * out["theta_tilde"], rtol=1e-6)
    res = veil.fit(t, veil.MeanField(10), key=jax.random.key(0), max_steps=200, stop=None, progress=False)
    idata = res.to_arviz(40, key=jax.random.key(1))
    assert list(idata.posterior["theta"].coords["school"].values) == list("ABCDEFGH")
    assert idata.posterior["theta"].dims == ("chain", "draw", "school")


def test_positive_and_simplex_parameters_carry_their_jacobians():
    # PyMC maps a simplex with its own transform (not NumPyro's stick-breaking), so the
    # densities are compared where both are defined: at the constrained point x(z),
    # log p_pymc(z) = log p(x(z)) + log|d sigma / d z_0| + log|det d p_{1:2} / d z_{1:2}|,
    # with log p the NumPyro model's joint density in constrained space and the Jacobians
    # from jax.jacobian of veil's map z -> x. Tolerance: float32 round-off (1e-4 absolute).
    y = np.array([1.3, 0.2, 2.5, 1.9])
    with pm.Model() as m:
        sigma = pm.HalfNormal("sigma", 1.0)
        p = pm.Dirichlet("p", np.array([2.0, 3.0, 4.0]))
        pm.Normal("y", 3.0 * p[0], sigma, observed=y)

    def model(y):
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        p = numpyro.sample("p", dist.Dirichlet(jnp.array([2.0, 3.0, 4.0])))
        numpyro.sample("y", dist.Normal(3.0 * p[0], sigma), obs=y)

    t = veil.Target.from_pymc(m)
    assert t.dim == 3 and [s.name for s in t.sites] == ["sigma_log__", "p_simplex__"]
    for z in _points(3):
        x = t.to_constrained(z)
        log_joint, _ = numpyro_log_joint(model, (jnp.asarray(y, jnp.float32),), {}, {"sigma": x["sigma"], "p": x["p"]})
        jac_p = jax.jacobian(lambda u: t.to_constrained(jnp.concatenate([z[:1], u]))["p"][:2])(z[1:])
        expected = float(log_joint) + float(z[0]) + float(jnp.linalg.slogdet(jac_p)[1])
        assert float(t.log_density(z)) == pytest.approx(expected, abs=1e-4)
        # Without the change-of-variables terms: the joint density at x (what veil.MAP() maximises).
        assert float(t.log_joint(z)) == pytest.approx(float(log_joint), abs=1e-4)
        assert float(jnp.sum(x["p"])) == pytest.approx(1.0, abs=1e-6)


def test_logistic_regression_log_density_equals_numpyro():
    # German credit (25 coefficients, 1,000 rows): the same density and gradient as NumPyro's
    # to float32 round-off of values ~600 (rtol 1e-5; gradients 1e-4 relative, 1e-3 absolute
    # for sums of 1,000 terms).
    x, y = german_credit_data()
    t = veil.Target.from_pymc(pymc_german_credit(np.asarray(x, np.float64), np.asarray(y, np.int64)))
    ref = veil.Target.from_numpyro(german_credit, x, y)
    z = _points(25, seed=3) * 0.1
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(t.log_density))(z)),
                               np.asarray(jax.jit(jax.vmap(ref.log_density))(z)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(jax.grad(t.log_density)))(z)),
                               np.asarray(jax.jit(jax.vmap(jax.grad(ref.log_density)))(z)), rtol=1e-4, atol=1e-3)


def test_a_fit_reaches_the_nuts_reference():
    # German credit (25 coefficients) in PyMC, against the NUTS reference (tolerances in
    # reference_checks.assert_fits_german_credit).
    x, y = german_credit_data()
    assert_fits_german_credit(veil.Target.from_pymc(pymc_german_credit(np.asarray(x, np.float64),
                                                                       np.asarray(y, np.int64))))


def test_new_data_of_the_same_shapes_reuses_the_program():
    m = pymc_eight_schools()
    a = veil.Target.from_pymc(m)
    with m:
        pm.set_data({"sigma": 2.0 * S8})
    b = veil.Target.from_pymc(m)
    assert a.fn is b.fn and a.constrain is b.constrain
    z = _points(10)[0]
    assert float(a.log_density(z)) != float(b.log_density(z))
    expected = veil.Target.from_numpyro(eight_schools, jnp.asarray(2.0 * S8, jnp.float32), jnp.asarray(Y8, jnp.float32))
    np.testing.assert_allclose(float(b.log_density(z)), float(expected.log_density(z)), rtol=1e-5)


def test_jax_precision_is_left_as_the_caller_set_it():
    # PyTensor's JAX backend switches JAX to 64 bits on import when floatX is float64.
    before = jax.config.jax_enable_x64
    veil.Target.from_pymc(pymc_eight_schools())
    assert jax.config.jax_enable_x64 == before


def test_bad_models_are_clear_errors():
    with pm.Model() as discrete:
        pm.Poisson("k", 3.0)
    with pytest.raises(NotImplementedError, match="discrete free variable.*'k'"):
        veil.Target.from_pymc(discrete)
    with pm.Model() as empty:
        pm.Normal("y", 0.0, 1.0, observed=np.zeros(3))
    with pytest.raises(ValueError, match="no free"):
        veil.Target.from_pymc(empty)
    with pm.Model() as holes:
        mu = pm.Normal("mu", 0.0, 1.0)
        pm.Normal("y", mu, pm.Data("scale", np.array([1.0, np.inf, 2.0])), observed=np.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        veil.Target.from_pymc(holes)
    with pytest.raises(TypeError, match="pymc.Model"):
        veil.Target.from_pymc(german_credit)
