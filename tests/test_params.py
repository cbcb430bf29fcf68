"""Model parameters learned beside q (issue 31, first slice): a NumPyro model's numpyro.param
sites, learned by the ELBO within their constraints (variational EM; type-II maximum likelihood
where q holds the exact posterior), checked against the closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy.optimize import minimize_scalar

import veil

Y = np.random.default_rng(3).normal(1.0, 2.0, size=50)


def model(y, s0=1.0):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    s = numpyro.param("s", s0, constraint=dist.constraints.positive)
    numpyro.sample("y", dist.Normal(mu, s), obs=y)


def _type_ii_ml(y):
    """The noise sd maximising the marginal likelihood y ~ N(0, s^2 I + 100 11^T) (float64),
    and the exact posterior of mu (mean, sd) there."""
    n = y.size

    def neg_lml(log_s):
        cov = np.exp(2 * log_s) * np.eye(n) + 100.0 * np.ones((n, n))
        return 0.5 * (np.linalg.slogdet(cov)[1] + y @ np.linalg.solve(cov, y))

    s = float(np.exp(minimize_scalar(neg_lml, bounds=(-3, 3), method="bounded", options={"xatol": 1e-10}).x))
    precision = 1 / 100 + n / s**2
    return s, (y.sum() / s**2) / precision, precision**-0.5


def test_params_reach_type_ii_maximum_likelihood():
    # mu's posterior is Gaussian, so MeanField(1) holds it exactly: at the joint optimum the ELBO
    # is the log marginal likelihood and s is its maximiser. Over three seeds the fit's s was
    # within 7e-4 of it (relative) and q within 1e-3 posterior sd: the tolerances are ten times.
    s_ml, mean, sd = _type_ii_ml(Y)
    target = veil.Target.from_numpyro(model, jnp.asarray(Y))
    assert target.has_params and float(target.constrained_params()["s"]) == pytest.approx(1.0)
    res = veil.fit(target, veil.MeanField(1), key=jax.random.key(0), progress=False)
    assert res.converged and set(res.params) == {"s"}
    assert abs(float(res.params["s"]) / s_ml - 1) < 7e-3
    assert abs(float(res.q.mean[0]) - mean) < 1e-2 * sd
    assert abs(float(res.q.stddev[0]) / sd - 1) < 1e-2
    # the result's target holds the learned value (its draws and k-hat are of that model)
    assert float(res.target.constrained_params()["s"]) == float(res.params["s"])
    assert res.summary().trustworthy


def test_targets_without_params_have_none():
    t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)
    res = veil.fit(t, veil.MeanField(2), key=jax.random.key(0), max_steps=50, stop=None, progress=False)
    assert not t.has_params and res.params == {}


def test_a_param_outside_its_constraint_is_an_error():
    with pytest.raises(ValueError, match="'s' starts at .* outside its constraint"):
        veil.Target.from_numpyro(model, jnp.asarray(Y), s0=-1.0)


def test_params_on_minibatches():
    # A subsampled plate (2,000 rows, batches of 100): the minibatch ELBO is unbiased, so s
    # reaches the same maximiser; with n = 2,000 the type-II ML noise sd is the sample sd
    # (the prior's pull ~1e-4). SGD noise at the end of the minibatch rule ~0.1% (measured
    # 0.01%): 1% allowed; mu's mean within 0.1 posterior sd.
    y = np.random.default_rng(3).normal(1.0, 2.0, size=2000).astype(np.float32)

    def batched(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        s = numpyro.param("s", 1.0, constraint=dist.constraints.positive)
        with numpyro.plate("data", y.shape[0], subsample_size=100) as idx:
            numpyro.sample("y", dist.Normal(mu, s), obs=y[idx])

    res = veil.fit(veil.Target.from_numpyro(batched, jnp.asarray(y)), veil.MeanField(1), key=jax.random.key(0),
                   progress=False)
    assert float(res.params["s"]) == pytest.approx(float(y.std()), rel=0.01)
    assert float(res.q.mean[0]) == pytest.approx(float(y.mean()), abs=0.1 * float(y.std()) / np.sqrt(2000))


def test_what_is_not_learned_yet_says_so():
    target = veil.Target.from_numpyro(model, jnp.asarray(Y))
    with pytest.raises(NotImplementedError, match=r"parameters \(s\).*one restart"):
        veil.fit(target, veil.MeanField(1), key=jax.random.key(0), num_restarts=2, progress=False)


def test_a_plain_log_density_with_params_learns_them():
    # The same model written by hand: fn(z, theta) with theta the log noise sd; the learned
    # exp(theta) reaches the same maximiser (same tolerance, same reasons as above).
    s_ml, mean, sd = _type_ii_ml(Y)
    y = jnp.asarray(Y)

    def fn(z, theta):
        s = jnp.exp(theta["log_s"])
        return (-0.5 * (z[0] / 10.0) ** 2 - y.size * jnp.log(s) - 0.5 * jnp.sum(((y - z[0]) / s) ** 2))

    target = veil.Target.from_logdensity(fn, dim=1, params={"log_s": 0.0})
    res = veil.fit(target, veil.MeanField(1), key=jax.random.key(1), progress=False)
    assert abs(float(jnp.exp(res.params["log_s"])) / s_ml - 1) < 7e-3
    assert abs(float(res.q.mean[0]) - mean) < 1e-2 * sd


def test_plain_params_are_checked():
    with pytest.raises(TypeError, match="floating-point"):
        veil.Target.from_logdensity(lambda z, th: -jnp.sum(z**2), dim=1, params={"n": 3})
    with pytest.raises(ValueError, match="non-finite"):
        veil.Target.from_logdensity(lambda z, th: -jnp.sum(z**2), dim=1, params={"a": jnp.nan})


def _regression_data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(200, 1)), jnp.float32)
    y = 2.0 * x[:, 0] + 1.0 + 0.3 * jnp.asarray(rng.normal(size=200), jnp.float32)
    ols = np.linalg.lstsq(np.c_[np.asarray(x, np.float64), np.ones(200)], np.asarray(y, np.float64), rcond=None)[0]
    return x, y, ols


def test_a_network_inside_a_numpyro_model_is_learned():
    # numpyro.contrib.module.eqx_module registers an equinox network's weights as one
    # numpyro.param site whose value is a pytree. y = net(x) + N(0, sigma^2) with sigma latent:
    # whatever q(sigma), the ELBO's gradient in the weights vanishes at least squares, so the
    # learned weight and bias are the OLS fit (to the optimiser's tolerance: 1e-3 measured 1e-6).
    import equinox as eqx
    from numpyro.contrib.module import eqx_module

    x, y, ols = _regression_data()
    linear = eqx.nn.Linear(1, 1, key=jax.random.key(0))

    def regression(x, y):
        net = eqx_module("net", linear)
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Normal(jax.vmap(net)(x)[:, 0], sigma), obs=y)

    t = veil.Target.from_numpyro(regression, x, y)
    assert [s.name for s in t.param_sites] == ["net$params"] and t.dim == 1
    res = veil.fit(t, veil.MeanField(1), key=jax.random.key(0), progress=False)
    net = res.params["net$params"]
    assert float(net.weight[0, 0]) == pytest.approx(ols[0], abs=1e-3)
    assert float(net.bias[0]) == pytest.approx(ols[1], abs=1e-3)
    assert float(linear.weight[0, 0]) != pytest.approx(ols[0], abs=0.1)  # the user's module is untouched


def test_an_equinox_module_as_a_plain_log_densitys_params():
    # The same regression written by hand, the network itself as the params pytree.
    import equinox as eqx

    x, y, ols = _regression_data()

    def fn(z, net):
        sigma = jnp.exp(z[0])
        resid = y - jax.vmap(net)(x)[:, 0]
        return -0.5 * jnp.exp(2 * z[0]) - y.size * jnp.log(sigma) - 0.5 * jnp.sum((resid / sigma) ** 2) + z[0]

    net0 = eqx.nn.Linear(1, 1, key=jax.random.key(0))
    res = veil.fit(veil.Target.from_logdensity(fn, dim=1, params=net0), veil.MeanField(1), key=jax.random.key(0),
                   progress=False)
    assert float(res.params.weight[0, 0]) == pytest.approx(ols[0], abs=1e-3)
    assert float(res.params.bias[0]) == pytest.approx(ols[1], abs=1e-3)
