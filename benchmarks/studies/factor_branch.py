"""The factor step's branch on CPU: outputs selected after it (section 30) or passed through it.

    python -m benchmarks.studies.factor_branch [--targets RadonContextualEffectsIndiana,...] [--rounds 9]

Whole default ``FullRank`` fits (seed 0, the stopping rule on) on Inference Gym targets (as
``time_to_accuracy.py`` loads them) with ``veil.default_optimizer()`` and with the same
optimizer whose ``whitened_factor`` has section 30's form, written out below: the branch
returns only the factor step's new arrays, a waiting branch returns zeros, and the moments,
the running sum and the update are selected with ``where`` after it. Same arithmetic; the
fused code may round differently (1 ulp at the first factor step), so the trajectories part
after a while and steps can differ by a chunk. Interleaved rounds, medians.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np



def selected_after_branch(inner, learning_rate=0.1, *, b1=0.9, b2=0.999, eps=1e-8, threshold=5.0, max_dim=128):
    """``veil.optim.whitened_factor`` as section 30 had it (CPU path only)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import veil.optim as vo
    from veil.optim import WhitenedFactorState, _shared_scale_step, factor_step_interval

    init_fn = vo.whitened_factor(inner, learning_rate, max_dim=max_dim).init  # the state is the same

    def update_fn(updates, state, params=None):
        inner_updates, inner_state = inner.update(updates, state.inner, params)
        if state.first is None:
            return inner_updates, state._replace(inner=inner_state)
        k = factor_step_interval(params.dim)
        count = state.count + 1
        pending = (state.pending[0] + updates.log_scale, state.pending[1] + updates.unit_tril)
        nlow = params.dim * (params.dim + 1) / 2

        def factor_step(operands):
            (p_log_scale, p_unit), first, second = operands
            grads = eqx.tree_at(lambda q: (q.log_scale, q.unit_tril), updates, (p_log_scale / k, p_unit / k))
            first, second, direction = _shared_scale_step(
                params.factor_rmatvec(grads), first, second, count // k,
                b1=b1, b2=b2, eps=eps, threshold=threshold, mean_square=lambda u: jnp.sum(jnp.square(u)) / nlow)
            step = params.factor_matvec(-learning_rate / math.sqrt(params.dim) * direction)
            return first, second, step.log_scale, step.unit_tril

        def wait(operands):
            _, first, second = operands
            return jnp.zeros_like(first), jnp.zeros_like(second), jnp.zeros_like(params.log_scale), jnp.zeros_like(first)

        operands = (pending, state.first, state.second)
        due = count % k == 0
        out = jax.lax.cond(due, factor_step, wait, operands)
        first, second = (jnp.where(due, a, b) for a, b in zip(out[:2], operands[1:]))
        d_log_scale, d_unit = (jnp.where(due, a, 0.0) for a in out[2:])
        pending = jax.tree.map(lambda p: jnp.where(due, 0.0, p), pending)
        new = WhitenedFactorState(inner_state, count, pending, first, second)
        return eqx.tree_at(lambda q: (q.log_scale, q.unit_tril), inner_updates,
                           (inner_updates.log_scale + d_log_scale, inner_updates.unit_tril + d_unit)), new

    return optax.GradientTransformation(init_fn, update_fn)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="IllConditionedGaussian,RadonContextualEffectsIndiana,"
                    "VectorizedStochasticVolatilityLogSP500Small,BrownianMotionMissingMiddleObservations")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    import jax
    import optax

    import veil
    import veil.optim as vo
    from benchmarks.common import load_target

    settings = {
        "selected after": selected_after_branch(
            vo.whitened_location(optax.chain(vo.clip_outliers(), optax.adam(0.05)), 0.05), 0.1),
        "passed through": veil.default_optimizer(),
    }
    print(f"# {jax.devices()[0].device_kind}, {os.cpu_count()} cpus; jax {jax.__version__}; FullRank, seed 0, "
          f"{args.rounds} interleaved rounds, medians (ms)")
    print("| target | steps (selected / passed) | wall selected after | wall passed through | ratio |\n|---|---|---|---|---|")
    for name in args.targets.split(","):
        log_p, _, d, _, _ = load_target(name)
        target = veil.Target.from_logdensity(log_p, dim=d)
        walls, steps = {k: [] for k in settings}, {k: set() for k in settings}
        for r in range(args.rounds + 1):
            for k in (list(settings) if r % 2 else list(settings)[::-1]):
                t0 = time.perf_counter()
                res = veil.fit(target, veil.FullRank(d), key=jax.random.key(0), optimizer=settings[k], progress=False)
                jax.block_until_ready(res.q)
                if r:  # the first round compiles
                    walls[k].append(1e3 * (time.perf_counter() - t0))
                steps[k].add(res.num_steps)
        a, b = (np.median(walls[k]) for k in settings)
        print(f"| {name} | {'/'.join(str(sorted(s)) for s in steps.values())} | {a:.1f} | {b:.1f} | {a / b:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
