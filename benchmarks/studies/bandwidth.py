"""The median heuristic's cost per SVGD step: bisection in a ``fori_loop`` (rolled), the same
unrolled, and a sort (as BlackJAX does), inside veil's whole SVGD run.

    python -m benchmarks.studies.bandwidth [--particles 200,1000,4000] [--dims 4,50] [--steps 1000]

Each variant replaces ``veil.particles.base._pair_median`` for one run of ``SVGD`` (``stop=None``,
fixed steps, the same start); each run is called twice and the second timed; medians of
``--repeats``. Prints ms per step and the ratio to the rolled bisection. Why it matters:
XLA's CPU sort is slow (4.5 ms for 20,000 numbers), but a rolled loop is one kernel launch
per iteration on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def variants():
    import functools

    import veil.particles.base as vp

    return {"bisection (rolled)": vp._pair_median_bisection,
            "bisection (unrolled)": functools.partial(vp._pair_median_bisection, unroll=True),
            "sort": vp._pair_median_sorted}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--particles", default="200,1000,4000")
    ap.add_argument("--dims", default="4,50")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import optax

    import veil
    import veil.particles.base as vp

    print(f"# {platform.machine()}, {os.cpu_count()} cpus, {jax.devices()[0].device_kind}; jax {jax.__version__}")
    print("| n | d | variant | ms per step | vs rolled |")
    print("|---|---|---|---|---|")
    rows = []
    original = vp._pair_median
    for d in (int(v) for v in args.dims.split(",")):
        target = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=d)
        for n in (int(v) for v in args.particles.split(",")):
            x0 = np.asarray(jax.random.normal(jax.random.key(1), (n, d)), np.float32)
            base = None
            for name, fn in variants().items():
                vp._pair_median = fn
                # A new optimizer object is a new compiled loop (the driver keys its cache on
                # it), so each variant is traced with its own median.
                method = vp.SVGD(optimizer=optax.adagrad(0.5))
                times = []
                for _ in range(args.repeats + 1):
                    t0 = time.perf_counter()
                    res = vp.run(target, method, key=jax.random.key(0), n_particles=n, init=x0,
                                 max_steps=args.steps, stop=None, progress=False)
                    jax.block_until_ready(res.particles)
                    times.append(time.perf_counter() - t0)
                ms = 1000 * float(np.median(times[1:])) / args.steps
                base = ms if base is None else base
                print(f"| {n} | {d} | {name} | {ms:.3f} | {ms / base:.2f} |", flush=True)
                rows.append({"n": n, "d": d, "variant": name, "ms_per_step": ms})
            vp._pair_median = original
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
