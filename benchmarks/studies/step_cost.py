"""Where a step of ``veil.fit`` goes: the target, the family's draws and ``log q``, the optimizer.

    python -m benchmarks.studies.step_cost [--targets RadonContextualEffectsIndiana,...] [--rounds 7]

For each Inference Gym target (as ``time_to_accuracy.py`` loads them), one process compiles
``lax.scan`` loops of ``--steps`` steps of growing pieces of a fit and times them in
interleaved rounds (medians, microseconds per step):

* ``log p``: value and gradient of the log density at 4 points (the default ELBO's draws);
* ``loss MF (generic STL)``: the default ELBO's gradient for ``MeanField`` through the
  generic "draw, then ``log_prob`` at stopped parameters" (``Family``'s own method), with a
  plain SGD update; ``loss MF`` / ``loss FR``: the same with the families' own noise-based
  forms (what ``veil.fit`` uses);
* ``MF + default`` / ``FR + default``: with :func:`veil.default_optimizer` instead of SGD;
  ``+ flat``: the same optimizer under ``optax.flatten`` (one vector for all parameters);
* ``veil.fit``: the whole fit with ``stop=None`` (the driver around the same step).

``--fits``: instead, whole default fits (the stopping rule on, seed 0) with
``veil.default_optimizer()`` and with it under ``optax.flatten``, interleaved: wall (ms) and
steps, which are the same for both (the flattened optimizer does the same arithmetic).
``--fits --mf-stl``: whole default ``MeanField`` fits with the family's noise-based stopped
``log q`` against the generic form (``Family``'s), interleaved.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import numpy as np



@functools.lru_cache(maxsize=None)
def _generic_mean_field_class():
    """``MeanField`` with ``Family``'s generic stopped ``log q`` (draw, then ``log_prob`` at
    stopped parameters) instead of its own noise-based form. One class: a fit's compiled loop
    is keyed by it, so a class made per call would recompile every call."""
    import veil
    from veil.family import Family

    class GenericMeanField(veil.MeanField):
        transform_with_stopped_log_prob = Family.transform_with_stopped_log_prob
        sample_with_stopped_log_prob = Family.sample_with_stopped_log_prob

    return GenericMeanField


def _generic_mean_field(dim):
    return _generic_mean_field_class()(dim)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="RadonContextualEffectsIndiana,GermanCreditNumericLogisticRegression,"
                    "VectorizedStochasticVolatilityLogSP500Small,EightSchools")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None, help="append JSON rows here")
    ap.add_argument("--fits", action="store_true", help="time whole default fits, default vs flattened optimizer")
    ap.add_argument("--mf-stl", action="store_true", help="with --fits: MeanField's stopped log q, generic vs its own")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import optax

    import veil
    from benchmarks.common import load_target
    S = args.steps
    objective = veil.ELBO()

    def scan_fit(target, q, opt):
        @jax.jit
        def run(q, key):
            state = opt.init(q)

            def body(carry, i):
                q, state = carry
                (loss, _), g = jax.value_and_grad(
                    lambda p: objective(p, target, jax.random.fold_in(key, i)), has_aux=True)(q)
                u, state = opt.update(g, state, q)
                return (optax.apply_updates(q, u), state), loss

            return jax.lax.scan(body, (q, state), jnp.arange(S))[1]

        return lambda key: run(q, key)

    print(f"# {jax.devices()[0].device_kind}, {os.cpu_count()} cpus; jax {jax.__version__}; {S} steps, "
          f"{args.rounds} interleaved rounds, medians (us/step)")
    if args.fits:
        return whole_fits(args)
    for name in args.targets.split(","):
        log_p, _, d, _, _ = load_target(name)
        target = veil.Target.from_logdensity(log_p, dim=d)

        @jax.jit
        def log_p_only(key):
            def body(z, i):
                eps = jax.random.normal(jax.random.fold_in(key, i), z.shape)
                v, g = jax.vmap(jax.value_and_grad(log_p))(z + 0.1 * eps)
                return z + 1e-6 * g, jnp.sum(v)

            return jax.lax.scan(body, jnp.zeros((4, d)), jnp.arange(S))[1]

        sgd, default = optax.sgd(1e-6), veil.default_optimizer()
        flat = optax.flatten(default)
        pieces = {
            "log p": log_p_only,
            "loss MF (generic STL)": scan_fit(target, _generic_mean_field(d), sgd),
            "loss MF": scan_fit(target, veil.MeanField(d), sgd),
            "loss FR": scan_fit(target, veil.FullRank(d), sgd),
            "MF + default": scan_fit(target, veil.MeanField(d), default),
            "MF + flat": scan_fit(target, veil.MeanField(d), flat),
            "FR + default": scan_fit(target, veil.FullRank(d), default),
            "FR + flat": scan_fit(target, veil.FullRank(d), flat),
            "veil.fit MF": lambda key: veil.fit(target, veil.MeanField(d), key=key, max_steps=S, stop=None,
                                                progress=False).q,
            "veil.fit FR": lambda key: veil.fit(target, veil.FullRank(d), key=key, max_steps=S, stop=None,
                                                progress=False).q,
        }
        times = {k: [] for k in pieces}
        for f in pieces.values():
            jax.block_until_ready(f(jax.random.key(0)))
        for r in range(args.rounds):
            for k, f in pieces.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(jax.random.key(r + 1)))
                times[k].append(1e6 * (time.perf_counter() - t0) / S)
        row = {"target": name, "dim": d, **{k: float(np.median(v)) for k, v in times.items()}}
        print(f"\n## {name} (dim {d})\n| piece | us/step | range |\n|---|---|---|")
        for k, v in times.items():
            print(f"| {k} | {np.median(v):.1f} | {min(v):.1f}-{max(v):.1f} |")
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def whole_fits(args):
    import jax
    import optax

    import veil
    from benchmarks.common import load_target

    default = veil.default_optimizer()
    if args.mf_stl:
        variants = {"default": lambda d: (_generic_mean_field(d), default), "flat": lambda d: (veil.MeanField(d), default)}
        print("(columns: 'default' = MeanField with the generic stopped log q, 'flat' = its own form)")
    else:
        flat = optax.flatten(default)
        variants = {"default": lambda d: (None, default), "flat": lambda d: (None, flat)}
    print("| target | family | steps | wall default (ms) | wall flat (ms) | default / flat |\n|---|---|---|---|---|---|")
    for name in args.targets.split(","):
        log_p, _, d, _, _ = load_target(name)
        target = veil.Target.from_logdensity(log_p, dim=d)
        for family in (veil.MeanField(d),) if args.mf_stl else (veil.MeanField(d), veil.FullRank(d)):
            walls, steps = {k: [] for k in variants}, set()
            for r in range(args.rounds + 1):
                for k, make in variants.items():
                    q, opt = make(d)
                    t0 = time.perf_counter()
                    res = veil.fit(target, family if q is None else q, key=jax.random.key(0), optimizer=opt,
                                   progress=False)
                    jax.block_until_ready(res.q)
                    if r:  # the first round compiles
                        walls[k].append(1e3 * (time.perf_counter() - t0))
                    steps.add(res.num_steps)
            a, b = np.median(walls["default"]), np.median(walls["flat"])
            row = {"target": name, "family": type(family).__name__, "steps": sorted(steps), "mf_stl": args.mf_stl,
                   "wall_default_ms": float(a), "wall_flat_ms": float(b)}
            print(f"| {name} | {row['family']} | {'/'.join(map(str, row['steps']))} | {a:.1f} | {b:.1f} | {a / b:.2f} |",
                  flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
