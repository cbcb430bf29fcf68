"""The whitened factor step (``veil.optim.whitened_factor``): steps and accuracy, target by target.

    python -m benchmarks.studies.factor_step [--targets A,B] [--seeds 3] [--variants before,default]

For each Inference Gym target (the unconstrained log density of ``time_to_accuracy.py``) and
seed, a default ``veil.fit`` with ``FullRank`` (ELBO, 4 STL draws, the stopping rule) under
each optimizer variant:

* ``before``: ``whitened_location(clip + Adam 0.05, 0.05)``, veil's default of section 29;
* ``default``: ``veil.default_optimizer()`` (since section 30: ``before`` wrapped in
  ``whitened_factor(..., 0.1)``: a factor step every ``1 + dim // 16`` steps, dims <= 128);
* ``nolimit``: the default's factor step without its 128-dimension limit;
* ``every1``: the factor step at every step;
* ``every8``: every 8 steps, no dimension limit;
* ``small``: every ``1 + dim // 16`` steps, 4x smaller (0.025), no dimension limit;
* ``large``: 1 / sqrt(dim) instead of 0.1 (the step in ``M`` scaled by ``1 / dim``);
* ``lr02``: the default's factor step at 0.2 instead of 0.1 (dims <= 128).

Each variant is compiled by a fit that is not counted. Prints per variant the steps by seed,
their total, max |mean error| / ground-truth sd (range over seeds) and the median ELBO
(20,000 draws); one JSON row per fit goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings



def make_optimizer(variant: str, dim: int):
    import veil
    from veil.fit import _ADAM_OPTIMIZER
    from veil.optim import whitened_factor, whitened_location

    before = whitened_location(_ADAM_OPTIMIZER, 0.05)
    return {
        "before": lambda: before,
        "default": veil.default_optimizer,
        "nolimit": lambda: whitened_factor(before, 0.1, max_dim=None),
        "every1": lambda: whitened_factor(before, 0.1, every=1, max_dim=None),
        "every8": lambda: whitened_factor(before, 0.1, every=8, max_dim=None),
        "small": lambda: whitened_factor(before, 0.025, max_dim=None),
        "large": lambda: whitened_factor(before, 1.0 / math.sqrt(dim), max_dim=None),
        "lr02": lambda: whitened_factor(before, 0.2),
    }[variant]()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="RadonContextualEffectsIndiana,GermanCreditNumericLogisticRegression,"
                    "BrownianMotionMissingMiddleObservations,EightSchools,NealsFunnel,Banana,"
                    "VectorizedStochasticVolatilityLogSP500Small,IllConditionedGaussian")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--variants", default="before,default")
    ap.add_argument("--out", default="factor_step.jsonl")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    import jax
    import numpy as np

    import veil
    from benchmarks.common import NUM_DRAWS, accuracy, elbo, load_target

    for name in args.targets.split(","):
        log_p, to_gt, d, gt_mean, gt_sd = load_target(name)
        target = veil.Target.from_logdensity(log_p, dim=d)
        print(f"\n{name} (dim {d}, FullRank)")
        print("| variant | steps by seed (total) | max err/sd | median ELBO |")
        print("|---|---|---|---|")
        for variant in args.variants.split(","):
            opt = make_optimizer(variant, d)  # one object per variant: one compilation
            veil.fit(target, veil.FullRank(d), key=jax.random.key(0), progress=False, optimizer=opt, max_steps=400)
            steps, errs, elbos = [], [], []
            for seed in range(args.seeds):
                res = veil.fit(target, veil.FullRank(d), key=jax.random.key(seed), progress=False, optimizer=opt)
                z, log_q = res.q.sample_and_log_prob(jax.random.key(10_000 + seed), NUM_DRAWS)
                acc = accuracy(z, to_gt, gt_mean, gt_sd)
                e = elbo(target.log_density, z, log_q)
                steps.append(res.num_steps)
                errs.append(acc["max_err"])
                elbos.append(e)
                row = {"target": name, "dim": d, "variant": variant, "seed": seed, "steps": res.num_steps,
                       "stop": res.stop_reason, "elbo": e, **acc}
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            print(f"| {variant} | {', '.join(map(str, steps))} ({sum(steps):,}) | {min(errs):.3f}-{max(errs):.3f} | "
                  f"{np.median(elbos):.2f} |", flush=True)


if __name__ == "__main__":
    main()
