"""Minibatch VI per-step cost against n: veil, a hand-written fused scan, NumPyro's subsampled plate.

    python -m benchmarks.peers.minibatch [--ns 1e3,1e4,1e5,1e6,1e7] [--batches 256,4096] [--repeats 3]
                                   [--d 10] [--out minibatch.jsonl]

The work, identical for the three tools: Bayesian logistic regression (N(0, 1) prior on d
weights, n rows of standard normal features), a mean-field Gaussian q, the ELBO with one
reparameterised draw per step, Adam (step 0.01), a batch of B rows per step scaled by n / B.

* ``veil``: ``veil.fit(veil.Target.minibatched(...), MeanField(d), objective=ELBO(1, Reparam()),
  stop=None)`` (a fixed number of steps; batches from per-epoch permutations in the loop);
* ``fused-*``: the same step written by hand as one ``jax.jit``-ed ``lax.scan`` with optax;
  its batches come from ``fused-perm``: ``jax.random.permutation`` once per epoch (by
  ``lax.cond`` in the scan; what a user would write first), ``fused-randint``: ``B`` uniform
  indices per step, with replacement (the cheapest batching there is, not epochs), or
  ``fused-feistel``: veil's own per-epoch permutation (``veil.loop.batching.permute``), so that
  ``veil / fused-feistel`` is the cost of veil's engine alone. The scan returns only the
  parameters, so XLA never computes the loss's value (its gradient needs none of it);
  ``fused-feistel-losses`` is the same scan returning its per-step losses too, the work
  ``veil`` does (its loss trace, its finiteness check);
* ``numpyro``: ``numpyro.plate("data", n, subsample_size=B)`` with ``AutoNormal``,
  ``Trace_ELBO()``, ``numpyro.optim.Adam(0.01)``, ``SVI.run`` (no progress bar).

``--accuracy`` instead compares fits: at each n, a full-batch MeanField fit run to convergence
(veil's stopping rule) is the reference; then the minibatch fit (batch 256, default stopping
rule, wall T) and a full-batch fit given the same wall T (a fixed step count, from a timed warm
run). Error: max |mean - reference mean| / reference sd, and sd ratios to the reference.

Per-step time is ``(t(S2) - t(S1)) / (S2 - S1)``: the difference of two warm runs, so compile
time and a fit's fixed costs cancel. S2 - S1 covers at least one full epoch (n / B steps), so
the amortised cost of the per-epoch permutation is in the figure. Medians over ``--repeats``;
the tools run interleaved in one process, in reversed order on every other repeat.
``veil_over_<tool>`` is the ratio of the medians, ``veil_over_<tool>_paired`` the median of
the ratios within each repeat (the steadier of the two on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

STEP = 0.01


def make_data(n: int, d: int, seed: int = 0):
    r = np.random.default_rng(seed)
    X = r.standard_normal((n, d), dtype=np.float32)
    w = r.standard_normal(d).astype(np.float32)
    y = (r.random(n, dtype=np.float32) < 1 / (1 + np.exp(-(X @ w)))).astype(np.float32)
    return X, y


def log_prior(z):
    return -0.5 * jnp.sum(z**2)


def log_lik(z, batch):
    X, y = batch
    f = X @ z
    return jnp.sum(y * f - jnp.logaddexp(0.0, f))


# ------------------------------------------------------------------ veil
_VEIL_OPT = optax.adam(STEP)


def veil_tool(X, y, B):
    import veil

    d = X.shape[1]
    target = veil.Target.minibatched(log_prior, log_lik, (X, y), dim=d, batch_size=B)
    objective = veil.ELBO(num_samples=1, estimator=veil.Reparam())

    def run(steps, seed=0):
        res = veil.fit(target, veil.MeanField(d), key=jax.random.key(seed), objective=objective,
                       optimizer=_VEIL_OPT, max_steps=steps, stop=None, progress=False)
        jax.block_until_ready(res.q)
        return res.q.mean

    return run


# ------------------------------------------------------------------ hand-written fused scan
def fused_tool(X, y, B, order, keep_losses=False):
    """The hand-written scan. With ``keep_losses`` it returns the per-step losses beside the
    parameters, as a loop that reports its loss trace does; without, XLA drops the loss's
    value (only its gradient is used), which at large ``B`` is most of what separates it
    from ``veil`` (docs/benchmarks/minibatch-vi-fused-scan-losses.md)."""
    from veil.loop.batching import ROUNDS, permute

    X, y = jnp.asarray(X), jnp.asarray(y)
    n, d = X.shape
    per_epoch = n // B
    opt = optax.adam(STEP)

    def neg_elbo(params, key, xb, yb):
        loc, log_scale = params
        eps = jax.random.normal(key, (d,))
        z = loc + jnp.exp(log_scale) * eps
        return -(log_prior(z) + n / B * log_lik(z, (xb, yb)) + jnp.sum(log_scale))

    def batch_perm(order_state, k):
        perm, pos, kp = order_state

        def reshuffle(args):
            perm, pos, kp = args
            kp, sub = jax.random.split(kp)
            return jax.random.permutation(sub, n).astype(jnp.int32), 0, kp

        perm, pos, kp = jax.lax.cond(pos >= per_epoch, reshuffle, lambda a: a, (perm, pos, kp))
        return jax.lax.dynamic_slice_in_dim(perm, pos * B, B), (perm, pos + 1, kp)

    def batch_feistel(order_state, k):
        rk, pos, kp = order_state

        def reshuffle(args):
            rk, pos, kp = args
            kp, sub = jax.random.split(kp)
            return jax.random.bits(sub, (ROUNDS,), jnp.uint32), 0, kp

        rk, pos, kp = jax.lax.cond(pos >= per_epoch, reshuffle, lambda a: a, (rk, pos, kp))
        return permute(pos * B + jnp.arange(B), rk, n), (rk, pos + 1, kp)

    def batch_randint(order_state, k):
        return jax.random.randint(jax.random.fold_in(k, 1), (B,), 0, n), order_state

    next_batch = {"perm": batch_perm, "feistel": batch_feistel, "randint": batch_randint}[order]

    @jax.jit
    def train(X, y, key, steps_arr):
        params = (jnp.zeros(d), jnp.full(d, -2.3))
        state = opt.init(params)
        k_order, k_steps = jax.random.split(key)
        first = {"perm": jnp.arange(n, dtype=jnp.int32), "feistel": jnp.zeros(ROUNDS, jnp.uint32),
                 "randint": jnp.int32(0)}[order]

        def step(carry, k):
            params, state, order_state = carry
            idx, order_state = next_batch(order_state, k)
            loss, g = jax.value_and_grad(neg_elbo)(params, k, X[idx], y[idx])
            updates, state = opt.update(g, state, params)
            return (optax.apply_updates(params, updates), state, order_state), loss

        keys = jax.random.split(k_steps, steps_arr.shape[0])
        init = (params, state, (first, jnp.int32(per_epoch), k_order) if order != "randint" else None)
        (params, *_), losses = jax.lax.scan(step, init, keys)
        return (params[0], losses) if keep_losses else params[0]

    def run(steps, seed=0):
        out = train(X, y, jax.random.key(seed), jnp.zeros(steps))  # one compile per step count
        jax.block_until_ready(out)
        return out

    return run


# ------------------------------------------------------------------ NumPyro
def numpyro_tool(X, y, B):
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    X, y = jnp.asarray(X), jnp.asarray(y)
    n, d = X.shape

    def model(X, y):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
        with numpyro.plate("data", n, subsample_size=B) as idx:
            numpyro.sample("y", dist.Bernoulli(logits=X[idx] @ z), obs=y[idx])

    guide = AutoNormal(model)
    svi = SVI(model, guide, numpyro.optim.Adam(STEP), Trace_ELBO())

    def run(steps, seed=0):
        r = svi.run(jax.random.key(seed), steps, X, y, progress_bar=False)
        jax.block_until_ready(r.params)
        return r.params

    return run


def per_step(run, s1, s2, warm_steps):
    run(s1)  # compile (the fused scan compiles per step count: warm both)
    run(s2)
    t0 = time.perf_counter()
    run(s1)
    t1 = time.perf_counter()
    run(s2)
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / (s2 - s1)


def accuracy_at_equal_wall(ns, d, seeds, out, meta):
    import veil

    for n in ns:
        X, y = make_data(n, d)
        Xj, yj = jnp.asarray(X), jnp.asarray(y)
        full = veil.Target.from_logdensity(lambda z: log_prior(z) + log_lik(z, (Xj, yj)), dim=d)
        mb = veil.Target.minibatched(log_prior, log_lik, (X, y), dim=d, batch_size=256)
        fit = lambda t, seed, **kw: veil.fit(t, veil.MeanField(d), key=jax.random.key(seed), progress=False, **kw)  # noqa: E731
        fit(full, 99, max_steps=300, stop=None)  # compile
        ref = fit(full, 100)
        # Full-batch seconds per step, warm, for the equal-wall budget.
        t0 = time.perf_counter()
        fit(full, 101, max_steps=2000, stop=None)
        per_step_full = (time.perf_counter() - t0) / 2000
        fit(mb, 99)  # compile
        for seed in range(seeds):
            t0 = time.perf_counter()
            r_mb = fit(mb, seed)
            wall_mb = time.perf_counter() - t0
            steps = max(1, int(wall_mb / per_step_full))
            t0 = time.perf_counter()
            r_fb = fit(full, seed, max_steps=steps, stop=None)
            wall_fb = time.perf_counter() - t0
            m, s = np.asarray(ref.q.mean), np.asarray(ref.q.scale)
            row = {"mode": "accuracy", "n": n, "d": d, "seed": seed, "ref_steps": ref.num_steps,
                   "ref_wall": round(ref.wall_time, 2)}
            for name, r, wall in (("minibatch", r_mb, wall_mb), ("full_equal_wall", r_fb, wall_fb)):
                ratio = np.asarray(r.q.scale) / s
                row[name] = {"wall": round(wall, 2), "steps": r.num_steps,
                             "max_err_sd": round(float(np.max(np.abs(np.asarray(r.q.mean) - m) / s)), 3),
                             "sd_ratio": [round(float(ratio.min()), 3), round(float(ratio.max()), 3)]}
            print(json.dumps(row), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps({**row, **meta}) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--accuracy", action="store_true", help="minibatch vs full batch at equal wall time")
    p.add_argument("--seeds", type=int, default=3, help="(--accuracy) fits per n")
    p.add_argument("--ns", default="1e3,1e4,1e5,1e6,1e7")
    p.add_argument("--batches", default="256,4096")
    p.add_argument("--d", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tools", default="veil,fused-feistel,fused-randint,fused-perm,numpyro")
    p.add_argument("--numpyro-steps", type=int, default=2000, help="at most; fewer (2e8 / n, at least 100) at large n")
    p.add_argument("--out", default="minibatch.jsonl")
    args = p.parse_args()
    meta = {"machine": platform.processor() or platform.machine(), "jax": jax.__version__,
            "devices": str(jax.devices())}
    print(json.dumps(meta))
    if args.accuracy:
        return accuracy_at_equal_wall([int(float(v)) for v in args.ns.split(",")], args.d, args.seeds, args.out, meta)
    for n in (int(float(v)) for v in args.ns.split(",")):
        X, y = make_data(n, args.d)
        for B in (int(v) for v in args.batches.split(",")):
            if B > n:
                continue
            epoch = n // B
            tools = {"veil": veil_tool, "numpyro": numpyro_tool,
                     **{f"fused-{o}": (lambda X, y, B, o=o: fused_tool(X, y, B, o)) for o in ("feistel", "randint", "perm")},
                     "fused-feistel-losses": lambda X, y, B: fused_tool(X, y, B, "feistel", keep_losses=True)}
            runs = {k: tools[k](X, y, B) for k in args.tools.split(",")}
            times = {k: [] for k in runs}
            for rep in range(args.repeats):
                # Alternate the tools' order between repeats, so that neither gains from
                # going first (a warm cache, a quiet stretch of the shared machine).
                for name, run in (list(runs.items()) if rep % 2 == 0 else list(runs.items())[::-1]):
                    if name == "fused-perm" and n > 10**6:
                        continue  # one 1e7 permutation takes ~12 s here: minutes per row
                    if name == "numpyro":  # NumPyro draws its subsample at each step: no epochs
                        # (SVI.run compiles on every call: enough steps that compile noise is small)
                        # (its subsample is B sequential swaps: fewer steps at large B)
                        s1, s2 = 20, 20 + max(100, min(args.numpyro_steps, int(2e8 // n), int(2000 * 256 // B)))
                    else:
                        s1 = 2000
                        s2 = s1 + max(10_000, int(math.ceil(1.5 * epoch)))
                    times[name].append(per_step(run, s1, s2, 0))
            times = {k: v for k, v in times.items() if v}
            row = {"n": n, "d": args.d, "batch": B, **{f"{k}_us": round(1e6 * float(np.median(v)), 2) for k, v in times.items()},
                   **{f"{k}_all_us": [round(1e6 * t, 2) for t in v] for k, v in times.items()}}
            for f in ("fused-feistel", "fused-feistel-losses", "fused-randint", "fused-perm"):
                if "veil" in times and f in times:
                    row[f"veil_over_{f}"] = round(float(np.median(times["veil"]) / np.median(times[f])), 3)
                    # The same ratio within each repeat (the two ran back to back), then the
                    # median: less exposed to the machine's slow stretches than a ratio of medians.
                    row[f"veil_over_{f}_paired"] = round(float(np.median(np.divide(times["veil"], times[f]))), 3)
            if "veil" in times and "numpyro" in times:
                row["numpyro_over_veil"] = round(float(np.median(times["numpyro"]) / np.median(times["veil"])), 1)
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps({**row, **meta}) + "\n")


if __name__ == "__main__":
    main()
