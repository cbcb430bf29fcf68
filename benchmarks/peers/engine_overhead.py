"""Engine overhead: the same VI algorithm run by veil, a hand-written fused loop and peers.

    python -m benchmarks.peers.engine_overhead [--steps 5000] [--reps 3] [--tools veil,hand,...]

Algorithm everywhere: Gaussian family, ELBO with 1 draw and the plain reparameterisation
gradient, Adam(1e-2), a fixed number of steps, no stopping rule. Problems: Bayesian logistic
regression, n=1000 synthetic rows, standard normal prior; mean-field at d=25, full-rank at
d=100. Each (tool, problem, repeat) runs in a fresh process (the persistent compilation cache
off) and reports:

* first: wall time of the first call in the process, compilation included (imports excluded);
  ``veil_pcache`` is veil in a new process whose persistent compilation cache (a temporary
  directory, primed once before the repeats) already holds the programs;
* second: wall time of the second call (same shapes, new seed);
* per-step: median over 5 further calls (2 for the slow Python loops of Pyro and NumPyro
  with its progress bar) of wall time / steps (a call's fixed work included);
* marginal per step (``--marginal``): the cost of one more step, ``(median wall(5 S) -
  median wall(S)) / 4 S`` over 5 interleaved pairs of calls, which leaves out what a call
  pays once (argument checks, set-up, the result); not for the Python loops, where it is
  the per-step figure.

Tools are interleaved within each repeat; the table gives medians over repeats and ratios to
the hand-written loop (per-step) and to NumPyro's SVI.run (first call).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROBLEMS = {"mf25": ("meanfield", 25), "fr100": ("fullrank", 100)}
TOOLS = ["hand", "veil", "veil_pcache", "numpyro", "numpyro_bar", "blackjax", "pyro"]
LR = 1e-2
N_OBS = 1000


def data(d):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_OBS, d)).astype(np.float32)
    w = rng.normal(size=d).astype(np.float32) * 0.5
    y = (rng.uniform(size=N_OBS) < 1 / (1 + np.exp(-x @ w))).astype(np.float32)
    return x, y


# --------------------------------------------------------------------------- JAX tools
def jax_setup(family, d):
    import jax
    import jax.numpy as jnp

    x, y = data(d)
    x, y = jnp.asarray(x), jnp.asarray(y)

    def log_p(z):
        logits = x @ z
        return jnp.sum(y * logits - jnp.logaddexp(0.0, logits)) - 0.5 * jnp.sum(z**2)

    return jax, jnp, x, y, log_p


def make_hand(family, d, steps):
    """The hand-written reference: one jitted lax.scan over all steps, nothing else."""
    jax, jnp, x, y, log_p = jax_setup(family, d)
    import optax

    opt = optax.adam(LR)
    if family == "meanfield":
        params = (jnp.zeros(d), jnp.full(d, jnp.log(0.1)))

        def sample_logq(p, key):
            loc, log_s = p
            eps = jax.random.normal(key, (d,))
            z = loc + jnp.exp(log_s) * eps
            return z, -0.5 * eps @ eps - jnp.sum(log_s)
    else:
        params = (jnp.zeros(d), jnp.full(d, jnp.log(0.1)), jnp.zeros((d, d)))

        def sample_logq(p, key):
            loc, log_s, m = p
            L = jnp.exp(log_s)[:, None] * (jnp.tril(m, -1) / jnp.sqrt(d) + jnp.eye(d))
            eps = jax.random.normal(key, (d,))
            return loc + L @ eps, -0.5 * eps @ eps - jnp.sum(log_s)

    def loss(p, key):
        z, lq = sample_logq(p, key)
        return lq - log_p(z)

    @jax.jit
    def run(key):
        def step(carry, k):
            p, s = carry
            v, g = jax.value_and_grad(loss)(p, k)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), v

        (p, _), losses = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, steps))
        return p, losses

    return lambda seed: jax.block_until_ready(run(jax.random.key(seed)))


def make_veil(family, d, steps):
    jax, jnp, x, y, log_p = jax_setup(family, d)
    import optax

    import veil

    target = veil.Target.from_logdensity(log_p, dim=d)
    q = veil.MeanField(d) if family == "meanfield" else veil.FullRank(d)
    opt = optax.adam(LR)
    obj = veil.ELBO(num_samples=1, estimator=veil.Reparam())

    def run(seed):
        res = veil.fit(target, q, key=jax.random.key(seed), objective=obj, optimizer=opt,
                       max_steps=steps, stop=None, progress=False)
        return jax.block_until_ready(res.q)

    return run


def make_numpyro(family, d, steps, progress_bar=False):
    jax, jnp, x, y, _ = jax_setup(family, d)
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

    def model(x, y):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
        numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)

    guide = AutoNormal(model) if family == "meanfield" else AutoMultivariateNormal(model)
    svi = SVI(model, guide, numpyro.optim.Adam(LR), Trace_ELBO())

    def run(seed):
        r = svi.run(jax.random.key(seed), steps, x, y, progress_bar=progress_bar)
        return jax.block_until_ready(r.params)

    return run


def make_blackjax(family, d, steps):
    jax, jnp, x, y, log_p = jax_setup(family, d)
    import blackjax
    import optax

    opt = optax.adam(LR)
    if family == "meanfield":
        algo = blackjax.meanfield_vi(log_p, opt, num_samples=1, stl_estimator=False)
    else:
        algo = blackjax.fullrank_vi(log_p, opt, num_samples=1, stl_estimator=False)

    @jax.jit
    def run(key):
        state = algo.init(jnp.zeros(d))

        def step(s, k):
            s, info = algo.step(k, s)
            return s, info.elbo

        return jax.lax.scan(step, state, jax.random.split(key, steps))

    return lambda seed: jax.block_until_ready(run(jax.random.key(seed)))


def make_pyro(family, d, steps):
    import pyro
    import pyro.distributions as pdist
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

    torch.set_num_threads(1)
    xn, yn = data(d)
    x, y = torch.tensor(xn), torch.tensor(yn)

    def model(x, y):
        w = pyro.sample("w", pdist.Normal(0.0, 1.0).expand([d]).to_event(1))
        pyro.sample("y", pdist.Bernoulli(logits=x @ w).to_event(1), obs=y)

    def run(seed):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = AutoNormal(model) if family == "meanfield" else AutoMultivariateNormal(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), Trace_ELBO())
        for _ in range(steps):
            svi.step(x, y)
        return guide

    return run


MAKERS = {
    "hand": make_hand,
    "veil": make_veil,
    "veil_pcache": make_veil,  # same, in a process whose persistent compilation cache is warm
    "numpyro": make_numpyro,
    "numpyro_bar": lambda f, d, s: make_numpyro(f, d, s, progress_bar=True),
    "blackjax": make_blackjax,
    "pyro": make_pyro,
}


def worker(tool, problem, steps, warm_calls, marginal=False):
    family, d = PROBLEMS[problem]
    run = MAKERS[tool](family, d, steps)
    t0 = time.perf_counter()
    run(0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(1)
    second = time.perf_counter() - t0
    warm = []
    for s in range(warm_calls):
        t0 = time.perf_counter()
        run(2 + s)
        warm.append(time.perf_counter() - t0)
    warm.sort()
    out = {}
    if marginal:  # after the calls above: the first and second calls keep their meaning
        longer = MAKERS[tool](family, d, 5 * steps)
        longer(100)
        short, long = [], []
        for s in range(5):
            t0 = time.perf_counter()
            run(200 + s)
            t1 = time.perf_counter()
            longer(300 + s)
            short.append(t1 - t0)
            long.append(time.perf_counter() - t1)
        out["marginal"] = (sorted(long)[2] - sorted(short)[2]) / (4 * steps)
    print(json.dumps({"first": first, "second": second, "per_step": warm[len(warm) // 2] / steps, **out}))


def versions():
    out = {}
    for name in ["jax", "numpyro", "optax", "equinox", "blackjax", "pyro", "torch", "veil"]:
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed: that tool is skipped
            out[name] = None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--worker", nargs=2, metavar=("TOOL", "PROBLEM"))
    ap.add_argument("--marginal", action="store_true", help="also measure the cost of one more step")
    args = ap.parse_args()
    if args.worker:
        tool, problem = args.worker
        slow = tool in ("pyro", "numpyro_bar")
        worker(tool, problem, args.steps, 2 if slow else 5, args.marginal and not slow)
        return
    import tempfile

    env = dict(os.environ, VEIL_COMPILATION_CACHE="0", PYTHONWARNINGS="ignore")
    cache_env = dict(env, VEIL_COMPILATION_CACHE=tempfile.mkdtemp(prefix="veil-bench-cache-"))
    tools, problems = args.tools.split(","), args.problems.split(",")
    if "veil_pcache" in tools:  # prime the persistent cache once per problem
        for p in problems:
            subprocess.run([sys.executable, "-m", __spec__.name, "--steps", str(args.steps), "--worker", "veil", p],
                           capture_output=True, env=cache_env, check=True)
    results = {(t, p): [] for t in tools for p in problems}
    for rep in range(args.reps):
        for p in problems:
            for t in tools:
                cmd = [sys.executable, "-m", __spec__.name, "--steps", str(args.steps), "--worker", t, p] + (
                    ["--marginal"] if args.marginal else [])
                r = subprocess.run(cmd, capture_output=True, text=True,
                                   env=cache_env if t == "veil_pcache" else env)
                if r.returncode:
                    print(f"# {t} {p} failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                results[(t, p)].append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(f"# rep {rep} {p} {t}: {results[(t, p)][-1]}", file=sys.stderr)

    import numpy as np

    print(f"versions: {json.dumps(versions())}")
    print(f"steps per call: {args.steps}; repeats: {args.reps} (medians shown)\n")
    print("| problem | tool | first call (s) | second call (s) | per step (us) | "
          "per step / hand | marginal per step (us) | marginal / hand | first / numpyro | second / first |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in problems:
        med = {t: {k: float(np.median([r.get(k, np.nan) for r in results[(t, p)]])) for k in
                   ("first", "second", "per_step", "marginal")} for t in tools if results[(t, p)]}
        for t, m in med.items():
            hand = med.get("hand", {}).get("per_step", np.nan)
            hand_marginal = med.get("hand", {}).get("marginal", np.nan)
            npy = med.get("numpyro", {}).get("first", np.nan)
            print(f"| {p} | {t} | {m['first']:.2f} | {m['second']:.3f} | {1e6 * m['per_step']:.1f} | "
                  f"{m['per_step'] / hand:.2f} | {1e6 * m['marginal']:.1f} | {m['marginal'] / hand_marginal:.2f} | "
                  f"{m['first'] / npy:.2f} | {m['second'] / m['first']:.2f} |")


if __name__ == "__main__":
    main()
