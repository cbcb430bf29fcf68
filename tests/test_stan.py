"""``veil.Target.from_stan`` (issue 29): Stan programs compiled with httpstan's stanc and headers,
checked against hand-written NumPyro versions of the same models.

Each program is compiled once per machine (20-60 s; cached under ``$VEIL_CACHE``), so the tests
that build are marked slow; the ones that stop at stanc or at reading the inputs are quick."""

import json
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import log_density as numpyro_log_joint

import veil
from reference_checks import assert_fits_german_credit
from veil.target import stan as _stan
from veil.demo import eight_schools, eight_schools_data, german_credit, german_credit_data

pytest.importorskip("httpstan")

S8, Y8 = (np.asarray(a, np.float64) for a in eight_schools_data())  # (sigma, y)

EIGHT_SCHOOLS = """
data { int<lower=0> J; array[J] real y; array[J] real<lower=0> sigma; }
parameters { real mu; real<lower=0> tau; vector[J] theta_tilde; }
transformed parameters { vector[J] theta = mu + tau * theta_tilde; }
model {
  mu ~ normal(0, 5);
  tau ~ cauchy(0, 5);
  theta_tilde ~ normal(0, 1);
  y ~ normal(theta, sigma);
}
"""

LOGISTIC = """
data { int<lower=0> N; int<lower=0> K; matrix[N, K] x; array[N] int<lower=0, upper=1> y; }
parameters { vector[K] w; }
model { w ~ normal(0, 1); y ~ bernoulli_logit(x * w); }
"""

SIMPLEX = """
data { int<lower=0> N; vector[N] y; }
parameters { real<lower=0> sigma; simplex[3] p; }
model {
  sigma ~ normal(0, 1);
  p ~ dirichlet([2.0, 3.0, 4.0]');
  y ~ normal(3.0 * p[1], sigma);
}
"""
Y_SIMPLEX = np.array([1.3, 0.2, 2.5, 1.9])


def eight_schools_target(**kw):
    return veil.Target.from_stan(EIGHT_SCHOOLS, {"J": 8, "y": Y8, "sigma": S8}, **kw)


def _points(dim, n=5, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0.0, 1.0, (n, dim)), jnp.float32)


# ------------------------------------------------------------------ quick: no C++ build
def test_a_program_that_does_not_compile_shows_stanc_message():
    with pytest.raises(ValueError, match=r"does not compile(.|\n)*Identifier 'sigmaa' not in scope"):
        veil.Target.from_stan(EIGHT_SCHOOLS.replace("y ~ normal(theta, sigma)", "y ~ normal(theta, sigmaa)"))


def test_inputs_are_checked_before_any_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="No Stan program"):
        veil.Target.from_stan(str(tmp_path / "missing.stan"))
    with pytest.raises(ValueError, match="empty"):
        veil.Target.from_stan("   ")
    with pytest.raises(TypeError, match="Stan code"):
        veil.Target.from_stan(42)
    with pytest.raises(ValueError, match="NaN or inf"):
        _stan.data_json({"y": [1.0, np.nan]})
    with pytest.raises(ValueError, match="not valid JSON"):
        _stan.data_json("{not json")
    # Stan's JSON tells ints from reals by the decimal point; numpy types are written as such.
    assert _stan.data_json({"N": np.int64(3), "y": np.array([1.0, 2.0]), "b": True}) == \
        '{"N": 3, "y": [1.0, 2.0], "b": 1}'


# ------------------------------------------------------------------ slow: one build per program
@pytest.mark.slow
def test_eight_schools_log_density_equals_numpyro():
    # Same coordinates (mu, log tau, theta_tilde) and the same exp transform. Stan's
    # `tau ~ cauchy(0, 5)` on a <lower=0> parameter is not renormalised for the truncation,
    # NumPyro's HalfCauchy is: the two differ by exactly log 2. Tolerance: float32 round-off
    # of values ~50 (rtol 1e-5); gradients are Stan's reverse mode against JAX's (1e-4).
    t = eight_schools_target()
    ref = veil.Target.from_numpyro(eight_schools, *eight_schools_data())
    assert t.kind == "stan" and t.dim == ref.dim == 10
    assert [(s.name, s.size) for s in t.sites] == [("mu", 1), ("tau", 1), ("theta_tilde", 8)]
    z = _points(10)
    np.testing.assert_allclose(np.asarray(jax.vmap(t.log_density)(z)),
                               np.asarray(jax.vmap(ref.log_density)(z)) - math.log(2.0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(t.log_density))(z)),
                               np.asarray(jax.vmap(jax.grad(ref.log_density))(z)), rtol=1e-4, atol=1e-5)
    # one point at a time (no vmap) gives the same
    assert float(t.log_density(z[2])) == pytest.approx(float(jax.vmap(t.log_density)(z)[2]), rel=1e-7)


@pytest.mark.slow
def test_constrained_values_names_and_arviz_round_trip():
    t = eight_schools_target()
    assert t.names == ("mu", "tau", "theta_tilde", "theta")
    z = _points(10)[0]
    out = t.to_constrained(z)
    assert out["theta"].shape == (8,) and out["mu"].shape == ()
    assert float(out["tau"]) == pytest.approx(math.exp(float(z[1])), rel=1e-6)
    np.testing.assert_allclose(out["theta"], out["mu"] + out["tau"] * out["theta_tilde"], rtol=1e-5)
    # Stan's own inverse transform brings the parameters back to z
    flat = np.concatenate([np.atleast_1d(np.asarray(out[n], np.float64)) for n in ("mu", "tau", "theta_tilde")])
    np.testing.assert_allclose(t.source.model.unconstrain(flat), np.asarray(z), rtol=1e-5, atol=1e-6)
    res = veil.fit(t, veil.MeanField(10), key=jax.random.key(0), max_steps=200, stop=None, progress=False)
    idata = res.to_arviz(40, key=jax.random.key(1))
    assert idata.posterior["theta"].shape == (4, 10, 8)


@pytest.mark.slow
def test_matrix_valued_parameters_are_read_column_major():
    # Stan writes its output first-index-fastest (the CSV's b.1.1, b.2.1, ...); the draws must
    # come back in the declared shape. Its unconstrained vector holds a matrix column-major
    # (Eigen) and an array of vectors one vector after another.
    code = """
    parameters { matrix[2, 3] a; array[2] vector[3] b; }
    model { to_vector(a) ~ normal(0, 1); for (i in 1:2) b[i] ~ normal(0, 1); }
    """
    t = veil.Target.from_stan(code)
    z = jnp.arange(12.0)
    out = t.to_constrained(z)
    np.testing.assert_array_equal(out["a"], np.arange(6.0).reshape(3, 2).T)
    np.testing.assert_array_equal(out["b"], np.arange(6.0, 12.0).reshape(2, 3))


@pytest.mark.slow
def test_positive_and_simplex_parameters_carry_their_jacobians():
    # Stan maps a simplex with its own transform (not NumPyro's stick-breaking), so the
    # densities are compared at the constrained point x(z):
    # log p_stan(z) = log p(x(z)) + log|d sigma / d z_0| + log|det d p_{1:2} / d z_{1:2}|,
    # with log p the NumPyro model's density in constrained space (HalfNormal = Stan's
    # normal(0, 1) on <lower=0> plus log 2) and the simplex Jacobian by central differences of
    # Stan's own map in float64 (step 1e-6: error ~1e-10). Tolerance: float32 round-off (1e-4).
    t = veil.Target.from_stan(SIMPLEX, {"N": 4, "y": Y_SIMPLEX})
    assert t.dim == 3 and [(s.name, s.size) for s in t.sites] == [("sigma", 1), ("p", 2)]

    def model(y):
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        p = numpyro.sample("p", dist.Dirichlet(jnp.array([2.0, 3.0, 4.0])))
        numpyro.sample("y", dist.Normal(3.0 * p[0], sigma), obs=y)

    constrain = t.source.host_constrain  # float64 on the host: [sigma, p_1, p_2, p_3]
    for z in np.asarray(_points(3), np.float64):
        x = constrain(z)
        log_joint, _ = numpyro_log_joint(model, (jnp.asarray(Y_SIMPLEX, jnp.float32),), {},
                                         {"sigma": jnp.float32(x[0]), "p": jnp.asarray(x[1:], jnp.float32)})
        h = 1e-6
        jac = np.stack([(constrain(z + h * e)[1:3] - constrain(z - h * e)[1:3]) / (2 * h)
                        for e in np.eye(3)[1:]], axis=1)
        expected = float(log_joint) - math.log(2.0) + z[0] + np.linalg.slogdet(jac)[1]
        assert float(t.log_density(jnp.asarray(z, jnp.float32))) == pytest.approx(expected, abs=1e-4)
        assert x[1:].sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.slow
def test_logistic_regression_equals_numpyro_and_fits_to_the_nuts_reference():
    # German credit (25 coefficients): the same density as NumPyro's to float32 round-off of
    # values ~600 (rtol 1e-5); the FullRank fit's means within 0.1 reference sd of NUTS's and
    # sds within 10% (veil's NumPyro fit of the same model: 0.02-0.04 sd, BENCHMARKS.md).
    x, y = german_credit_data()
    t = veil.Target.from_stan(LOGISTIC, {"N": x.shape[0], "K": x.shape[1], "x": np.asarray(x, np.float64),
                                         "y": np.asarray(y, np.int64)})
    ref = veil.Target.from_numpyro(german_credit, x, y)
    z = _points(25, seed=3) * 0.1
    np.testing.assert_allclose(np.asarray(jax.vmap(t.log_density)(z)),
                               np.asarray(jax.vmap(ref.log_density)(z)), rtol=1e-5)
    assert_fits_german_credit(t)


@pytest.mark.slow
def test_simplex_fit_reaches_nuts():
    # NUTS on the NumPyro twin (4 chains x 2,000 draws, ESS > 2,000 here: its mean's MC error
    # < 0.025 sd) against veil's FullRank on the Stan target; tolerance 0.15 sd for the means
    # of sigma and p (a Gaussian on the unconstrained space is close, not exact, here).
    t = veil.Target.from_stan(SIMPLEX, {"N": 4, "y": Y_SIMPLEX})

    def model(y):
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        p = numpyro.sample("p", dist.Dirichlet(jnp.array([2.0, 3.0, 4.0])))
        numpyro.sample("y", dist.Normal(3.0 * p[0], sigma), obs=y)

    mcmc = numpyro.infer.MCMC(numpyro.infer.NUTS(model), num_warmup=1000, num_samples=2000, num_chains=4,
                              chain_method="vectorized", progress_bar=False)
    mcmc.run(jax.random.key(5), jnp.asarray(Y_SIMPLEX, jnp.float32))
    nuts = mcmc.get_samples()
    res = veil.fit(t, veil.FullRank(3), key=jax.random.key(0), progress=False)
    draws = res.draws(8000, key=jax.random.key(1))
    for name in ("sigma", "p"):
        ref = np.asarray(nuts[name])
        err = np.abs(np.asarray(draws[name]).mean(0) - ref.mean(0)) / ref.std(0)
        assert np.all(err < 0.15), (name, err)


@pytest.mark.slow
def test_same_fit_as_numpyro_twin_and_safe_from_other_threads():
    # The fit calls Stan from JAX's callback threads; a call from a new Python thread must
    # find its own autodiff tape. The fit equals the NumPyro twin's (the densities differ by
    # the constant log 2, the gradients agree to float32 round-off): means within 0.02 sd.
    t = eight_schools_target()
    out = {}
    thread = threading.Thread(target=lambda: out.update(g=np.asarray(jax.grad(t.log_density)(jnp.ones(10)))))
    thread.start()
    thread.join()
    np.testing.assert_allclose(out["g"], np.asarray(jax.grad(t.log_density)(jnp.ones(10))), rtol=1e-6)
    ref = veil.Target.from_numpyro(eight_schools, *eight_schools_data())
    a = veil.fit(t, veil.FullRank(10), key=jax.random.key(0), progress=False)
    b = veil.fit(ref, veil.FullRank(10), key=jax.random.key(0), progress=False)
    da, db = a.draws(4000, key=jax.random.key(2)), b.draws(4000, key=jax.random.key(2))
    for name in ("mu", "tau", "theta"):
        sd = np.asarray(db[name]).std(0)
        assert np.all(np.abs(np.asarray(da[name]).mean(0) - np.asarray(db[name]).mean(0)) < 0.02 * sd)


def test_missing_data_are_named_before_any_build():
    with pytest.raises(ValueError, match=r"miss variable\(s\).*sigma \(real, 1 dimensions\)"):
        veil.Target.from_stan(EIGHT_SCHOOLS, {"J": 8, "y": Y8})
    with pytest.raises(ValueError, match="no parameters"):
        veil.Target.from_stan("data { real x; } generated quantities { real y = x; }", {"x": 1.0})


@pytest.mark.slow
def test_data_that_do_not_fit_the_program_are_clear_errors():
    with pytest.raises(ValueError, match="data do not fit the Stan program.*dims declared=\\(8\\)"):
        veil.Target.from_stan(EIGHT_SCHOOLS, {"J": 8, "y": Y8, "sigma": 1.0})
    with pytest.raises(ValueError, match="data do not fit the Stan program.*sigma"):
        veil.Target.from_stan(EIGHT_SCHOOLS, {"J": 8, "y": Y8, "sigma": -S8})


@pytest.mark.slow
def test_out_of_support_values_are_counted_not_raised():
    # A model whose density throws for some parameter values (Stan checks its arguments):
    # log p = -inf there and the gradient NaN, counted by the model, no exception in JAX.
    t = veil.Target.from_stan("parameters { real a; } model { a ~ normal(0, 1); target += normal_lpdf(1 | 0, a); }")
    assert not np.isfinite(float(t.log_density(jnp.array([-1.0]))))
    assert np.isfinite(float(t.log_density(jnp.array([1.0]))))
    assert t.source.model.errors() >= 1 and "Scale parameter" in t.source.model.last_error()


@pytest.mark.slow
def test_checkpoint_tells_apart_the_data_of_one_program(tmp_path):
    # The log density is an opaque host callback, the same in JAX's program text for any
    # Stan model of the same dim: the checkpoint must still refuse another data set.
    path = str(tmp_path / "fit")
    kw = {"progress": False, "max_steps": 200, "stop": None, "checkpoint": path}
    veil.fit(eight_schools_target(), veil.MeanField(10), key=jax.random.key(0), **kw)
    again = veil.fit(eight_schools_target(), veil.MeanField(10), key=jax.random.key(0), **kw)
    assert again.num_steps == 200
    other = veil.Target.from_stan(EIGHT_SCHOOLS, {"J": 8, "y": Y8 + 1.0, "sigma": S8})
    with pytest.raises(ValueError, match="different fit: the target"):
        veil.fit(other, veil.MeanField(10), key=jax.random.key(0), **kw)


@pytest.mark.slow
def test_an_ode_model_links_the_solvers_and_matches_the_closed_form():
    # ode_bdf needs SUNDIALS' CVODES from the httpstan wheel. dy/dt = -k y, y(0) = 1 has the
    # closed form exp(-k t): the log densities agree up to the constant log 2 (Stan's normal(0, 1)
    # on a <lower=0> sigma is not renormalised, NumPyro's HalfNormal is), to the solver's
    # tolerance (relative 1e-6 on y; ~1e-3 nats here) plus float32 round-off.
    code = """
    functions { vector decay(real t, vector y, real k) { return -k * y; } }
    data { int N; array[N] real ts; vector[N] yobs; }
    parameters { real<lower=0> k; real<lower=0> sigma; }
    model {
      array[N] vector[1] mu = ode_bdf(decay, [1.0]', 0.0, ts, k);
      k ~ lognormal(0, 1);
      sigma ~ normal(0, 1);
      for (n in 1:N) yobs[n] ~ normal(mu[n][1], sigma);
    }
    """
    ts = np.linspace(0.5, 5.0, 10)
    y = np.exp(-0.7 * ts) + 0.05 * np.random.default_rng(0).normal(size=10)
    t = veil.Target.from_stan(code, {"N": 10, "ts": ts, "yobs": y})

    def model():
        k = numpyro.sample("k", dist.LogNormal(0.0, 1.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        numpyro.sample("y", dist.Normal(jnp.exp(-k * jnp.asarray(ts, jnp.float32)), sigma), obs=jnp.asarray(y, jnp.float32))

    ref = veil.Target.from_numpyro(model)
    z = _points(2, seed=4) * 0.5
    np.testing.assert_allclose(np.asarray(jax.vmap(t.log_density)(z)),
                               np.asarray(jax.vmap(ref.log_density)(z)) - math.log(2.0), atol=5e-3)


@pytest.mark.slow
def test_command_line_fits_a_stan_program(tmp_path, capsys):
    # `veil fit model.stan --data data.json`, as with CmdStan: the summary, the verdict and
    # the exit status (0: trusted), draws written with --out.
    from veil.cli import main

    (tmp_path / "model.stan").write_text(
        "data { int N; vector[N] y; } parameters { real mu; real<lower=0> sigma; }\n"
        "model { mu ~ normal(0, 10); sigma ~ normal(0, 5); y ~ normal(mu, sigma); }\n")
    # 1,000 rows: with 50 a Gaussian on (mu, log sigma) is right to 0.01 sd but k-hat reads
    # 1.07 (mu's spread grows with sigma in the joint tails), and the verdict flags it.
    y = np.random.default_rng(0).normal(1.0, 2.0, 1000).round(3).tolist()
    (tmp_path / "data.json").write_text(json.dumps({"N": 1000, "y": y}))
    out = tmp_path / "draws.csv"
    code = main(["fit", str(tmp_path / "model.stan"), "--data", str(tmp_path / "data.json"),
                 "--no-progress", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "Verdict: OK to use." in text and "sigma" in text
    assert out.read_text().splitlines()[0].split(",") == ["mu", "sigma"]
    assert main(["fit", str(tmp_path / "model.stan"), "--data", str(tmp_path / "data.csv")]) == 2
