"""What the stopping rule costs a fit, and what one lone element-wise operation costs XLA's CPU loop.

    python -m benchmarks.studies.loop_overhead [--targets RadonContextualEffectsIndiana,IllConditionedGaussian]
                                       [--rounds 9] [--skip-fits] [--skip-single-op]

Two tables (medians over interleaved rounds, in one process; the machine is noisy, read the
paired ratios):

1. **The stopping rule's share of a fit.** For each Inference Gym target (as
   ``time_to_accuracy.py`` loads them), a default ``FullRank`` fit (seed 1) gives its step
   count ``n``; then, for those same ``n`` steps:

   * ``default``: the default fit itself (the rule's chunks of 100, 300, then 400 steps;
     every step adds the iterate to the chunk's running sum and the probe coordinates to
     their batch sums; the host judges each chunk; the final window's average at the end);
   * ``tracked``: ``stop=StopRule(min_window=10**6)``, a rule that never decides: the same
     per-step tracking in chunks of 100 then 500 steps, and no stop;
   * ``plain``: ``stop=None`` and ``max_steps=n``: no tracking, chunks sized on the host
     (about 0.25 s each).

   Each variant compiles its own loop (a fresh ``Target`` each) before the timed rounds.
2. **One lone element-wise operation in a compiled loop** (``--skip-fits`` to run only this):
   a ``lax.scan`` of 4,000 steps carrying three 100 x 100 arrays ``a, b, c``, where each step
   sets ``c`` to an element-wise function of ``c`` and ``b`` and then ``a <- a + c x``. XLA
   makes ``c``'s update a fusion of its own; when that fusion holds a single operation
   (``c + b``, ``c * b``) the CPU backend emits it as a "wrapped" operation, and when it
   holds two (``c * 1.0001 + b``) as an ordinary loop fusion. The table gives us per step.
3. **What one more operation costs a step** (with the second table): a ``lax.scan`` of
   20,000 steps carrying ``K`` independent scalars, each updated by its own ``c * 1.0001 +
   x (i + 1)``, so the compiled step holds ``K`` fusions that XLA's CPU runtime dispatches
   one by one. Small loops (a few fusions) are compiled whole and cost almost nothing a step;
   past that, each fusion costs a fixed dispatch time whatever its size.
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np



def stopping_share(names, rounds):
    import jax

    import veil
    from benchmarks.common import load_target

    never = veil.StopRule(min_window=10**6)
    print("| target (dim) | steps | default (ms) | tracked (ms) | plain (ms) | default / plain | tracked / plain |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        log_p, _, d, _, _ = load_target(name)
        targets = {k: veil.Target.from_logdensity(lambda z: log_p(z), dim=d) for k in ("default", "tracked", "plain")}

        def fit(kind, n=None):
            kw = {} if kind == "default" else {"max_steps": n, "stop": never if kind == "tracked" else None}
            t0 = time.perf_counter()
            res = veil.fit(targets[kind], veil.FullRank(d), key=jax.random.key(1), progress=False, **kw)
            jax.block_until_ready(res.q)
            return time.perf_counter() - t0, res.num_steps

        _, n = fit("default")
        for kind in ("tracked", "plain"):
            assert fit(kind, n)[1] == n
        walls = {k: [] for k in targets}
        for _ in range(rounds):
            for kind in targets:
                walls[kind].append(fit(kind, n)[0])
        w = {k: np.asarray(v) for k, v in walls.items()}
        med = {k: np.median(v) * 1e3 for k, v in w.items()}
        print(f"| {name} ({d}) | {n} | {med['default']:.1f} | {med['tracked']:.1f} | {med['plain']:.1f} | "
              f"{np.median(w['default'] / w['plain']):.3f} | {np.median(w['tracked'] / w['plain']):.3f} |", flush=True)


def single_op(rounds):
    import jax
    import jax.numpy as jnp

    steps = 4000

    def loop(update):
        @jax.jit
        def run(a, b, c):
            def body(carry, x):
                a, b, c = carry
                c = update(c, b)
                return (a + c * x, b, c), None

            return jax.lax.scan(body, (a, b, c), jnp.linspace(0.0, 1.0, steps))[0][0]

        return run

    variants = {
        "c + b (one operation)": loop(lambda c, b: c + b),
        "c * b (one operation)": loop(lambda c, b: c * b),
        "c * 1.0001 + b (two operations)": loop(lambda c, b: c * 1.0001 + b),
    }
    a, b = jnp.zeros((100, 100)), jnp.ones((100, 100))
    kinds = {}
    for k, f in variants.items():
        jax.block_until_ready(f(a, b, a))
        hlo = f.lower(a, b, a).compile().as_text()
        kinds[k] = "wrapped" if re.search(r"%wrapped_\w+(\.\d+)? = f32\[100,100\]", hlo) else "loop fusion"
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, f in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(a, b, a))
            times[k].append((time.perf_counter() - t0) / steps * 1e6)
    print("| c's update | its fusion | us per step |")
    print("|---|---|---|")
    for k, v in times.items():
        print(f"| `{k}` | {kinds[k]} | {np.median(v):.2f} |")


def dispatch_cost(rounds):
    import jax
    import jax.numpy as jnp

    steps = 20_000

    def loop(k):
        @jax.jit
        def run(c0):
            def body(c, x):
                return tuple(ci * 1.0001 + x * (i + 1) for i, ci in enumerate(c)), None

            return jax.lax.scan(body, c0, jnp.linspace(0.0, 1.0, steps))[0]

        return run

    print("| scalars K | fusions in the program | us per step | us per fusion |")
    print("|---|---|---|---|")
    for k in (10, 50, 100, 200):
        f, c0 = loop(k), tuple(jnp.float32(i) for i in range(k))
        jax.block_until_ready(f(c0))
        fusions = sum(1 for line in f.lower(c0).compile().as_text().splitlines() if " fusion(" in line)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            jax.block_until_ready(f(c0))
            times.append((time.perf_counter() - t0) / steps * 1e6)
        t = float(np.median(times))
        print(f"| {k} | {fusions} | {t:.2f} | {t / k:.3f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--targets", default="RadonContextualEffectsIndiana,IllConditionedGaussian")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--skip-fits", action="store_true")
    p.add_argument("--skip-single-op", action="store_true")
    args = p.parse_args()
    import warnings

    warnings.simplefilter("ignore")
    if not args.skip_fits:
        stopping_share(args.targets.split(","), args.rounds)
        print()
    if not args.skip_single_op:
        single_op(args.rounds)
        print()
        dispatch_cost(args.rounds)


if __name__ == "__main__":
    main()
