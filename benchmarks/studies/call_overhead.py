"""What one ``veil.fit`` call costs beyond its steps, and a fresh process's first fit.

    python -m benchmarks.studies.call_overhead             # whole call against a fused scan
    python -m benchmarks.studies.call_overhead --first-fit # import veil and the first fit

Whole call (issue 30's figure): Bayesian logistic regression, n = 1,000, d = 25 (the data of
``benchmarks.peers.engine_overhead``), MeanField, the ELBO with one reparameterised draw, Adam
1e-2, 5,000 steps, ``stop=None``; both warmed (compilation excluded). Prints the medians of 9
interleaved calls of ``veil.fit`` (1 step and 5,000) and of the hand-written ``jax.jit(lax.scan)``
of the same 5,000 steps, and the median of the paired ratios. ``--first-fit``: in this process,
the wall of ``import veil`` and of the first default FullRank fit of eight schools (compilation
included; run with ``VEIL_COMPILATION_CACHE=0`` to leave the persistent cache out). Run two
checkouts side by side (``PYTHONPATH=other/src``) for a before/after on one machine.
"""

from __future__ import annotations

import argparse
import json
import time


def first_fit() -> dict:
    t0 = time.perf_counter()
    import veil

    t_import = time.perf_counter() - t0
    import jax

    from veil.demo import eight_schools, eight_schools_data

    t1 = time.perf_counter()
    target = veil.Target.from_numpyro(eight_schools, *eight_schools_data())
    res = veil.fit(target, veil.FullRank(target.dim), key=jax.random.key(0), progress=False)
    jax.block_until_ready(res.q)
    return {"import_s": t_import, "first_fit_s": time.perf_counter() - t1, "steps": int(res.num_steps)}


def whole_call(calls: int = 9) -> dict:
    import jax
    import numpy as np
    import optax

    import veil
    from benchmarks.peers import engine_overhead as eo

    _, _, _, _, log_p = eo.jax_setup("meanfield", 25)
    target = veil.Target.from_logdensity(log_p, dim=25)
    q, opt = veil.MeanField(25), optax.adam(eo.LR)
    obj = veil.ELBO(num_samples=1, estimator=veil.Reparam())

    def fit(seed, steps):
        res = veil.fit(target, q, key=jax.random.key(seed), objective=obj, optimizer=opt, max_steps=steps,
                       stop=None, progress=False)
        return jax.block_until_ready(res.q)

    hand = eo.make_hand("meanfield", 25, 5000)
    fit(0, 1), fit(0, 5000), hand(0)
    t1, t5, th = [], [], []
    for i in range(calls):
        for out, f in ((t1, lambda: fit(i + 1, 1)), (t5, lambda: fit(i + 1, 5000)), (th, lambda: hand(i + 1))):
            a = time.perf_counter()
            f()
            out.append(time.perf_counter() - a)
    return {"fit_1step_ms": 1e3 * float(np.median(t1)), "fit_5000_ms": 1e3 * float(np.median(t5)),
            "hand_5000_ms": 1e3 * float(np.median(th)), "whole_call_ratio": float(np.median(np.array(t5) / np.array(th)))}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--first-fit", action="store_true")
    args = ap.parse_args(argv)
    print(json.dumps(first_fit() if args.first_fit else whole_call()))


if __name__ == "__main__":
    main()
