"""The verdict's false-alarm and true-alarm rates (issue 28).

    python -m benchmarks.studies.verdict_bank [--seeds 5] [--out results.jsonl]

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

Each fit is also measured against the target's true mean and sd (exact, or from a million
exact draws; 20,000 draws of q): "wrong" when some coordinate's mean is off by more than 0.2
true sds or its sd by more than a factor 1.25. Printed: each bank's rate as the issue defines
it, per case, and the rates by measurement (flagged among the fits measured wrong, and among
those measured right), with every disagreement listed.
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
# Each maker returns (target, truth): truth is (mean, sd) of the target in veil's unconstrained
# space (every target here is unconstrained), exact or from a million exact draws.
def independent_gaussian(d, seed):
    rng = np.random.default_rng(seed)
    m = rng.normal(0.0, 3.0, d).astype(np.float32)
    s = np.exp(rng.uniform(np.log(0.1), np.log(10.0), d)).astype(np.float32)
    return veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(((z - m) / s) ** 2), dim=d), (m, s)


def correlated_gaussian(d, seed, rho=None):
    rng = np.random.default_rng(seed)
    m = rng.normal(0.0, 3.0, d).astype(np.float32)
    if rho is None:  # a random covariance with condition number up to ~100
        a = rng.standard_normal((d, d)) / math.sqrt(d)
        cov = a @ a.T + 0.05 * np.eye(d)
    else:
        cov = (1 - rho) * np.eye(d) + rho * np.ones((d, d))
    prec = jnp.asarray(np.linalg.inv(cov), jnp.float32)
    return veil.Target.from_logdensity(lambda z: -0.5 * (z - m) @ prec @ (z - m), dim=d), (m, np.sqrt(np.diag(cov)))


def normal_mean(d, seed):
    rng = np.random.default_rng(seed)
    y = rng.normal(rng.normal(0, 2, d), 1.0, (20, d))

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0).expand([d]))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    prec = 20 + 1 / 25
    return veil.Target.from_numpyro(model, jnp.asarray(y, jnp.float32)), (y.sum(0) / prec, np.full(d, prec**-0.5))


def linear_regression(d, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((50, d)) + 0.5 * rng.standard_normal((50, 1))
    y = x @ rng.normal(0, 1, d) + rng.normal(0, 0.5, 50)

    def model(x, y):
        w = numpyro.sample("w", dist.Normal(0.0, 2.0).expand([d]))
        numpyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)

    cov = np.linalg.inv(x.T @ x / 0.25 + np.eye(d) / 4.0)
    mean = cov @ (x.T @ y / 0.25)
    target = veil.Target.from_numpyro(model, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    return target, (mean, np.sqrt(np.diag(cov)))


def _sampled(draws):
    return draws.mean(0), draws.std(0)


def funnel(d):
    def log_p(z):
        v, x = z[0], z[1:]
        return -0.5 * (v / 3.0) ** 2 - 0.5 * jnp.sum(x**2) * jnp.exp(-v) - 0.5 * (d - 1) * v

    rng = np.random.default_rng(0)
    v = rng.normal(0, 3, (10**6, 1))
    draws = np.hstack([v, rng.standard_normal((10**6, d - 1)) * np.exp(v / 2)])
    return veil.Target.from_logdensity(log_p, dim=d), _sampled(draws)


def banana():
    def log_p(z):
        return -0.5 * (z[0] / 2.0) ** 2 - 0.5 * ((z[1] - 0.5 * (z[0] ** 2 - 4.0)) / 0.5) ** 2

    return veil.Target.from_logdensity(log_p, dim=2), (np.array([0.0, 0.0]), np.array([2.0, math.sqrt(8.25)]))


def student_t(d):
    target = veil.Target.from_logdensity(lambda z: jnp.sum(dist.StudentT(3.0).log_prob(z)), dim=d)
    return target, (np.zeros(d), np.full(d, math.sqrt(3.0)))


def bimodal(d, gap):
    def log_p(z):
        return jnp.logaddexp(-0.5 * jnp.sum((z - gap / 2) ** 2), -0.5 * jnp.sum((z + gap / 2) ** 2))

    return veil.Target.from_logdensity(log_p, dim=d), (np.zeros(d), np.full(d, math.sqrt(1 + gap**2 / 4)))


# ---------------------------------------------------------------------------- banks
def false_alarm_cases(seeds):
    for s in seeds:
        for d in (2, 10, 50, 100):
            yield f"MeanField, independent Gaussian d={d}", lambda d=d, s=s: (*independent_gaussian(d, s), veil.MeanField(d), {})
        for d in (2, 10, 50):
            yield f"FullRank, correlated Gaussian d={d}", lambda d=d, s=s: (*correlated_gaussian(d, s), veil.FullRank(d), {})
        yield "MeanField, normal mean d=5 (conjugate)", lambda s=s: (*normal_mean(5, s), veil.MeanField(5), {})
        yield "FullRank, linear regression d=8 (conjugate)", lambda s=s: (*linear_regression(8, s), veil.FullRank(8), {})


def true_alarm_cases(seeds):
    for s in seeds:
        for fam in ("MeanField", "FullRank"):
            yield f"{fam}, Neal's funnel d=10", lambda fam=fam: (*funnel(10), getattr(veil, fam)(10), {})
            yield f"{fam}, banana", lambda fam=fam: (*banana(), getattr(veil, fam)(2), {})
            yield f"{fam}, Student-t(3) d=10", lambda fam=fam: (*student_t(10), getattr(veil, fam)(10), {})
        yield "MeanField, Gaussian with correlation 0.95 d=10", \
            lambda s=s: (*correlated_gaussian(10, s, 0.95), veil.MeanField(10), {})
        yield "FullRank, bimodal modes 3 sd apart d=2", lambda: (*bimodal(2, 3.0), veil.FullRank(2), {})
        yield "FullRank, bimodal modes 8 sd apart d=2, 4 restarts", \
            lambda: (*bimodal(2, 8.0), veil.FullRank(2), {"num_restarts": 4})
        yield "FullRank, linear regression d=8 stopped at 100 steps", \
            lambda s=s: (*linear_regression(8, s), veil.FullRank(8), {"max_steps": 100})


# A fit is measured wrong when some coordinate's mean is off by more than 0.2 true sds or its
# sd by more than a factor 1.25 (20,000 draws of q: Monte-Carlo error < 0.02 sd).
def measured_wrong(res, truth) -> tuple[bool, float, float]:
    z = np.asarray(res.q.sample(jax.random.key(99), 20_000), np.float64)
    mean, sd = (np.asarray(x, np.float64) for x in truth)
    err = np.abs(z.mean(0) - mean) / sd
    ratio = z.std(0) / sd
    worst_ratio = float(ratio[np.argmax(np.abs(np.log(ratio)))])
    return bool(err.max() > 0.2 or np.abs(np.log(ratio)).max() > math.log(1.25)), float(err.max()), worst_ratio


def run_bank(cases, seed_of, bank: str, out):
    rows, walls = [], []
    for i, (name, make) in enumerate(cases):
        target, truth, q, kw = make()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = veil.fit(target, q, key=jax.random.key(seed_of(i)), progress=False, **kw)
            s = res.summary()
        walls.append(time.perf_counter() - t0)
        wrong, err, ratio = measured_wrong(res, truth)
        row = {"bank": bank, "case": name, "flagged": not s.trustworthy, "wrong": wrong,
               "max_mean_err": err, "worst_sd_ratio": ratio, "khat": res.khat,
               "stop": res.stop_reason.split(":")[0], "steps": res.num_steps}
        rows.append(row)
        if out is not None:
            out.write(json.dumps(row) + "\n")
    return rows, walls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    out = open(args.out, "a") if args.out else None
    print(f"jax {jax.__version__}, seeds {seeds}")
    everything = []
    for bank, cases in (("false-alarm", false_alarm_cases(seeds)), ("true-alarm", true_alarm_cases(seeds))):
        rows, walls = run_bank(list(cases), lambda i: 1000 + i, bank, out)
        everything += rows
        want = "OK" if bank == "false-alarm" else "flagged"
        right = sum((not r["flagged"]) if bank == "false-alarm" else r["flagged"] for r in rows)
        print(f"\n### {bank} bank (verdict must be {want}): {right}/{len(rows)} ({100 * right / len(rows):.1f}%), "
              f"median fit {np.median(walls):.2f} s\n")
        print("| case | flagged | measured wrong | flagged among wrong | median k-hat | worst mean error (sd) | worst sd ratio |")
        print("|---|---|---|---|---|---|---|")
        for name in dict.fromkeys(r["case"] for r in rows):
            rs = [r for r in rows if r["case"] == name]
            wrong = [r for r in rs if r["wrong"]]
            print(f"| {name} | {sum(r['flagged'] for r in rs)}/{len(rs)} | {len(wrong)}/{len(rs)} | "
                  f"{sum(r['flagged'] for r in wrong)}/{len(wrong)} | {np.median([r['khat'] for r in rs]):.2f} | "
                  f"{max(r['max_mean_err'] for r in rs):.2f} | "
                  f"{min((r['worst_sd_ratio'] for r in rs), key=lambda x: -abs(math.log(x))):.2f} |")
    wrong = [r for r in everything if r["wrong"]]
    right = [r for r in everything if not r["wrong"]]
    print(f"\nBy measurement (both banks): flagged {sum(r['flagged'] for r in wrong)}/{len(wrong)} of the fits measured "
          f"wrong, {sum(r['flagged'] for r in right)}/{len(right)} of those measured right.")
    for r in everything:
        if r["wrong"] != r["flagged"]:
            print(f"{'missed' if r['wrong'] else 'flagged though right'}: {r['case']}: k-hat {r['khat']:.2f}, "
                  f"mean error {r['max_mean_err']:.2f} sd, sd ratio {r['worst_sd_ratio']:.2f}, stop {r['stop']}")
    if out is not None:
        out.close()


if __name__ == "__main__":
    main()
