"""Step-size decays gated on settled iterates: ``StopRule(decay_max_drift=...)`` target by target.

    python -m benchmarks.studies.decay_gate [--targets A,B] [--seeds 3] [--gates none,4]

For each Inference Gym target (same unconstrained log density as ``time_to_accuracy.py``) and
seed, a default ``veil.fit`` with ``FullRank`` (ELBO, 4 STL draws, the default optimizer)
under the default ``StopRule()`` (``none``) and with ``StopRule(decay_max_drift=g)`` for each
gate ``g``: a halving of the step waits until the iterates' drift statistic is at most ``g``.
Prints the steps by seed, their median and total, and max |mean error| / ground-truth sd by
seed (20,000 draws). Step counts are deterministic: rows may be made in parallel processes.
"""

from __future__ import annotations

import argparse
import json



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="RadonContextualEffectsIndiana")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--gates", default="none,4")
    ap.add_argument("--out", default=None, help="append JSON rows here")
    args = ap.parse_args()

    import jax
    import numpy as np

    import veil
    from benchmarks.common import load_target

    print("| target | gate | steps by seed | median | total | max err/sd by seed |\n|---|---|---|---|---|---|")
    for name in args.targets.split(","):
        log_p, to_gt, d, gt_mean, gt_sd = load_target(name)
        target = veil.Target.from_logdensity(log_p, dim=d)
        for gate in args.gates.split(","):
            rule = veil.StopRule() if gate == "none" else veil.StopRule(decay_max_drift=float(gate))
            steps, errs = [], []
            for seed in range(args.seeds):
                res = veil.fit(target, veil.FullRank(d), key=jax.random.key(seed), stop=rule, progress=False)
                y = np.asarray(to_gt(res.q.sample(jax.random.key(10_000 + seed), 20_000)), np.float64)
                errs.append(float(np.max(np.abs(y.mean(0) - np.asarray(gt_mean)) / np.asarray(gt_sd))))
                steps.append(int(res.num_steps))
            print(f"| {name} | {gate} | {', '.join(map(str, steps))} | {int(np.median(steps))} | {sum(steps)} | "
                  f"{', '.join(f'{e:.3f}' for e in errs)} |", flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps({"target": name, "gate": gate, "steps": steps, "max_err": errs}) + "\n")


if __name__ == "__main__":
    main()
