"""Where a FullRank fit's KL goes along the way: the location's part and the covariance's.

    python -m benchmarks.studies.location_kl [--target RadonContextualEffectsIndiana] [--seed 1]
                                     [--variants clip,white-iso,default] [--steps 400,800,...]

A reference ``q*`` is a long fit (the default optimizer, ``StopRule(max_drift=0.7)``, which
runs to the 20,000-step cap on radon; seed 0). For each optimizer variant of
``benchmarks/studies/outliers.py`` (``clip``: clipped Adam, veil's default of sections 26-28;
``white-iso``: the whitened location step alone; ``default``: ``veil.default_optimizer()``,
the two added), fits of ``--steps`` steps without the stopping rule (the same trajectory cut
at each length) are compared with ``q*`` through

    KL(q || q*) = 1/2 (m - m*)^T S*^-1 (m - m*)                      (the location's part)
                + 1/2 [tr(S*^-1 S) - d + log det S* - log det S]      (the covariance's part)

in float64. It shows which part a variant leaves for later (docs/benchmarks/whitened-location-step.md).
"""

from __future__ import annotations

import argparse



def kl_parts(q, m0, prec0, logdet0):
    import numpy as np

    m = np.asarray(q.loc, np.float64)
    L = np.asarray(q.scale_tril, np.float64)
    S = L @ L.T
    dm = m - m0
    mean_part = 0.5 * dm @ prec0 @ dm
    cov_part = 0.5 * (np.trace(prec0 @ S) - len(m) + logdet0 - np.linalg.slogdet(S)[1])
    return float(mean_part), float(cov_part)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="RadonContextualEffectsIndiana")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--variants", default="clip,white-iso,default")
    ap.add_argument("--steps", default="400,800,1200,1600,2000,2400,2800,3600")
    args = ap.parse_args()

    import jax
    import numpy as np

    import veil
    from benchmarks.studies.outliers import make_optimizer
    from benchmarks.common import load_target

    log_p, _, d, _, _ = load_target(args.target)
    target = veil.Target.from_logdensity(log_p, dim=d)
    ref = veil.fit(target, veil.FullRank(d), key=jax.random.key(0), progress=False,
                   stop=veil.StopRule(max_drift=0.7))
    m0 = np.asarray(ref.q.loc, np.float64)
    L0 = np.asarray(ref.q.scale_tril, np.float64)
    S0 = L0 @ L0.T
    prec0, logdet0 = np.linalg.inv(S0), np.linalg.slogdet(S0)[1]
    print(f"{args.target} (dim {d}); reference: {ref.num_steps} steps ({ref.stop_reason})")
    steps = [int(s) for s in args.steps.split(",")]
    print("| variant | " + " | ".join(f"{s} steps" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for variant in args.variants.split(","):
        opt = make_optimizer(variant)
        cells = []
        for n in steps:
            res = veil.fit(target, veil.FullRank(d), key=jax.random.key(args.seed), optimizer=opt,
                           progress=False, stop=None, max_steps=n)
            a, b = kl_parts(res.q, m0, prec0, logdet0)
            cells.append(f"{a:.3g} / {b:.3g}")
        print(f"| {variant} (location / covariance) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
