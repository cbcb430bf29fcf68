"""The fixed cost of one ``veil.particles.run`` call: everything but the steps (argument and
start checks, the driver's set-up, the result), which decides short runs.

    python -m benchmarks.studies.run_overhead [--particles 50,1000] [--repeats 30]
    python -m benchmarks.studies.run_overhead --fit [--dims 25,100]

``--fit``: the same for ``veil.fit`` with the default optimizer and ``stop=None`` on a
``dims``-dimensional standard normal target, mean-field and full-rank.

A 2-d Gaussian mixture, SVGD with a fixed step, ``stop=None``: the median wall time of
``run(..., max_steps=S)`` for S = 1 and 101 after a compiling call; the fixed cost is
``wall(1) - (wall(101) - wall(1)) / 100``, the one-step wall less the cost of a step. Run two
checkouts side by side (``PYTHONPATH=other/src python -m benchmarks.studies.run_overhead``) for a
before/after ratio on the same machine.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--particles", default="50,1000")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--label", default="")
    ap.add_argument("--fit", action="store_true", help="time veil.fit instead of particles.run")
    ap.add_argument("--dims", default="25,100")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    import veil

    if args.fit:
        for d in (int(c) for c in args.dims.split(",")):
            t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=d)
            for family in (veil.MeanField(d), veil.FullRank(d)):
                def call(steps):
                    t0 = time.perf_counter()
                    res = veil.fit(t, family, key=jax.random.key(0), max_steps=steps, stop=None, progress=False)
                    jax.block_until_ready(res.q)
                    return time.perf_counter() - t0

                report(args, call, {"family": type(family).__name__, "dim": d})
        return

    locs = jnp.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
    t = veil.Target.from_logdensity(
        lambda z: jax.nn.logsumexp(-0.5 * jnp.sum((z - locs) ** 2, axis=1) / 0.36), dim=2)
    method = veil.particles.SVGD(step_size=1.0)
    for n in (int(c) for c in args.particles.split(",")):
        x0 = np.asarray(jax.random.normal(jax.random.key(42), (n, 2)), np.float32)

        def call(steps):
            t0 = time.perf_counter()
            res = veil.particles.run(t, method, key=jax.random.key(0), n_particles=n, init=x0,
                                     max_steps=steps, stop=None, progress=False)
            jax.block_until_ready(res.particles)
            return time.perf_counter() - t0

        report(args, call, {"n": n})


def report(args, call, what):
    """Print one row: the median walls of ``call(1)`` and ``call(101)`` after a compiling call."""
    import jax

    walls = {}
    for steps in (1, 101):
        call(steps)
        walls[steps] = float(np.median([call(steps) for _ in range(args.repeats)]))
    step = (walls[101] - walls[1]) / 100
    row = {"label": args.label, **what, "device": jax.devices()[0].device_kind,
           "one_step_ms": 1e3 * walls[1], "per_step_ms": 1e3 * step, "fixed_ms": 1e3 * (walls[1] - step)}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
