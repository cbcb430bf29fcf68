"""Draws per step: what the ELBO's ``num_samples`` buys on each target.

    python -m benchmarks.studies.draws_per_step [--targets A,B] [--seeds 3] [--draws 1,2,4]
                                        [--family fullrank|meanfield] [--rounds 1]

For each Inference Gym target (the unconstrained log density of ``time_to_accuracy.py``), seed
and number of draws ``S``, a default ``veil.fit`` (default optimizer and stopping rule) with
``objective=veil.ELBO(num_samples=S)`` (STL, veil's default estimator). Every variant is
compiled by a first fit that is not timed; then ``--rounds`` rounds of all seeds, variants
interleaved. Prints per variant the steps by seed (deterministic), the median warm wall, the
wall per step, max |mean error| / ground-truth sd and the median ELBO (20,000 draws), and
writes one JSON row per fit to ``--out``.

The trade it measures: the log density at ``S`` points costs about ``S`` times one point on
the CPU (vmapped or not; ``S = 4`` is veil's default), while fewer draws give noisier
gradients, which the stopping rule answers with more steps.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="RadonContextualEffectsIndiana,VectorizedStochasticVolatilityLogSP500Small,"
                    "GermanCreditNumericLogisticRegression,BrownianMotionMissingMiddleObservations,EightSchools")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--draws", default="1,2,4")
    ap.add_argument("--family", default="fullrank", choices=["fullrank", "meanfield"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default="draws_per_step.jsonl")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    import jax
    import numpy as np

    import veil
    from benchmarks.common import NUM_DRAWS, accuracy, elbo, load_target

    draws = [int(s) for s in args.draws.split(",")]
    for name in args.targets.split(","):
        log_p, to_gt, d, gt_mean, gt_sd = load_target(name)
        target = veil.Target.from_logdensity(log_p, dim=d)
        family = veil.FullRank if args.family == "fullrank" else veil.MeanField

        def fit(s, seed):
            t0 = time.perf_counter()
            res = veil.fit(target, family(d), key=jax.random.key(seed), progress=False,
                           objective=veil.ELBO(num_samples=s))
            jax.block_until_ready(res.q)
            return time.perf_counter() - t0, res

        for s in draws:  # compile every variant before anything is timed
            fit(s, 0)
        rows = {s: {} for s in draws}
        for _ in range(args.rounds):
            for seed in range(args.seeds):
                for s in draws:
                    wall, res = fit(s, seed)
                    rows[s].setdefault(seed, {"walls": [], "res": res})["walls"].append(wall)
        print(f"\n{name} (dim {d}, {args.family})")
        print("| draws | steps by seed (total) | median wall (s) | us/step | max err/sd | median ELBO |")
        print("|---|---|---|---|---|---|")
        for s in draws:
            steps, walls, errs, elbos = [], [], [], []
            for seed, r in sorted(rows[s].items()):
                res = r["res"]
                z, log_q = res.q.sample_and_log_prob(jax.random.key(10_000 + seed), NUM_DRAWS)
                acc = accuracy(z, to_gt, gt_mean, gt_sd)
                e = elbo(target.log_density, z, log_q)
                wall = float(np.median(r["walls"]))
                steps.append(res.num_steps)
                walls.append(wall)
                errs.append(acc["max_err"])
                elbos.append(e)
                row = {"target": name, "dim": d, "family": args.family, "draws": s, "seed": seed,
                       "steps": res.num_steps, "stop": res.stop_reason, "wall": wall, "walls": r["walls"],
                       "elbo": e, **acc}
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            per_step = 1e6 * sum(walls) / sum(steps)
            print(f"| {s} | {', '.join(map(str, steps))} ({sum(steps):,}) | {np.median(walls):.3f} | "
                  f"{per_step:.0f} | {min(errs):.3f}-{max(errs):.3f} | {np.median(elbos):.2f} |", flush=True)


if __name__ == "__main__":
    main()
