"""Log-evidence estimation: importance sampling from an ELBO fit vs chi-square VIS.

    python -m benchmarks.peers.evidence [--seeds 5]

For each model and seed: a default FullRank ELBO fit, then ``ChiSquare()`` started from it;
each fitted q is the proposal of ``VIResult.log_evidence(n=5000)`` ("IWAE(5000)" on the ELBO
fit is the same estimator: log mean of 5,000 weights). Reported: mean and sd over seeds of the
error against the exact log evidence, median k-hat, median wall time of the fits.

* Gamma-Poisson, 8 groups: lambda_g ~ Gamma(2, 1), 5 counts per group ~ Poisson(lambda_g).
  The evidence is closed form (a product of negative binomials); in veil's unconstrained
  space (log lambda) the posterior is skewed, so no Gaussian is exact.
* Two-component Gaussian mixture with unknown means: mu_1, mu_2 ~ N(0, 3^2), 30 points
  x_i ~ 0.5 N(mu_1, 1) + 0.5 N(mu_2, 1), the component marginalised. The posterior has two
  symmetric modes (label switching); the exact evidence comes from a 2-d quadrature on a
  1,201 x 1,201 grid over [-12, 12]^2 (grid-refinement change < 1e-6).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import gammaln, logsumexp

import veil


def gamma_poisson():
    a, b, groups, per = 2.0, 1.0, 8, 5
    rng = np.random.default_rng(0)
    lam = rng.gamma(a, 1 / b, groups)
    y = jnp.asarray(rng.poisson(lam[:, None], (groups, per)), jnp.float32)

    def model(y):
        lam = numpyro.sample("lam", dist.Gamma(a, b).expand([groups]))
        numpyro.sample("y", dist.Poisson(lam[:, None]), obs=y)

    s, n = y.sum(1), per
    log_z = float(jnp.sum(a * jnp.log(b) - gammaln(a) + gammaln(a + s) - (a + s) * jnp.log(b + n))
                  - jnp.sum(gammaln(y + 1)))
    return veil.Target.from_numpyro(model, y), log_z


def mixture():
    rng = np.random.default_rng(1)
    comp = rng.integers(0, 2, 30)
    x = jnp.asarray(np.where(comp, 1.5, -1.5) + rng.standard_normal(30), jnp.float32)

    def log_joint(mu):
        prior = jnp.sum(dist.Normal(0.0, 3.0).log_prob(mu))
        lik = jnp.sum(logsumexp(dist.Normal(mu[:, None], 1.0).log_prob(x[None, :]), axis=0) - jnp.log(2.0))
        return prior + lik

    grid = jnp.linspace(-12.0, 12.0, 1201)
    h = float(grid[1] - grid[0])
    g1, g2 = jnp.meshgrid(grid, grid, indexing="ij")
    vals = jax.lax.map(lambda row: jax.vmap(log_joint)(row), jnp.stack([g1, g2], -1), batch_size=64)
    log_z = float(logsumexp(vals) + 2 * np.log(h))
    return veil.Target.from_logdensity(log_joint, dim=2), log_z


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    print("| model | method | mean error | sd of error | median k-hat | median fit wall (s) |")
    print("|---|---|---|---|---|---|")
    for name, make in (("Gamma-Poisson (8-d)", gamma_poisson), ("Gaussian mixture, 2 means", mixture)):
        target, log_z = make()
        rows = {"ELBO fit + IS(5000)": [], "chi-square VIS (5000)": []}
        for seed in range(args.seeds):
            key = jax.random.key(seed)
            t0 = time.perf_counter()
            e = veil.fit(target, veil.FullRank(target.dim), key=key, progress=False)
            t1 = time.perf_counter()
            c = veil.fit(target, e.q, key=key, objective=veil.ChiSquare(), progress=False)
            t2 = time.perf_counter()
            for label, res, wall in (("ELBO fit + IS(5000)", e, t1 - t0),
                                     ("chi-square VIS (5000)", c, t2 - t0)):
                ev = res.log_evidence(key=jax.random.key(100 + seed), n=5000)
                rows[label].append((ev.estimate - log_z, ev.khat, wall))
        for label, r in rows.items():
            r = np.asarray(r)
            print(f"| {name} | {label} | {r[:, 0].mean():+.4f} | {r[:, 0].std(ddof=1):.4f} | "
                  f"{np.median(r[:, 1]):.2f} | {np.median(r[:, 2]):.2f} |", flush=True)


if __name__ == "__main__":
    main()
