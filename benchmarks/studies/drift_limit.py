"""The stopping rule's drift limit (``StopRule(max_drift=...)``): steps and accuracy by target.

    python -m benchmarks.studies.drift_limit [--limits 2,3,4] [--seeds 3] [--family fullrank]
        [--targets A,B] [--first-seed 0] [--out drift_limit.jsonl]

For each Inference Gym target (the unconstrained log density of ``time_to_accuracy.py``),
limit and seed: a default ``veil.fit`` (ELBO with 4 STL draws, the default optimizer) with
``stop=veil.StopRule(max_drift=limit)``. Steps are deterministic for a seed, so this script
may run beside other work; it times nothing. Prints per limit the steps by seed and their
total, the largest max |mean error| / ground-truth sd over seeds, the median ELBO (20,000
draws) and the largest k-hat; one JSON row per fit goes to ``--out`` (with the median error
and sd ratios as well).
"""

from __future__ import annotations

import argparse
import json
import warnings



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limits", default="2,3,4")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--family", default="fullrank", choices=["fullrank", "meanfield"])
    ap.add_argument("--targets", default=None, help="comma-separated; default: time_to_accuracy.py's list")
    ap.add_argument("--out", default="drift_limit.jsonl")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import jax
    import numpy as np

    import veil
    from benchmarks.common import TARGETS, accuracy, elbo, load_target

    limits = [float(x) for x in args.limits.split(",")]
    targets = args.targets.split(",") if args.targets else TARGETS
    with open(args.out, "a") as out:
        for name in targets:
            log_p, to_gt, d, gt_mean, gt_sd = load_target(name)
            for limit in limits:
                rows = []
                for seed in range(args.first_seed, args.seeds):
                    t = veil.Target.from_logdensity(log_p, dim=d)
                    q = veil.FullRank(d) if args.family == "fullrank" else veil.MeanField(d)
                    res = veil.fit(t, q, key=jax.random.key(seed), progress=False,
                                   stop=veil.StopRule(max_drift=limit))
                    z, log_q = res.q.sample_and_log_prob(jax.random.key(10_000 + seed), 20_000)
                    row = dict(target=name, thr=limit, seed=seed, steps=res.num_steps,
                               stop=res.stop_reason[:9], elbo=elbo(t.log_density, z, log_q),
                               khat=res.khat, **accuracy(z, to_gt, gt_mean, gt_sd))
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    rows.append(row)
                print(f"{name[:22]:22s} limit={limit:4.1f} steps={[r['steps'] for r in rows]} "
                      f"total={sum(r['steps'] for r in rows)} max_err={max(r['max_err'] for r in rows):.3f} "
                      f"elbo_median={np.median([r['elbo'] for r in rows]):.3f} "
                      f"khat_max={max(r['khat'] for r in rows):.2f}", flush=True)


if __name__ == "__main__":
    main()
