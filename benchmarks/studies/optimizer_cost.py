"""What the default optimizer's whitened steps cost per step of a whole fit.

    python -m benchmarks.studies.optimizer_cost [--targets A,B] [--steps 2000] [--rounds 8]

For each Inference Gym target (``time_to_accuracy.load_target``), a default ``veil.fit`` with
``FullRank`` and ``stop=None`` for ``--steps`` steps under ``veil.default_optimizer()`` and
under the clipped Adam alone (``optax.chain(clip_outliers(), optax.adam(0.05))``, the default
before section 29) and with the whitened location step alone (``whitened_location`` around it,
the default of section 29), interleaved, the first round (compilation) dropped; prints the
median and smallest microseconds per step and their ratio to the clipped Adam's (docs/benchmarks/whitened-location-step.md
and docs/benchmarks/whitened-factor-step.md).
"""

from __future__ import annotations

import argparse
import time



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="RadonContextualEffectsIndiana,SyntheticItemResponseTheory")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()

    import jax
    import numpy as np
    import optax

    import veil
    from benchmarks.common import load_target
    from veil.optim import clip_outliers, whitened_location

    clipped = optax.chain(clip_outliers(), optax.adam(0.05))
    optimizers = {"default": veil.default_optimizer(), "location step only": whitened_location(clipped, 0.05),
                  "clipped Adam": clipped}
    print("| target (dim) | optimizer | us/step, median | smallest | / clipped Adam (medians) |")
    print("|---|---|---|---|---|")
    for name in args.targets.split(","):
        log_p, _, d, _, _ = load_target(name)
        target = veil.Target.from_logdensity(log_p, dim=d)
        times = {k: [] for k in optimizers}
        for r in range(args.rounds):
            for k, opt in optimizers.items():
                t0 = time.perf_counter()
                res = veil.fit(target, veil.FullRank(d), key=jax.random.key(0), optimizer=opt, progress=False,
                               stop=None, max_steps=args.steps)
                jax.block_until_ready(res.q.loc)
                if r:
                    times[k].append((time.perf_counter() - t0) / args.steps * 1e6)
        med = {k: float(np.median(v)) for k, v in times.items()}
        for k, v in times.items():
            ratio = f"{med[k] / med['clipped Adam']:.2f}" if k != "clipped Adam" else ""
            print(f"| {name} ({d}) | {k} | {med[k]:.1f} | {min(v):.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
