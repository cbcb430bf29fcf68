"""The verdict's false-alarm and true-alarm rates (issue 28).

    python benchmarks/verdict_bank.py [--seeds 5] [--out results.jsonl]

Two banks of fits, each fit run with ``veil.fit``'s defaults and judged by
``res.summary().trustworthy`` (the line "Verdict: OK to use." or "do NOT trust"):

* False-alarm bank: fits that are exact or exact up to the optimiser's noise, where the
  verdict must say OK on every one. Gaussian targets with a Gaussian family that contains them
  (MeanField on independent Gaussians of dimension 2-100 with scales from 0.1 to 10; FullRank
  on correlated Gaussians of dimension 2-50), and conjugate NumPyro models whose posterior in
  veil's unconstrained space is Gaussian (normal mean with known noise; Bayesian linear
  regression with known noise, FullRank).
* True-alarm bank: fits known to be wrong, where the verdict must flag each. A family that
  cannot hold the target (MeanField and FullRank on Neal's funnel, on a banana, on a Student-t
  with 3 degrees of freedom; MeanField on a Gaussian with correlation 0.95 in 10 dimensions),
  a bimodal target a Gaussian cannot cover (two modes 3 sds apart, and modes 8 sds apart
  fitted with ``num_restarts=4``), and fits stopped early (``max_steps=100``).

Printed: the rate per bank and per case, and each miss with its k-hat and stop reason.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import veil


# ---------------------------------------------------------------------------- targets
def independent_gaussian(d, seed):
    rng = np.random.default_rng(seed)
    m = rng.normal(0.0, 3.0, d).astype(np.float32)
    s = np.exp(rng.uniform(np.log(0.1), np.log(10.0), d)).astype(np.float32)
    return veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(((z - m) / s) ** 2), dim=d)


def correlated_gaussian(d, seed, rho=None):
    rng = np.random.default_rng(seed)
    m = rng.normal(0.0, 3.0, d).astype(np.float32)
    if rho is None:  # a random covariance with condition number up to ~100
        a = rng.standard_normal((d, d)) / math.sqrt(d)
        cov = a @ a.T + 0.05 * np.eye(d)
    else:
        cov = (1 - rho) * np.eye(d) + rho * np.ones((d, d))
    prec = jnp.asarray(np.linalg.inv(cov), jnp.float32)
    return veil.Target.from_logdensity(lambda z: -0.5 * (z - m) @ prec @ (z - m), dim=d)


def normal_mean(d, seed):
    rng = np.random.default_rng(seed)
    y = jnp.asarray(rng.normal(rng.normal(0, 2, d), 1.0, (20, d)), jnp.float32)

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0).expand([d]))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    return veil.Target.from_numpyro(model, y)


def linear_regression(d, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((50, d)) + 0.5 * rng.standard_normal((50, 1)), jnp.float32)
    y = x @ jnp.asarray(rng.normal(0, 1, d), jnp.float32) + jnp.asarray(rng.normal(0, 0.5, 50), jnp.float32)

    def model(x, y):
        w = numpyro.sample("w", dist.Normal(0.0, 2.0).expand([d]))
        numpyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)

    return veil.Target.from_numpyro(model, x, y)


def funnel(d):
    def log_p(z):
        v, x = z[0], z[1:]
        return -0.5 * (v / 3.0) ** 2 - 0.5 * jnp.sum(x**2) * jnp.exp(-v) - 0.5 * (d - 1) * v

    return veil.Target.from_logdensity(log_p, dim=d)


def banana():
    def log_p(z):
        return -0.5 * (z[0] / 2.0) ** 2 - 0.5 * ((z[1] - 0.5 * (z[0] ** 2 - 4.0)) / 0.5) ** 2

    return veil.Target.from_logdensity(log_p, dim=2)


def student_t(d):
    return veil.Target.from_logdensity(lambda z: jnp.sum(dist.StudentT(3.0).log_prob(z)), dim=d)


def bimodal(d, gap):
    def log_p(z):
        return jnp.logaddexp(-0.5 * jnp.sum((z - gap / 2) ** 2), -0.5 * jnp.sum((z + gap / 2) ** 2))

    return veil.Target.from_logdensity(log_p, dim=d)


# ---------------------------------------------------------------------------- banks
def false_alarm_cases(seeds):
    for s in seeds:
        for d in (2, 10, 50, 100):
            yield f"MeanField, independent Gaussian d={d}", lambda d=d, s=s: (independent_gaussian(d, s), veil.MeanField(d), {})
        for d in (2, 10, 50):
            yield f"FullRank, correlated Gaussian d={d}", lambda d=d, s=s: (correlated_gaussian(d, s), veil.FullRank(d), {})
        yield "MeanField, normal mean d=5 (conjugate)", lambda s=s: (normal_mean(5, s), veil.MeanField(5), {})
        yield "FullRank, linear regression d=8 (conjugate)", lambda s=s: (linear_regression(8, s), veil.FullRank(8), {})


def true_alarm_cases(seeds):
    for s in seeds:
        for fam in ("MeanField", "FullRank"):
            yield f"{fam}, Neal's funnel d=10", lambda fam=fam: (funnel(10), getattr(veil, fam)(10), {})
            yield f"{fam}, banana", lambda fam=fam: (banana(), getattr(veil, fam)(2), {})
            yield f"{fam}, Student-t(3) d=10", lambda fam=fam: (student_t(10), getattr(veil, fam)(10), {})
        yield "MeanField, Gaussian with correlation 0.95 d=10", lambda s=s: (correlated_gaussian(10, s, 0.95), veil.MeanField(10), {})
        yield "FullRank, bimodal modes 3 sd apart d=2", lambda: (bimodal(2, 3.0), veil.FullRank(2), {})
        yield "FullRank, bimodal modes 8 sd apart d=2, 4 restarts", lambda: (bimodal(2, 8.0), veil.FullRank(2), {"num_restarts": 4})
        yield "FullRank, linear regression d=8 stopped at 100 steps", lambda s=s: (linear_regression(8, s), veil.FullRank(8), {"max_steps": 100})


def run_bank(cases, seed_of, want_ok: bool, out):
    per_case, misses, walls = {}, [], []
    for i, (name, make) in enumerate(cases):
        target, q, kw = make()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = veil.fit(target, q, key=jax.random.key(seed_of(i)), progress=False, **kw)
            s = res.summary()
        walls.append(time.perf_counter() - t0)
        right = s.trustworthy == want_ok
        per_case.setdefault(name, []).append(right)
        row = {"bank": "false-alarm" if want_ok else "true-alarm", "case": name, "right": right,
               "khat": res.khat, "stop": res.stop_reason, "steps": res.num_steps}
        if out is not None:
            out.write(json.dumps(row) + "\n")
        if not right:
            misses.append(row)
    return per_case, misses, walls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    out = open(args.out, "a") if args.out else None
    print(f"jax {jax.__version__}, veil {veil.__version__ if hasattr(veil, '__version__') else ''}, seeds {seeds}")
    for label, cases, want_ok in (("false-alarm bank (verdict must be OK)", false_alarm_cases(seeds), True),
                                  ("true-alarm bank (verdict must flag)", true_alarm_cases(seeds), False)):
        per_case, misses, walls = run_bank(list(cases), lambda i: 1000 + i, want_ok, out)
        total = sum(len(v) for v in per_case.values())
        right = sum(sum(v) for v in per_case.values())
        print(f"\n### {label}: {right}/{total} right ({100 * right / total:.1f}%), median fit {np.median(walls):.2f} s\n")
        print("| case | right |")
        print("|---|---|")
        for name, v in per_case.items():
            print(f"| {name} | {sum(v)}/{len(v)} |")
        for m in misses:
            print(f"miss: {m['case']}: k-hat {m['khat']:.2f}, stop {m['stop']}, {m['steps']} steps")
    if out is not None:
        out.close()


if __name__ == "__main__":
    main()
