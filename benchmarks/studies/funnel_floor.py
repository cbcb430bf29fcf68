"""How well can a funnel's sd ratios be measured? The exact sampler's spread, and flows judged
with 2,000,000 draws instead of 20,000.

    python -m benchmarks.studies.funnel_floor [--seeds 3] [--out funnel_floor.jsonl]

Inference Gym's NealsFunnel (10-d): x0 ~ N(0, 3), x_i | x0 ~ N(0, exp(x0 / 2)). The marginal
variance of x_i is E exp(x0) = exp(4.5), carried by x0's upper tail (around 3 sd), so the
sample sd of x_i is itself noisy: its relative variance is about (3 exp(9) - 1) / (4 n)
(the kurtosis of x_i is 3 exp(9)). Part one draws exactly from the funnel (20 seeds) and
reports the sd ratios `accuracy()` of time_to_accuracy.py would give the true posterior at
20,000 and 1,000,000 draws. Part two fits the default IAF flow (ELBO) and the IAF fitted to
ChiSquare(k=16) and scores each with 20,000 and 2,000,000 draws.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks.common import accuracy, load_target


def _ratios(a):
    return [round(a[k], 3) for k in ("sd_ratio_min", "sd_ratio_median", "sd_ratio_max")]


def exact_floor(to_gt, m, s):
    for n in (20_000, 1_000_000):
        rows = []
        for seed in range(20):
            r = np.random.default_rng(seed)
            x0 = 3 * r.standard_normal(n)
            z = np.concatenate([x0[:, None], np.exp(x0 / 2)[:, None] * r.standard_normal((n, 9))], 1)
            a = accuracy(z, to_gt, m, s)
            rows.append((a["sd_ratio_min"], a["sd_ratio_median"], a["sd_ratio_max"]))
        rows = np.array(rows)
        yield {"tool": "exact", "draws": n, "seeds": 20,
               "min_q05_q50_q95": np.percentile(rows[:, 0], [5, 50, 95]).round(3).tolist(),
               "median_q05_q50_q95": np.percentile(rows[:, 1], [5, 50, 95]).round(3).tolist(),
               "max_q05_q50_q95": np.percentile(rows[:, 2], [5, 50, 95]).round(3).tolist(),
               "frac_within_10pct": float(np.mean((rows[:, 0] > 0.9) & (rows[:, 2] < 1.1)))}


def flows(log_p, to_gt, m, s, d, seeds):
    import jax

    import veil

    target = veil.Target.from_logdensity(log_p, dim=d)
    for seed in range(seeds):
        for tool, objective in (("veil-iaf-chi2", veil.ChiSquare(k=16)), ("veil-iaf", None)):
            key = jax.random.key(seed)
            q = veil.flows.autoregressive(d, key=jax.random.fold_in(key, 1))
            t0 = time.perf_counter()
            res = veil.fit(target, q, key=key, progress=False, objective=objective)
            wall = time.perf_counter() - t0
            draw = jax.jit(lambda k: res.q.sample(k, 250_000))
            z = np.concatenate([np.asarray(draw(jax.random.key(10_000 + 10 * seed + i))) for i in range(8)])
            sd = np.asarray(to_gt(z)).std(0) / np.asarray(s)
            yield {"tool": tool, "seed": seed, "wall": round(wall, 1), "stop": res.stop_reason.split(":")[0],
                   "ratio_20k": _ratios(accuracy(z[:20_000], to_gt, m, s)),
                   "ratio_2M": _ratios(accuracy(z, to_gt, m, s)), "x0_ratio_2M": round(float(sd[0]), 3)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="funnel_floor.jsonl")
    args = p.parse_args()
    log_p, to_gt, d, m, s = load_target("NealsFunnel")
    for row in (*exact_floor(to_gt, m, s), *flows(log_p, to_gt, m, s, d, args.seeds)):
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
