"""Gradient-estimator variance: which estimator gives how much less noise, and where.

    python -m benchmarks.peers.gradient_variance [--n 2000]

Table 1 — German-credit logistic regression (NumPyro model, 25-d), FullRank and MeanField, at
two points: *mid-way* (the default fit's iterate after 200 steps) and *optimum* (the default
fit's result). For each objective/estimator: the total variance of one gradient estimate (sum
over parameters, ``veil.diagnostics.gradient_variance``, ``n`` keys), its ratio to the plain
reparameterisation estimator of the same objective, and the squared signal-to-noise ratio.

Table 2 — a Gamma family (veil.Gamma, on log scale) on the 8-group Gamma-Poisson model of
benchmarks/peers/evidence.py: RSVI against JAX's implicit reparameterisation (STL, Reparam) and the
score-function estimator, mid-way and at the optimum.

Table 3 — dimensional dependence (Kim et al., 2023, "Practical and Matching Gradient Variance
Bounds for Black-Box Variational Bayesian Inference": mean-field's bound grows more slowly with
the dimension than full-rank's). Target: a Gaussian with covariance eigenvalues log-spaced in
[0.1, 10] in a random basis; q: standard normal start (loc 0, scale 1); ELBO with 1 draw and
the reparameterisation estimator; total gradient variance for d = 10 ... 320 (for FullRank
both in veil's parameters, whose off-diagonal factor entries are scaled by 1/sqrt(d), and in
plain Cholesky entries), and the slope of log variance against log d.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import veil
from veil.diagnostics import gradient_variance


def german_credit():
    import numpyro
    import numpyro.distributions as dist

    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]))
        numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)

    x, y = veil.demo.german_credit_data()
    return veil.Target.from_numpyro(model, x, y)


ESTIMATORS = [
    ("ELBO(4)", "Reparam", veil.ELBO(num_samples=4, estimator=veil.Reparam())),
    ("ELBO(4)", "STL (= DReG)", veil.ELBO(num_samples=4, estimator=veil.STL())),
    ("ELBO(4)", "STL + Sobol RQMC", veil.ELBO(num_samples=4, estimator=veil.STL(noise=veil.Sobol()))),
    ("ELBO(4)", "Unscented (2d+1 points)", veil.ELBO(estimator=veil.Unscented())),
    ("ELBO(4)", "Score, LOO baseline", veil.ELBO(num_samples=4, estimator=veil.ScoreFunction())),
    ("ELBO(4)", "Score, no baseline", veil.ELBO(num_samples=4, estimator=veil.ScoreFunction(baseline=None))),
    ("IWAE(8)", "Reparam", veil.IWAE(k=8, estimator=veil.Reparam())),
    ("IWAE(8)", "DReG", veil.IWAE(k=8, estimator=veil.DReG())),
    ("IWAE(8)", "Score, LOO baseline", veil.IWAE(k=8, estimator=veil.ScoreFunction())),
]


def table_german_credit(n: int):
    target = german_credit()
    print("| family | point | objective | estimator | total variance | / Reparam | SNR |")
    print("|---|---|---|---|---|---|---|")
    for family in (veil.FullRank, veil.MeanField):
        mid = veil.fit(target, family(target.dim), key=jax.random.key(0), max_steps=200,
                       stop=None, progress=False).q
        opt = veil.fit(target, family(target.dim), key=jax.random.key(0), progress=False).q
        for point, q in (("mid-way", mid), ("optimum", opt)):
            ref = {}
            for obj_name, est_name, objective in ESTIMATORS:
                gv = gradient_variance(objective, q, target, jax.random.key(1), n)
                ref.setdefault(obj_name, gv.total)
                print(f"| {family.__name__} | {point} | {obj_name} | {est_name} | {gv.total:.4g} | "
                      f"{gv.total / ref[obj_name]:.3g} | {gv.snr:.3g} |", flush=True)


def table_gamma_poisson(n: int):
    """Gamma family on an 8-group Gamma-Poisson model (benchmarks/peers/evidence.py): RSVI against
    the implicit-reparameterisation STL and the score-function estimator."""

    from benchmarks.peers.evidence import gamma_poisson

    target, _ = gamma_poisson()
    rows = [
        ("STL, implicit reparameterisation", veil.ELBO(num_samples=4, estimator=veil.STL())),
        ("Reparam, implicit", veil.ELBO(num_samples=4, estimator=veil.Reparam())),
        ("RSVI, boost 1", veil.ELBO(num_samples=4, estimator=veil.RSVI(boost=1))),
        ("RSVI, boost 4", veil.ELBO(num_samples=4, estimator=veil.RSVI(boost=4))),
        ("Score, LOO baseline", veil.ELBO(num_samples=4, estimator=veil.ScoreFunction())),
    ]
    mid = veil.fit(target, veil.Gamma(target.dim), key=jax.random.key(0), max_steps=200,
                   stop=None, progress=False).q
    opt = veil.fit(target, veil.Gamma(target.dim), key=jax.random.key(0), progress=False).q
    print("| point | estimator (ELBO, 4 draws) | total variance | / score function |")
    print("|---|---|---|---|")
    for point, q in (("mid-way", mid), ("optimum", opt)):
        res = [(name, gradient_variance(obj, q, target, jax.random.key(3), n).total) for name, obj in rows]
        score = res[-1][1]
        for name, total in res:
            print(f"| {point} | {name} | {total:.4g} | {total / score:.3g} |", flush=True)


def gaussian_target(d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    eig = np.logspace(-1, 1, d)
    prec = jnp.asarray(basis @ np.diag(1 / eig) @ basis.T, jnp.float32)
    return veil.Target.from_logdensity(lambda z: -0.5 * z @ prec @ z, dim=d)


def table_dimension(n: int):
    dims = [10, 20, 40, 80, 160, 320]
    objective = veil.ELBO(num_samples=1, estimator=veil.Reparam())
    rows = {}
    for d in dims:
        t = gaussian_target(d)
        for family in (veil.MeanField, veil.FullRank):
            q = family(d, init_scale=1.0)
            gv = gradient_variance(objective, q, t, jax.random.key(2), n)
            rows[(family.__name__, d)] = gv.total
            if family is veil.FullRank:
                # The same estimator's variance in plain Cholesky coordinates L_ij (i > j):
                # veil's factor is L = diag(s) (I + T / sqrt(d)), so at s = 1 a gradient in
                # L_ij is sqrt(d) times the one in T_ij and its variance d times.
                v = gv.variance
                rows[("FullRank, plain Cholesky", d)] = float(
                    jnp.sum(v.loc) + jnp.sum(v.log_scale) + d * jnp.sum(v.unit_tril))
    print("| d | MeanField | FullRank (veil's parameters) | FullRank (plain Cholesky entries) | "
          "veil FullRank / MeanField | plain FullRank / MeanField |")
    print("|---|---|---|---|---|---|")
    for d in dims:
        mf, fr, pl = (rows[(k, d)] for k in ("MeanField", "FullRank", "FullRank, plain Cholesky"))
        print(f"| {d} | {mf:.4g} | {fr:.4g} | {pl:.4g} | {fr / mf:.2f} | {pl / mf:.1f} |")
    for name in ("MeanField", "FullRank", "FullRank, plain Cholesky"):
        slope = np.polyfit(np.log(dims), np.log([rows[(name, d)] for d in dims]), 1)[0]
        print(f"{name}: total variance grows like d^{slope:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    t0 = time.perf_counter()
    table_german_credit(args.n)
    print()
    table_gamma_poisson(args.n)
    print()
    table_dimension(args.n)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
