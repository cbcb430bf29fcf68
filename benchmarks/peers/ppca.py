"""Probabilistic PCA with local latents on minibatches: veil against NumPyro's SVI, per step.

    python -m benchmarks.peers.ppca [--n 5000] [--d 10] [--k 2] [--batch 100] [--repeats 5]
                                    [--steps 20000] [--out results/ppca/ppca.jsonl]

The work, identical for both tools: x_i = W z_i + sigma eps_i (i = 1..n), z_i ~ N(0, I_k) local,
W and sigma learned as model parameters (``numpyro.param``), the model's plate subsampled to
``--batch`` rows a step; a mean-field Gaussian per row for z_i (veil: ``veil.PerDatum(
veil.MeanField(k))``; NumPyro: ``AutoNormal``, which keeps a location and scale per row and
indexes them by the subsample); the ELBO with one draw; Adam with step 0.01 on everything.

* ``veil``: ``veil.fit(target, PerDatum(MeanField(k), step_size=0.01), optimizer=optax.adam(0.01),
  stop=None, max_steps=S)``: the compiled loop; the rows' parameters move only in their batch.
* ``numpyro-run``: ``SVI.run(key, S, x, progress_bar=False)`` (NumPyro compiles the whole run
  as one ``fori_loop``);
* ``numpyro-update``: a Python loop over a ``jax.jit``-ed ``svi.update``, the loop a NumPyro
  user writes to watch the loss.

Per-step time is ``(t(S2) - t(S1)) / (S2 - S1)`` of warm runs (compilation and fixed costs
cancel); medians over ``--repeats``, the tools interleaved in one process, in reversed order on
every other repeat. ``numpyro_*_over_veil`` is the ratio of medians. Accuracy: after
``--steps`` steps from the same start, each tool's sigma^2 and the largest principal angle
between span(W) and the k leading eigenvectors of the sample covariance, against Tipping &
Bishop's closed-form maximum likelihood.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

STEP = 0.01


def make_data(n: int, d: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k)) @ rng.normal(size=(d, k)).T + 0.5 * rng.normal(size=(n, d))
    x = (x - x.mean(0)).astype(np.float32)
    w0 = (0.1 * np.random.default_rng(seed + 1).normal(size=(d, k))).astype(np.float32)
    return x, w0


def make_model(n, d, k, batch, w0):
    import numpyro
    import numpyro.distributions as dist

    def ppca(x):
        w = numpyro.param("W", jnp.asarray(w0))
        sigma = numpyro.param("sigma", 1.0, constraint=dist.constraints.positive)
        with numpyro.plate("data", n, subsample_size=batch) as idx:
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([k]).to_event(1))
            numpyro.sample("x", dist.Normal(z @ w.T, sigma).to_event(1), obs=x[idx])

    return ppca


def ml_solution(x, k):
    eig, vec = np.linalg.eigh(x.T.astype(np.float64) @ x / x.shape[0])
    eig, vec = eig[::-1], vec[:, ::-1]
    return eig[k:].mean(), vec[:, :k]


def angle(w, vec) -> float:
    q = np.linalg.qr(np.asarray(w, np.float64))[0]
    return float(np.degrees(np.arccos(np.clip(np.linalg.svd(q.T @ vec)[1].min(), -1.0, 1.0))))


def veil_tool(x, model, k):
    import veil

    target = veil.Target.from_numpyro(model, jnp.asarray(x))
    guide = veil.PerDatum(veil.MeanField(k), step_size=STEP)
    opt = optax.adam(STEP)

    def run(steps, seed=0):
        res = veil.fit(target, guide, key=jax.random.key(seed), optimizer=opt, max_steps=steps, stop=None,
                       progress=False)
        return {"W": np.asarray(res.params["W"]), "sigma": float(res.params["sigma"])}

    return run


def numpyro_tools(x, model):
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    svi = SVI(model, AutoNormal(model), numpyro.optim.Adam(STEP), Trace_ELBO())
    xs = jnp.asarray(x)

    def result(params):
        return {"W": np.asarray(params["W"]), "sigma": float(params["sigma"])}

    def run(steps, seed=0):
        return result(svi.run(jax.random.key(seed), steps, xs, progress_bar=False).params)

    update = jax.jit(svi.update)

    def loop(steps, seed=0):
        state = svi.init(jax.random.key(seed), xs)
        for _ in range(steps):
            state, _ = update(state, xs)
        jax.block_until_ready(state)
        return result(svi.get_params(state))

    return {"numpyro-run": run, "numpyro-update": loop}


def timed(run, steps):
    t0 = time.perf_counter()
    out = run(steps)
    return time.perf_counter() - t0, out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--d", type=int, default=10)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=20000, help="steps of the accuracy runs")
    p.add_argument("--numpyro-steps", type=int, default=0, help="also fit NumPyro for this many steps (accuracy only)")
    p.add_argument("--s1", type=int, default=500)
    p.add_argument("--s2", type=int, default=2500)
    p.add_argument("--out", default="results/ppca/ppca.jsonl")
    args = p.parse_args()

    import numpyro

    x, w0 = make_data(args.n, args.d, args.k)
    model = make_model(args.n, args.d, args.k, args.batch, w0)
    tools = {"veil": veil_tool(x, model, args.k), **numpyro_tools(x, model)}
    for run in tools.values():  # compile
        run(args.s1)
        run(args.s2)
    times = {name: [] for name in tools}
    order = list(tools)
    for r in range(args.repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            t1, _ = timed(tools[name], args.s1)
            t2, _ = timed(tools[name], args.s2)
            times[name].append((t2 - t1) / (args.s2 - args.s1))
    s2_ml, vec = ml_solution(x, args.k)
    fits = {name: run(args.steps) for name, run in tools.items()}
    if args.numpyro_steps:  # NumPyro run longer: does it reach the same point?
        fits["numpyro-run-long"] = tools["numpyro-run"](args.numpyro_steps)
    row = {
        "benchmark": "ppca", "n": args.n, "d": args.d, "k": args.k, "batch": args.batch,
        "ms_per_step": {name: round(1e3 * float(np.median(t)), 4) for name, t in times.items()},
        "accuracy_after_steps": args.steps, "sigma2_ml": round(float(s2_ml), 5),
        "sigma2": {name: round(f["sigma"] ** 2, 5) for name, f in fits.items()},
        "angle_deg": {name: round(angle(f["W"], vec), 3) for name, f in fits.items()},
        "machine": platform.processor() or platform.machine(), "cpus": jax.device_count(),
        "versions": {"jax": jax.__version__, "numpyro": numpyro.__version__},
        "command": "python -m benchmarks.peers.ppca " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
    }
    veil_ms = np.median(times["veil"])
    for name in ("numpyro-run", "numpyro-update"):
        row[f"{name.replace('-', '_')}_over_veil"] = round(float(np.median(times[name]) / veil_ms), 2)
    print(json.dumps(row, indent=1))
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
