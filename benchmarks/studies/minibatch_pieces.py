"""Where veil's minibatch step loses time against the fused scan (issue 5, docs/benchmarks/minibatch-vi-scale.md).

    python -m benchmarks.studies.minibatch_pieces [--ns 1e5,1e6] [--batch 4096] [--steps 3000] [--repeats 3]

The same model as ``minibatch.py`` (logistic regression, d = 10, mean-field, one reparameterised
draw, Adam 0.01). Variants, each a plain ``jax.jit``-ed ``lax.scan`` unless named ``veil.fit``:

* ``fused-feistel``: ``minibatch.fused_tool`` (veil's permutation, hand-written gather and loss);
* ``scan + veil source``: the step's rows from ``veil.loop.batching.Shuffled.next``;
* ``scan + veil loss``: the driver's loss ``veil.fit._VILoss`` on the minibatched target, its
  rows from the target's own source;
* ``veil.fit``: ``minibatch.veil_tool``.

(Changing a driver setting such as ``driver.KEY_BLOCK`` must happen in a fresh process, before
the first fit compiles: the compiled chunk is cached by its arguments, not by module settings.)

Microseconds per step: wall of a warm call over its steps, medians of interleaved repeats.
"""

from __future__ import annotations

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.peers import minibatch as M


def veil_loss(X, y, B):
    """``(loss, params)``: the driver's loss for ``veil.fit`` on the minibatched model (a
    mean-field q, one reparameterised draw) and the family's starting parameters."""
    import veil
    from veil.fit import _VILoss

    d = X.shape[1]
    target = veil.Target.minibatched(M.log_prior, M.log_lik, (X, y), dim=d, batch_size=B)
    params, rest = eqx.partition(veil.MeanField(d), eqx.is_inexact_array)
    return _VILoss(target, veil.ELBO(num_samples=1, estimator=veil.Reparam()), rest), params


def scan_tool(X, y, B, piece):
    from veil.loop.batching import Shuffled

    n, d = X.shape
    loss, params = veil_loss(X, y, B)
    opt = optax.adam(M.STEP)

    def hand_loss(p, key, batch):
        eps = jax.random.normal(key, (d,))
        z = p[0] + jnp.exp(p[1]) * eps
        return -(M.log_prior(z) + n / B * M.log_lik(z, batch) + jnp.sum(p[1]))

    @eqx.filter_jit
    def train(loss, data, key, steps_arr):
        src = loss.target.batches if piece == "loss" else Shuffled(data, B)
        p0 = params if piece == "loss" else (jnp.zeros(d), jnp.full(d, -2.3))

        def step(carry, k):
            p, s, bs = carry
            batch, bs = src.next(bs)
            if piece == "loss":
                (v, _), g = eqx.filter_value_and_grad(loss, has_aux=True)(p, k, batch=batch)
            else:
                v, g = jax.value_and_grad(hand_loss)(p, k, batch)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s, bs), v

        keys = jax.random.split(key, steps_arr.shape[0])
        (p, *_), _ = jax.lax.scan(step, (p0, opt.init(p0), src.init(key)), keys)
        return p

    data = (jnp.asarray(X), jnp.asarray(y))
    return lambda steps, seed=0: jax.block_until_ready(train(loss, data, jax.random.key(seed), jnp.zeros(steps)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="1e5,1e6")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"# jax {jax.__version__}, {jax.devices()[0].device_kind}; B = {args.batch}, {args.steps} steps per call")
    print("| n | variant | us per step | / fused-feistel |")
    print("|---|---|---|---|")
    for n in (int(float(v)) for v in args.ns.split(",")):
        X, y = M.make_data(n, 10)
        B = args.batch
        tools = {
            "fused-feistel": M.fused_tool(X, y, B, "feistel"),
            "scan + veil source": scan_tool(X, y, B, "source"),
            "scan + veil loss": scan_tool(X, y, B, "loss"),
            "veil.fit": M.veil_tool(X, y, B),
        }
        for f in tools.values():
            f(args.steps)
        walls = {k: [] for k in tools}
        for r in range(args.repeats):
            for k, f in tools.items():
                t0 = time.perf_counter()
                f(args.steps, r)
                walls[k].append(1e6 * (time.perf_counter() - t0) / args.steps)
        base = np.median(walls["fused-feistel"])
        for k, v in walls.items():
            print(f"| {n:.0e} | {k} | {np.median(v):.1f} | {np.median(v) / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
