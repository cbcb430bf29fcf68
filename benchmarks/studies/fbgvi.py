"""FB-GVI against Adam on the ELBO, full-rank Gaussian, on log-concave targets.

    python -m benchmarks.studies.fbgvi [--seeds 3] [--out results.jsonl]

German credit needs ``inference-gym`` and the offline data shim (see time_to_accuracy.py).

Targets (both strongly log-concave, where the FB-GVI paper proves its rates):

* ``gauss50``: a 50-d Gaussian with sds from 0.3 to 3 along random axes (condition number
  100): the exact answer is the target itself;
* ``german``: Inference Gym's German credit logistic regression (25-d), ground truth from its
  reference draws (the best Gaussian differs from the posterior by a little; both methods
  aim at the same best Gaussian).

Tools, every default: ``veil.fit(target, FullRank(d), key=...)`` (ELBO, 4 STL draws, Adam 0.05,
stopping rule) and ``veil.fbgvi(target, key=...)`` (2 antithetic draws, step 0.5 / L
with L the curvature at the start, the same stopping rule). Wall time of a fresh call after
one warm-up call of each (compilation excluded), gradient evaluations (FB-GVI's Hessian costs
``d`` more per draw, counted), and accuracy: max over coordinates of
``|mean error| / sd`` and of ``|sd ratio - 1|`` against the truth.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np



def targets():
    from benchmarks.peers.particles import gauss50, german

    return {"gauss50": gauss50(), "german": german()}


def accuracy(spec, q):
    import jax

    x = np.asarray(q.sample(jax.random.key(123), 20_000), np.float64)
    if spec["transform"] is not None:
        x = np.asarray(spec["transform"](x), np.float64)
    mean_err = np.abs(x.mean(0) - spec["mean"]) / spec["sd"]
    sd_err = np.abs(x.std(0) / spec["sd"] - 1)
    return float(mean_err.max()), float(sd_err.max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="fbgvi.jsonl")
    args = ap.parse_args()
    import jax

    import veil

    print(f"# jax {jax.__version__}, veil {veil.__version__}, {os.cpu_count()} cpus")
    rows = []
    with open(args.out, "a") as out:
        for name, spec in targets().items():
            t = veil.Target.from_logdensity(spec["log_p"], dim=spec["dim"])
            d = spec["dim"]
            tools = {
                "adam-elbo": (lambda k: veil.fit(t, veil.FullRank(d), key=k, progress=False), 4),
                "fbgvi": (lambda k: veil.fbgvi(t, key=k, progress=False), 2 * (1 + d)),
            }
            for tool, (fn, grads_per_step) in tools.items():
                jax.block_until_ready(fn(jax.random.key(999)).q)  # compile
            for seed in range(args.seeds):
                for tool, (fn, grads_per_step) in tools.items():
                    t0 = time.perf_counter()
                    res = fn(jax.random.key(seed))
                    jax.block_until_ready(res.q)
                    wall = time.perf_counter() - t0
                    mean_err, sd_err = accuracy(spec, res.q)
                    row = {"target": name, "tool": tool, "seed": seed, "wall": wall, "steps": res.num_steps,
                           "grad_evals": res.num_steps * grads_per_step, "mean_err": mean_err, "sd_err": sd_err,
                           "stop": res.stop_reason[:40], "elbo": res.elbo}
                    print(json.dumps(row), flush=True)
                    out.write(json.dumps(row) + "\n")
                    rows.append(row)
    print("\n| target | tool | wall (s), median | steps | gradient evals | max mean error (sd) | max sd error | ELBO |")
    print("|---|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["target"] for r in rows):
        for tool in ("adam-elbo", "fbgvi"):
            rs = [r for r in rows if r["target"] == name and r["tool"] == tool]
            med = lambda k: float(np.median([r[k] for r in rs]))  # noqa: E731
            print(f"| {name} | {tool} | {med('wall'):.2f} | {med('steps'):.0f} | {med('grad_evals'):.0f} | "
                  f"{med('mean_err'):.3f} | {med('sd_err'):.3f} | {med('elbo'):.2f} |")


if __name__ == "__main__":
    main()
