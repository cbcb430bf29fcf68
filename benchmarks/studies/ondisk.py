"""Rows on disk: per-step cost of a minibatch fit whose data are memory-mapped ``.npy`` files.

    python -m benchmarks.studies.ondisk [--ns 1e5,1e6] [--batches 256,4096] [--d 100] [--repeats 3]
                                [--out ondisk.jsonl]

The work is ``benchmarks/peers/minibatch.py``'s (Bayesian logistic regression, mean-field q, one
reparameterised draw, Adam 0.01, a fixed number of steps), with d = 100 features by default
(rows of 404 bytes: 1e6 rows are a 400 MB file). Tools, interleaved in one process:

* ``memory``: ``veil.Target.minibatched`` on in-memory arrays (batches gathered in the loop);
* ``disk``: the same target on ``np.load(path, mmap_mode="r")`` arrays: a feeder thread reads
  the next chunk's rows (ascending row order) while the compiled loop runs the current chunk;
* ``host-loop``: what one writes by hand around a memory map, a PyTorch ``DataLoader`` habit:
  per step, the batch's rows read from the memory map (a per-epoch ``np.random.permutation``,
  rows sorted), then one call of a jitted Adam step (the same ELBO);
* ``read``: the feeder's reading alone (``Feeder.load`` per step, no fitting): when it costs
  less than a step, the read is hidden behind the compute.

Per-step time is ``(t(S2) - t(S1)) / (S2 - S1)`` over warm runs (compile time and fixed costs,
such as the on-disk target's full-data start check, cancel), S2 - S1 at least an epoch.
The files sit in the page cache after the first pass (the machine has more memory than the
files); a cold disk is not measured here (dropping the cache needs root).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

# veil_tool: minibatch.py's veil fit; given memory maps, Target.minibatched keeps them on disk.
from benchmarks.peers.minibatch import STEP, log_lik, log_prior, make_data, per_step, veil_tool


def host_loop_tool(Xm, ym, B):
    n, d = Xm.shape
    opt = optax.adam(STEP)

    def neg_elbo(params, key, xb, yb):
        loc, log_scale = params
        z = loc + jnp.exp(log_scale) * jax.random.normal(key, (d,))
        return -(log_prior(z) + n / B * log_lik(z, (xb, yb)) + jnp.sum(log_scale))

    @jax.jit
    def step(params, state, key, xb, yb):
        g = jax.grad(neg_elbo)(params, key, xb, yb)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    def run(steps, seed=0):
        rng = np.random.default_rng(seed)
        params = (jnp.zeros(d), jnp.full(d, -2.3))
        state = opt.init(params)
        keys = jax.random.split(jax.random.key(seed), steps)
        per_epoch, perm = n // B, None
        for s in range(steps):
            if s % per_epoch == 0:
                perm = rng.permutation(n)
            idx = np.sort(perm[(s % per_epoch) * B:(s % per_epoch + 1) * B])
            params, state = step(params, state, keys[s], Xm[idx], ym[idx])
        jax.block_until_ready(params)
        return params

    return run


def read_tool(data, B):
    from veil.loop.batching import DiskBatches, Feeder, OnDisk

    source = DiskBatches(OnDisk(data), B)
    cap = source.steps_per_chunk(1)

    def run(steps, seed=0):
        feeder = Feeder(source, jax.random.split(jax.random.key(seed), 1), cap)
        for first in range(0, steps, cap):
            jax.block_until_ready(feeder.load(first, min(cap, steps - first)))
        feeder.close()

    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ns", default="1e5,1e6")
    p.add_argument("--batches", default="256,4096")
    p.add_argument("--d", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "backend": jax.default_backend()}
    print(json.dumps(meta))
    root = tempfile.mkdtemp(prefix="veil-ondisk-")
    print(f"{'n':>9} {'B':>5} {'tool':>10} {'us/step':>10} {'vs memory':>10}")
    for n in (int(float(x)) for x in a.ns.split(",")):
        X, y = make_data(n, a.d)
        np.save(f"{root}/X.npy", X)
        np.save(f"{root}/y.npy", y)
        Xm, ym = np.load(f"{root}/X.npy", mmap_mode="r"), np.load(f"{root}/y.npy", mmap_mode="r")
        for B in (int(b) for b in a.batches.split(",")):
            tools = {
                "memory": veil_tool(X, y, B),
                "disk": veil_tool(Xm, ym, B),
                "host-loop": host_loop_tool(Xm, ym, B),
                "read": read_tool((Xm, ym), B),
            }
            per_epoch = n // B
            s1 = max(200, per_epoch // 4)
            s2 = s1 + max(per_epoch, 1000)
            times = {k: [] for k in tools}
            for _ in range(a.repeats):
                for name, run in tools.items():
                    if name == "host-loop":  # a Python loop: a tenth of the steps is plenty
                        times[name].append(per_step(run, s1 // 10, s1 // 10 + (s2 - s1) // 10, 0))
                    else:
                        times[name].append(per_step(run, s1, s2, 0))
            med = {k: float(np.median(v)) * 1e6 for k, v in times.items()}
            for name in tools:
                ratio = med[name] / med["memory"]
                print(f"{n:>9} {B:>5} {name:>10} {med[name]:>10.1f} {ratio:>10.2f}")
                if a.out:
                    with open(a.out, "a") as f:
                        f.write(json.dumps({"n": n, "B": B, "d": a.d, "tool": name, "us_per_step": med[name],
                                            "all_us": [t * 1e6 for t in times[name]], "vs_memory": ratio,
                                            **meta}) + "\n")
        del Xm, ym
    for f in ("X.npy", "y.npy"):
        os.remove(f"{root}/{f}")
    os.rmdir(root)


if __name__ == "__main__":
    main()
