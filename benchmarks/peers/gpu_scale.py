"""Logistic regression at n=1e7, d=100 on one GPU: full batch and minibatch against the
memory-bandwidth bound (issue 5's GPU benchmark).

    python -m benchmarks.peers.gpu_scale [--n 1e7] [--d 100] [--repeats 3] [--budget 300] [--out gpu_scale.jsonl]

Rows (JSON, one per line, also appended to ``--out``):

* ``bandwidth``: the device's copy bandwidth, ``x + 1`` over the n x d float32 design matrix
  (bytes read plus bytes written over the median time), and its read bandwidth
  (a column sum: bytes read over time).
* ``full``: milliseconds per full-batch step of the ELBO (one reparameterised draw, mean-field q,
  Adam) for a hand-written ``lax.scan`` with ``X`` as an input, for ``veil.fit`` on
  ``Target.from_logdensity`` with a closure over ``X`` (the plain user path; veil lifts the
  closed-over arrays out as program inputs), and for ``veil.fit`` on
  ``Target.from_numpyro``. The bound: a step reads ``X`` twice (``X @ z`` forward,
  ``X.T @ r`` backward), so ``2 * X.nbytes / read bandwidth`` (``bound_at_copy_bw_ms``: the
  same bytes over the copy bandwidth); ``one_pass_ms`` is the bound of a kernel that would
  read each row once for both.
* ``minibatch``: microseconds per step at batch 256 and 4096 for ``veil.fit`` on
  ``Target.minibatched``, the hand-written fused scan with veil's Feistel permutation and
  with uniform indices, ``veil-branches`` (veil's loop as it runs on CPU, with ``lax.cond`` and
  a ``while_loop``: what selecting instead of branching saves on this device), and NumPyro's
  subsampled plate (``SVI.run``, batch 256 only: its
  subsample is drawn by sequential swaps, slow on a GPU). A batch moves ``B * d * 4`` bytes
  a few times: far below a microsecond, so these steps are bound by latency, not bandwidth.
* ``accuracy``: a full-batch fit to convergence (veil's stopping rule) as reference, the
  minibatch fit (batch 4096, stopping rule), and a full-batch fit given the minibatch fit's
  wall time; error in reference sds.

The tools are those of ``benchmarks/peers/minibatch.py`` (same steps, same timing by differences of
warm runs). Sections run in the order above and stop starting new ones past ``--budget``
seconds, so a short device lease still returns the most important rows.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.peers.minibatch import STEP, fused_tool, log_lik, log_prior, numpyro_tool, per_step, veil_tool


def median_time(f, *args, reps=10):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def make_data(n, d, seed=0):
    """Rows made on the device (a 4 GB host array would take longer to build than to use)."""
    kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
    X = jax.random.normal(kx, (n, d), jnp.float32)
    w = jax.random.normal(kw, (d,)) / math.sqrt(d)
    y = jax.random.bernoulli(ky, jax.nn.sigmoid(X @ w)).astype(jnp.float32)
    return jax.block_until_ready(X), jax.block_until_ready(y)


def bandwidth(X, y):
    copy = median_time(jax.jit(lambda x: x + 1.0), X)
    read = median_time(jax.jit(lambda x: jnp.sum(x, axis=0)), X)
    # One gradient of the log likelihood alone: the floor of a full-batch step's work.
    grad = median_time(jax.jit(jax.grad(lambda z, X, y: log_lik(z, (X, y)))), jnp.full(X.shape[1], 0.01), X, y)
    return {"copy_GBps": round(2 * X.nbytes / copy / 1e9, 1), "read_GBps": round(X.nbytes / read / 1e9, 1),
            "copy_ms": round(1e3 * copy, 3), "read_ms": round(1e3 * read, 3), "grad_loglik_ms": round(1e3 * grad, 3)}


def full_batch_tools(X, y):
    import numpyro
    import numpyro.distributions as dist

    import veil

    n, d = X.shape
    opt = optax.adam(STEP)

    @jax.jit
    def train(X, y, key, steps_arr):
        def neg_elbo(params, k):
            loc, log_scale = params
            z = loc + jnp.exp(log_scale) * jax.random.normal(k, (d,))
            return -(log_prior(z) + log_lik(z, (X, y)) + jnp.sum(log_scale))

        def step(carry, k):
            params, state = carry
            loss, g = jax.value_and_grad(neg_elbo)(params, k)
            updates, state = opt.update(g, state, params)
            return (optax.apply_updates(params, updates), state), loss

        params = (jnp.zeros(d), jnp.full(d, -2.3))
        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, steps_arr.shape[0]))
        return params[0]

    def fused(steps, seed=0):
        return jax.block_until_ready(train(X, y, jax.random.key(seed), jnp.zeros(steps)))

    def logp(z):  # a closure over 4 GB: veil passes X and y to the program as inputs
        return log_prior(z) + log_lik(z, (X, y))

    t_closure = veil.Target.from_logdensity(logp, dim=d)

    def model(X, y):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
        numpyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)

    t_numpyro = veil.Target.from_numpyro(model, X, y)
    objective = veil.ELBO(num_samples=1, estimator=veil.Reparam())

    def veil_run(target):
        def run(steps, seed=0):
            res = veil.fit(target, veil.MeanField(d), key=jax.random.key(seed), objective=objective,
                           optimizer=opt, max_steps=steps, stop=None, progress=False)
            return jax.block_until_ready(res.q.mean)
        return run

    return {"fused": fused, "veil-logdensity": veil_run(t_closure), "veil-numpyro": veil_run(t_numpyro)}, t_closure


def veil_branches_tool(X, y, B, branches: bool):
    """``veil_tool`` with veil's loop forced to branch (``lax.cond``, ``while_loop``: the CPU
    code) or to select (the GPU code), to measure what the choice is worth on this device."""
    import contextlib

    import veil
    import veil.loop.batching
    import veil.loop.driver

    @contextlib.contextmanager
    def forced():
        saved = veil.loop.driver.cheap_branches, veil.loop.batching.cheap_branches
        veil.loop.driver.cheap_branches = veil.loop.batching.cheap_branches = lambda: branches
        try:
            yield
        finally:
            veil.loop.driver.cheap_branches, veil.loop.batching.cheap_branches = saved

    d = X.shape[1]
    # New functions: a program of its own, not the other variant's from the cache.
    target = veil.Target.minibatched(lambda z: log_prior(z), lambda z, b: log_lik(z, b), (X, y), dim=d, batch_size=B)
    objective = veil.ELBO(num_samples=1, estimator=veil.Reparam())

    def run(steps, seed=0):
        with forced():
            res = veil.fit(target, veil.MeanField(d), key=jax.random.key(seed), objective=objective,
                           optimizer=optax.adam(STEP), max_steps=steps, stop=None, progress=False)
            return jax.block_until_ready(res.q.mean)

    return run


def emit(row, out, meta):
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps({**row, **meta}) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", default="1e7")
    p.add_argument("--d", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=300.0, help="seconds; no new section starts after")
    p.add_argument("--small-n", default="1e5", help="a second n for the minibatch rows (flat in n?)")
    p.add_argument("--out", default="gpu_scale.jsonl")
    args = p.parse_args()
    start = time.perf_counter()
    n, d = int(float(args.n)), args.d
    dev = jax.devices()[0]
    meta = {"machine": platform.machine(), "device": getattr(dev, "device_kind", str(dev)),
            "jax": jax.__version__, "n": n, "d": d}
    print(json.dumps(meta), flush=True)
    X, y = make_data(n, d)
    rows = {}

    def section(name, fn):
        if time.perf_counter() - start > args.budget:
            emit({"section": name, "skipped": "time budget"}, args.out, meta)
            return
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:
            emit({"section": name, "error": traceback.format_exc()[-2000:]}, args.out, meta)
        print(f"# {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    def bw():
        rows["bw"] = bandwidth(X, y)
        emit({"section": "bandwidth", **rows["bw"]}, args.out, meta)

    def full():
        tools, _ = full_batch_tools(X, y)
        times = {k: [] for k in tools}
        for _ in range(args.repeats):
            for name, run in tools.items():
                times[name].append(per_step(run, 20, 220, 0))
        read, copy = rows["bw"]["read_GBps"] * 1e9, rows["bw"]["copy_GBps"] * 1e9
        bound = 2 * X.nbytes / read  # X read twice a step
        row = {"section": "full", "bound_ms": round(1e3 * bound, 3), "one_pass_ms": round(1e3 * X.nbytes / read, 3),
               "bound_at_copy_bw_ms": round(1e3 * 2 * X.nbytes / copy, 3),
               **{f"{k}_ms": round(1e3 * float(np.median(v)), 3) for k, v in times.items()},
               **{f"{k}_over_bound": round(float(np.median(v)) / bound, 2) for k, v in times.items()},
               "all_ms": {k: [round(1e3 * t, 3) for t in v] for k, v in times.items()}}
        emit(row, args.out, meta)

    def minibatch(n_rows):
        Xn, yn = X[:n_rows], y[:n_rows]
        for B in (256, 4096):
            tools = {"veil": veil_tool(Xn, yn, B), "veil-branches": veil_branches_tool(Xn, yn, B, True),
                     "fused-feistel": fused_tool(Xn, yn, B, "feistel"), "fused-randint": fused_tool(Xn, yn, B, "randint")}
            if B == 256:
                tools["numpyro"] = numpyro_tool(Xn, yn, B)
            times = {k: [] for k in tools}
            epoch = n_rows // B
            for _ in range(args.repeats):
                for name, run in tools.items():
                    if name == "numpyro":
                        s1, s2 = 20, 520
                    else:
                        s1, s2 = 2000, 2000 + max(10_000, int(math.ceil(1.1 * epoch)))
                    times[name].append(per_step(run, s1, s2, 0))
            row = {"section": "minibatch", "n_rows": n_rows, "batch": B,
                   **{f"{k}_us": round(1e6 * float(np.median(v)), 2) for k, v in times.items()},
                   "veil_over_fused-feistel": round(float(np.median(times["veil"]) / np.median(times["fused-feistel"])), 3),
                   "veil_over_fused-randint": round(float(np.median(times["veil"]) / np.median(times["fused-randint"])), 3),
                   "branches_over_veil": round(float(np.median(times["veil-branches"]) / np.median(times["veil"])), 2),
                   "batch_bytes": B * d * 4,
                   "all_us": {k: [round(1e6 * t, 2) for t in v] for k, v in times.items()}}
            if "numpyro" in times:
                row["numpyro_over_veil"] = round(float(np.median(times["numpyro"]) / np.median(times["veil"])), 1)
            emit(row, args.out, meta)

    def accuracy():
        import veil

        _, t_full = full_batch_tools(X, y)
        mb = veil.Target.minibatched(log_prior, log_lik, (X, y), dim=d, batch_size=4096)
        fit = lambda t, seed, **kw: veil.fit(t, veil.MeanField(d), key=jax.random.key(seed), progress=False, **kw)  # noqa: E731
        fit(t_full, 99, max_steps=200, stop=None)  # compile
        ref = fit(t_full, 100, max_steps=20_000)
        t0 = time.perf_counter()
        fit(t_full, 101, max_steps=500, stop=None)
        per_step_full = (time.perf_counter() - t0) / 500
        fit(mb, 99, max_steps=200)  # compile
        t0 = time.perf_counter()
        r_mb = fit(mb, 0, max_steps=200_000)
        wall_mb = time.perf_counter() - t0
        steps = max(1, int(wall_mb / per_step_full))
        t0 = time.perf_counter()
        r_fb = fit(t_full, 0, max_steps=steps, stop=None)
        wall_fb = time.perf_counter() - t0
        m, s = np.asarray(ref.q.mean), np.asarray(ref.q.scale)
        row = {"section": "accuracy", "ref_steps": ref.num_steps, "ref_wall": round(ref.wall_time, 2),
               "ref_stop": ref.stop_reason}
        for name, r, wall in (("minibatch", r_mb, wall_mb), ("full_equal_wall", r_fb, wall_fb)):
            ratio = np.asarray(r.q.scale) / s
            row[name] = {"wall": round(wall, 2), "steps": r.num_steps, "stop": r.stop_reason,
                         "max_err_sd": round(float(np.max(np.abs(np.asarray(r.q.mean) - m) / s)), 3),
                         "sd_ratio": [round(float(ratio.min()), 3), round(float(ratio.max()), 3)]}
        emit(row, args.out, meta)

    section("bandwidth", bw)
    section("full", full)
    section("minibatch", lambda: minibatch(n))
    section("accuracy", accuracy)
    section("minibatch-small-n", lambda: minibatch(int(float(args.small_n))))
    print(f"# total {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
