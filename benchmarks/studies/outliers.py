"""Gradient outliers and Adam: what ``veil.optim.clip_outliers`` changes, target by target.

    python -m benchmarks.studies.outliers [--targets A,B] [--seeds 7] [--variants adam,clip] [--gate G]
                                  [--family fullrank|meanfield]

For each Inference Gym target (same unconstrained log density as ``time_to_accuracy.py``) and
seed, a default ``veil.fit`` with ``FullRank`` (ELBO, 4 STL draws, the stopping rule) under
each optimizer variant:

* ``adam``: ``optax.adam(0.05)``, veil's default before the clip;
* ``clip``: ``clip_outliers()`` chained before Adam 0.05 (veil's default from section 26 to 28);
* ``default``: ``veil.default_optimizer()`` (since section 29: ``clip`` plus
  ``veil.optim.whitened_location``, the ``white-iso`` step below added to Adam's; since
  section 30 also ``veil.optim.whitened_factor``);
* ``clip3``: the same with ``threshold=3``;
* ``white-loc``: ``clip`` plus Adam on the location's gradient in q's whitened coordinates
  (``L^T g`` in, ``L u`` out; an experiment written here, not part of veil);
* ``natural-loc``: ``clip`` plus the location's natural gradient ``L L^T g`` before Adam (also
  an experiment here);
* ``white-iso``: ``clip`` for everything but the location, whose step is taken in q's
  whitened coordinates (``u = L^T g``) with Adam's moments but one second moment for all its
  coordinates (the mean of ``u^2``), so the step keeps the whitened gradient's direction, and
  mapped back with ``L`` (an experiment here).

It prints per variant the steps by seed, their median, max |mean error| / ground-truth sd by
seed, and the median ELBO (20,000 draws); and, for ``adam``, the largest loss of the first 400
steps against the median of steps 400-600 (the early spikes the clip is for).
"""

from __future__ import annotations

import argparse



def _loc_transform(kind: str):
    """An optax transformation acting on a FullRank's location gradient only."""
    import equinox as eqx
    import optax

    def update(g, state, params):
        L = params.scale_tril
        if kind == "whiten":
            new = L.T @ g.loc
        elif kind == "unwhiten":
            new = L @ g.loc
        else:  # natural gradient of the location: Sigma g
            new = L @ (L.T @ g.loc)
        return eqx.tree_at(lambda m: m.loc, g, new), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _white_iso(lr=0.05, b1=0.9, b2=0.999, eps=1e-8, threshold=5.0):
    """The location moved along ``L`` times Adam's first moment of ``u = L^T g`` over one
    shared root mean square of ``u``; every other parameter by ``clip``."""
    import equinox as eqx
    import jax.numpy as jnp
    import optax

    from veil.optim import clip_outliers

    inner = optax.chain(clip_outliers(), optax.adam(0.05))

    def init(params):
        return inner.init(params), jnp.zeros_like(params.loc), jnp.zeros(()), jnp.zeros((), jnp.int32)

    def update(g, state, params):
        inner_state, m, v, t = state
        L = params.scale_tril
        u = L.T @ g.loc
        bound = threshold * jnp.sqrt(v / jnp.maximum(1 - b2 ** t.astype(jnp.float32), 1e-30))
        u = jnp.where(t > 0, jnp.clip(u, -bound, bound), u)  # outliers, as clip_outliers
        t = t + 1
        m = b1 * m + (1 - b1) * u
        v = b2 * v + (1 - b2) * jnp.mean(u**2)
        tf = t.astype(jnp.float32)
        step = -lr * (m / (1 - b1**tf)) / (jnp.sqrt(v / (1 - b2**tf)) + eps)
        updates, inner_state = inner.update(g, inner_state, params)
        return eqx.tree_at(lambda q: q.loc, updates, L @ step), (inner_state, m, v, t)

    return optax.GradientTransformation(init, update)


def make_optimizer(variant: str):
    import optax

    import veil
    from veil.optim import clip_outliers

    if variant == "adam":
        return optax.adam(0.05)
    if variant == "clip":
        return optax.chain(clip_outliers(), optax.adam(0.05))
    if variant == "default":
        return veil.default_optimizer()
    if variant == "clip3":
        return optax.chain(clip_outliers(3.0), optax.adam(0.05))
    if variant == "white-loc":
        return optax.chain(clip_outliers(), _loc_transform("whiten"), optax.adam(0.05), _loc_transform("unwhiten"))
    if variant == "white-iso":
        return _white_iso()
    if variant == "natural-loc":
        return optax.chain(clip_outliers(), _loc_transform("natural"), optax.adam(0.05))
    raise ValueError(f"unknown variant {variant!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="VectorizedStochasticVolatilityLogSP500Small,RadonContextualEffectsIndiana")
    ap.add_argument("--seeds", type=int, default=7)
    ap.add_argument("--family", default="fullrank", choices=["fullrank", "meanfield"],
                    help="the family fitted (the white-*/natural-* experiments need fullrank)")
    ap.add_argument("--variants", default="adam,clip")
    ap.add_argument("--gate", type=float, default=None, help="fit with StopRule(decay_max_drift=GATE)")
    args = ap.parse_args()

    import jax
    import numpy as np

    import veil
    from benchmarks.common import load_target

    family = veil.FullRank if args.family == "fullrank" else veil.MeanField
    for name in args.targets.split(","):
        log_p, to_gt, d, gt_mean, gt_sd = load_target(name)
        target = veil.Target.from_logdensity(log_p, dim=d)
        print(f"\n{name} (dim {d})")
        print("| variant | steps by seed | median steps | max err/sd by seed | median ELBO |")
        print("|---|---|---|---|---|")
        spikes = []
        for variant in args.variants.split(","):
            opt = make_optimizer(variant)
            steps, errs, elbos = [], [], []
            for seed in range(args.seeds):
                stop = veil.StopRule() if args.gate is None else veil.StopRule(decay_max_drift=args.gate)
                res = veil.fit(target, family(d), key=jax.random.key(seed), optimizer=opt, progress=False,
                               stop=stop)
                z, log_q = res.q.sample_and_log_prob(jax.random.key(10_000 + seed), 20_000)
                y = to_gt(z)
                errs.append(float(np.max(np.abs(np.asarray(y.mean(0) - gt_mean)) / np.asarray(gt_sd))))
                elbos.append(float(np.mean(np.asarray(jax.vmap(log_p)(z)) - np.asarray(log_q))))
                steps.append(res.num_steps)
                if variant == "adam":
                    early = veil.fit(target, family(d), key=jax.random.key(seed), optimizer=opt,
                                     progress=False, stop=None, max_steps=600)
                    tr = np.asarray(early.trace)
                    spikes.append((seed, int(np.argmax(tr[:400])), float(np.max(tr[:400])), float(np.median(tr[400:600]))))
            print(f"| {variant} | {', '.join(map(str, steps))} | {int(np.median(steps))} | "
                  f"{', '.join(f'{e:.3f}' for e in errs)} | {np.median(elbos):.2f} |", flush=True)
        if spikes:
            print("\nAdam's early losses (seed: step of the largest loss in steps 0-399, that loss, "
                  "median loss of steps 400-599):")
            for seed, step, top, med in spikes:
                print(f"  {seed}: step {step}, {top:.4g}, {med:.4g}")


if __name__ == "__main__":
    main()
