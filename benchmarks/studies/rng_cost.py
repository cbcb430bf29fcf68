"""What a step's random draws cost on CPU: JAX's rolled threefry loop against veil.loop.rng.

    python -m benchmarks.studies.rng_cost [--targets IllConditionedGaussian,...] [--rounds 7]

Two tables (medians over interleaved rounds; the machine is noisy, read ratios):

1. **Draws alone.** A compiled loop of 4,000 steps, each drawing one step's (4, 97) normals
   from its own key and summing them: JAX's default keys (the hash lowered as a rolled loop
   on CPU) against the same keys re-wrapped by ``veil.loop.rng.unrolled`` (the rounds written
   out, stored once), and the rounds written out but not stored (``plain``: XLA may then
   fuse them into every consumer).
2. **Whole default fits.** ``veil.fit`` on each Inference Gym target (as
   ``time_to_accuracy.py`` loads them), seed 0, MeanField and FullRank, with the driver's
   conversion on and patched off (``veil.loop.driver.unrolled``; each setting compiles its own
   loop with its own optimizer object). Steps, whether the fitted parameters are equal, and
   wall times.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np



def draws_alone(rounds):
    import jax
    import jax.numpy as jnp
    from jax import lax

    import veil.loop.rng as rng

    d, s, steps = 97, 4, 4000

    def loop(convert):
        @jax.jit
        def run(key):
            keys = convert(jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(steps)))
            return lax.scan(lambda c, k: (c + jax.random.normal(k, (s, d)).sum(), None), 0.0, keys)[0]
        return run

    stored = rng._stored
    variants = {"jax default (rolled)": loop(lambda k: k), "veil.loop.rng.unrolled": loop(rng.unrolled)}
    try:  # the same rounds without the stored copy: an in-process patch, traced here
        rng._stored = lambda bits: bits
        variants["unrolled, not stored"] = loop(rng.unrolled)
        jax.block_until_ready(variants["unrolled, not stored"](jax.random.key(0)))
    finally:
        rng._stored = stored
    times = {k: [] for k in variants}
    for f in variants.values():
        jax.block_until_ready(f(jax.random.key(0)))
    for r in range(rounds):
        for k, f in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(jax.random.key(r)))
            times[k].append(1e6 * (time.perf_counter() - t0) / steps)
    print(f"\n## One step's (4, {d}) normals, {steps}-step loop (us/step)\n| draws | us/step | range |\n|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {np.median(v):.2f} | {min(v):.2f}-{max(v):.2f} |")


def whole_fits(targets, rounds):
    import jax
    import optax

    import veil
    import veil.loop.driver as driver
    import veil.optim as vo
    from benchmarks.common import load_target

    real = driver.unrolled
    on = {"value": True}
    driver.unrolled = lambda keys: real(keys) if on["value"] else keys

    def make_default():  # a fresh object: its own compiled loop
        return vo.whitened_factor(vo.whitened_location(optax.chain(vo.clip_outliers(), optax.adam(0.05)), 0.05), 0.1)

    settings = {"jax default": make_default(), "unrolled": make_default()}
    print(f"\n## Whole default fits, seed 0, {rounds} interleaved rounds (ms)\n"
          "| target | family | steps | equal | jax default keys | unrolled | ratio |\n|---|---|---|---|---|---|---|")
    try:
        for name in targets:
            log_p, _, d, _, _ = load_target(name)
            target = veil.Target.from_logdensity(log_p, dim=d)
            for family in ("MeanField", "FullRank"):
                walls, steps, qs = {k: [] for k in settings}, {k: set() for k in settings}, {}
                for r in range(rounds + 1):
                    for k in (list(settings) if r % 2 else list(settings)[::-1]):
                        on["value"] = k == "unrolled"
                        t0 = time.perf_counter()
                        res = veil.fit(target, getattr(veil, family)(d), key=jax.random.key(0),
                                       optimizer=settings[k], progress=False)
                        jax.block_until_ready(res.q)
                        if r:  # the first round compiles
                            walls[k].append(1e3 * (time.perf_counter() - t0))
                        steps[k].add(res.num_steps)
                        qs[k] = res.q
                equal = all(np.array_equal(a, b) for a, b in
                            zip(jax.tree.leaves(qs["jax default"]), jax.tree.leaves(qs["unrolled"])))
                a, b = np.median(walls["jax default"]), np.median(walls["unrolled"])
                print(f"| {name} | {family} | {'/'.join(str(sorted(s)) for s in steps.values())} | {equal} | "
                      f"{a:.1f} | {b:.1f} | {a / b:.2f} |", flush=True)
    finally:
        driver.unrolled = real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="IllConditionedGaussian,RadonContextualEffectsIndiana,"
                    "VectorizedStochasticVolatilityLogSP500Small,BrownianMotionMissingMiddleObservations,"
                    "GermanCreditNumericLogisticRegression,EightSchools,NealsFunnel,Banana,SyntheticItemResponseTheory")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-fits", action="store_true", help="the draws alone")
    args = ap.parse_args()
    import jax
    print(f"# {jax.devices()[0].device_kind}, {os.cpu_count()} cpus; jax {jax.__version__}")
    draws_alone(args.rounds)
    if not args.no_fits:
        whole_fits(args.targets.split(","), args.rounds)


if __name__ == "__main__":
    main()
