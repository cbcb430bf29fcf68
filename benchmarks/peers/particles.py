"""Particle methods: veil (SVGD, Coin SVGD, SVNG, Mirrored SVGD, SVMD) against BlackJAX SVGD
and NumPyro SteinVI.

    python -m benchmarks.peers.particles [--targets gauss50,german,mixture2d,dirichlet]
                                   [--particles 50,200,1000] [--tools veil-svgd,...] [--out results.jsonl]

Needs ``blackjax`` (``pip install -e '.[bench]'``); German credit also ``inference-gym`` and
the offline data shim in ``../shared/bench`` (``VEIL_SHARED`` to point elsewhere).

Every tool runs the same algorithm where it can: SVGD with the RBF kernel and the median
heuristic re-chosen every step, AdaGrad steps, from the same standard-normal start (NumPyro's
SteinVI starts its particles from its own Uniform(-2, 2) init and chooses its bandwidth with
its own ``RBFKernel`` rule). Tools:

* ``veil-svgd``: ``veil.particles.run(target, SVGD(step_size=s), stop=None, max_steps=S)``;
* ``veil-coin``: the same with ``CoinSVGD()`` (no step size);
* ``veil-coin-auto``: ``CoinSVGD()`` with the default stopping rule (it decides ``S``);
* ``veil-svng``: ``SVNG(metric, optimizer=optax.sgd(s))`` with the Laplace precision as a
  constant metric (see :class:`Veil`);
* ``veil-msvgd``, ``veil-svmd`` (Dirichlet only): ``MirroredSVGD(Simplex(), step_size=s)``
  (AdaGrad) and ``SVMD(Simplex(), step_size=s)`` (plain steps) on the simplex itself;
* ``veil-svgd-step``, ``veil-coin-step``: the same methods through their ``init``/``step``
  API in a jitted ``fori_loop`` of the caller's, as BlackJAX is run (no driver, checks of the
  start's gradient, trace, stopping rule or result);
* ``blackjax``: ``blackjax.svgd`` with ``optax.adagrad(s)`` and ``update_median_heuristic``
  after every step (as its documentation does), the steps in one jitted ``fori_loop``;
* ``numpyro``: ``SteinVI(model, AutoDelta(model), Adagrad(s), RBFKernel())``, ``run(key, S,
  progress_bar=False)``.

Accuracy: for the Gaussian and German credit, the largest over coordinates of
``max(|mean error| / sd, |sd ratio - 1|)`` against the truth (German credit: Inference Gym's
ground truth; Dirichlet: its exact moments, over all five components); for the 2-d mixture, the energy distance to
20,000 exact draws. Each
``(tool, step size, S)`` is called once to compile, then timed (``--repeats R``: the median of R calls);
``S`` runs over 100, 300, 1000, 3000 and stops growing once a call takes over 60 s.
Step sizes are tuned at the first particle count given (200 by default; 0.01 to 1); the
best per tool is then used at the other counts. Time to accuracy: the least wall time at which a run's error is within
10% (plus 0.01) of the best error any SVGD run reached at that particle count (all tools share
the SVGD fixed point, so this measures the time to get there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

STEPS = (100, 300, 1000, 3000)
STEP_SIZES = (0.01, 0.03, 0.1, 0.3, 1.0)
CAP_SECONDS = 60.0


# ----------------------------------------------------------------------------- targets
def gauss50():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    d = 50
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    sd = np.exp(rng.uniform(np.log(0.3), np.log(3.0), d))
    cov = (q * sd**2) @ q.T
    mu = rng.normal(size=d)
    prec = jnp.asarray(np.linalg.inv(cov), jnp.float32)
    mu_j = jnp.asarray(mu, jnp.float32)

    def log_p(z):
        r = z - mu_j
        return -0.5 * r @ prec @ r

    return {"log_p": log_p, "dim": d, "mean": mu, "sd": np.sqrt(np.diag(cov)), "transform": None}


def german():
    from benchmarks.common import load_target

    log_p, to_gt, d, gt_mean, gt_sd = load_target("GermanCreditNumericLogisticRegression")
    return {"log_p": log_p, "dim": d, "mean": np.asarray(gt_mean), "sd": np.asarray(gt_sd), "transform": to_gt}


MIX_LOC = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
MIX_W = np.array([0.5, 0.3, 0.2])


def mixture2d():
    import jax
    import jax.numpy as jnp

    locs, logw = jnp.asarray(MIX_LOC, jnp.float32), jnp.log(jnp.asarray(MIX_W, jnp.float32))

    def log_p(z):
        return jax.nn.logsumexp(logw - 0.5 * jnp.sum((z - locs) ** 2, axis=1) / 0.6**2)

    rng = np.random.default_rng(1)
    comp = rng.choice(3, size=20_000, p=MIX_W)
    exact = MIX_LOC[comp] + 0.6 * rng.normal(size=(20_000, 2))
    return {"log_p": log_p, "dim": 2, "exact": exact, "transform": None}


DIRICHLET_ALPHA = np.array([2.0, 3.0, 5.0, 0.7, 1.5])


def dirichlet():
    """Dirichlet(2, 3, 5, 0.7, 1.5): 4 free coordinates. The peers and ``veil-svgd`` see it in
    the additive log-ratio coordinates ``eta_k = log(theta_k / theta_5)`` (with the change of
    variables' log determinant): the mirrored methods' dual space for the entropic map,
    so every tool moves particles in the same space from the same start; the mirrored
    methods put their kernel on ``theta`` and, for SVMD, their steps in its geometry."""
    import jax.numpy as jnp

    import veil

    simplex = veil.particles.mirror.Simplex()
    alpha = jnp.asarray(DIRICHLET_ALPHA, jnp.float32)

    def log_theta(t):
        full = jnp.concatenate([t, 1.0 - jnp.sum(t, keepdims=True)])
        return jnp.sum((alpha - 1.0) * jnp.log(full))

    def log_p(eta):
        return log_theta(simplex.primal(eta)) + simplex.log_det_jacobian(eta)

    def full(eta):
        t = np.asarray(simplex.primal(jnp.asarray(eta)), np.float64)
        return np.concatenate([t, 1.0 - t.sum(1, keepdims=True)], 1)

    a0 = DIRICHLET_ALPHA.sum()
    mean = DIRICHLET_ALPHA / a0
    return {"log_p": log_p, "dim": len(DIRICHLET_ALPHA) - 1, "mean": mean, "sd": np.sqrt(mean * (1 - mean) / (a0 + 1)),
            "transform": full, "log_theta": log_theta}


TARGETS = {"gauss50": gauss50, "german": german, "mixture2d": mixture2d, "dirichlet": dirichlet}


def energy_distance(x, y, max_y=5000):
    y = y[:max_y]

    def mean_dist(a, b):
        return np.mean(np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0)))

    return float(2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y))


def error(spec, x):
    x = np.asarray(x, np.float64)
    if "exact" in spec:
        return energy_distance(x, spec["exact"])
    if spec["transform"] is not None:
        x = np.asarray(spec["transform"](x), np.float64)
    if not np.isfinite(x).all():
        return math.inf
    mean_err = np.abs(x.mean(0) - spec["mean"]) / spec["sd"]
    sd_err = np.abs(x.std(0) / spec["sd"] - 1.0)
    return float(np.maximum(mean_err, sd_err).max())


# ----------------------------------------------------------------------------- tools
class Veil:
    """veil's particle methods. ``svng`` uses a constant metric, the negative Hessian of
    ``log p`` at its mode (found by 20 Newton steps from the particles' mean), computed inside
    every timed call: the set-up is part of its time. The mirrored methods (``msvgd``,
    ``svmd``; Dirichlet only) run on ``theta`` and hand back their dual coordinates, which are
    the other tools' coordinates."""

    def __init__(self, spec, method):
        import jax
        import jax.numpy as jnp

        import veil

        self.veil, self.method_name = veil, method
        self.mirrored = method in ("msvgd", "svmd")
        if self.mirrored:
            self.target = veil.Target.from_logdensity(spec["log_theta"], dim=spec["dim"])
        else:
            self.target = veil.Target.from_logdensity(spec["log_p"], dim=spec["dim"])
        grad, hess = jax.grad(spec["log_p"]), jax.hessian(spec["log_p"])

        @jax.jit
        def laplace_precision(x0):
            def newton(_, z):
                return z - jnp.linalg.solve(hess(z), grad(z))

            mode = jax.lax.fori_loop(0, 20, newton, jnp.mean(x0, axis=0))
            return -hess(mode)

        self.laplace_precision = laplace_precision
        self.cache = {}

    def method(self, step, x0):
        p = self.veil.particles
        if self.method_name.startswith("coin"):
            return p.CoinSVGD()
        if self.method_name == "svng":
            prec = np.asarray(self.laplace_precision(x0), np.float64)
            return p.SVNG(0.5 * (prec + prec.T), optimizer=self._sgd(step))
        if self.mirrored:
            cls = p.MirroredSVGD if self.method_name == "msvgd" else p.SVMD
            return cls(self.veil.particles.mirror.Simplex(), step_size=step)
        return p.SVGD(step_size=step)

    def _sgd(self, step):
        import optax

        return self.cache.setdefault(step, optax.sgd(step))  # one object: the loop compiles once

    def __call__(self, x0, step, steps):
        import jax

        auto = self.method_name == "coin-auto"
        init = x0
        if self.mirrored:
            init = np.asarray(self.veil.particles.mirror.Simplex().primal(x0))
        res = self.veil.particles.run(
            self.target, self.method(step, x0), key=jax.random.key(0), n_particles=x0.shape[0], init=init,
            max_steps=20_000 if auto else steps, stop=self.veil.particles.runner._DEFAULT_STOP if auto else None,
            progress=False)
        out = res.coordinates if self.mirrored else res.particles
        return jax.block_until_ready(out), res.num_steps


class VeilStep(Veil):
    """veil's own step API run the way BlackJAX's is run here: ``state = method.init(key,
    target, n, init=x0)`` (host-side checks of the start), then ``method.step`` in the
    caller's jitted ``fori_loop``. No driver: no start-gradient check, no chunks, trace,
    stopping rule or result object, so it shows what those cost on a short run."""

    def __call__(self, x0, step, steps):
        import equinox as eqx
        import jax

        if ("step", step) not in self.cache:
            method = self.method(step, x0)
            static = []

            @jax.jit
            def loop(arrays, key, steps):
                def body(i, state):
                    return method.step(jax.random.fold_in(key, i), state)[0]

                state = eqx.combine(arrays, static[0])
                return jax.lax.fori_loop(0, steps, body, state).particles

            self.cache[("step", step)] = method, loop, static
        method, loop, static = self.cache[("step", step)]
        key = jax.random.key(0)
        arrays, rest = eqx.partition(method.init(key, self.target, x0.shape[0], init=x0), eqx.is_array)
        static[:] = [rest]  # the same target and method on every call: one compiled loop
        return jax.block_until_ready(loop(arrays, key, steps)), steps


class BlackJAX:
    def __init__(self, spec):
        import blackjax
        import jax
        import optax
        from blackjax.vi.svgd import rbf_kernel, update_median_heuristic

        self.cache = {}
        grad = jax.grad(spec["log_p"])

        def build(step):
            svgd = blackjax.svgd(grad, optax.adagrad(step), rbf_kernel, update_median_heuristic)

            @jax.jit
            def loop(x0, steps):
                state = update_median_heuristic(svgd.init(x0))

                def body(_, st):
                    return update_median_heuristic(svgd.step(st))

                return jax.lax.fori_loop(0, steps, body, state).particles

            return loop

        self.build = build

    def __call__(self, x0, step, steps):
        import jax

        if step not in self.cache:
            self.cache[step] = self.build(step)
        return jax.block_until_ready(self.cache[step](x0, steps)), steps


class NumPyro:
    def __init__(self, spec):
        import numpyro
        import numpyro.distributions as dist
        d, log_p = spec["dim"], spec["log_p"]

        # SteinVI draws from the model to set up, so the latent has a proper (wide) prior whose
        # density the factor takes back out: the model's density is log_p exactly.
        wide = dist.Normal(0.0, 10.0).expand([d]).to_event(1)

        def model():
            z = numpyro.sample("z", wide)
            numpyro.factor("log_p", log_p(z) - wide.log_prob(z))

        self.model, self.cache = model, {}

    def __call__(self, x0, step, steps):
        import jax
        import numpyro
        from numpyro.contrib.einstein import RBFKernel, SteinVI
        from numpyro.infer.autoguide import AutoDelta

        key = (step, x0.shape[0])
        if key not in self.cache:  # one SteinVI object per setting: its compiled step is reused
            self.cache[key] = SteinVI(self.model, AutoDelta(self.model), numpyro.optim.Adagrad(step),
                                      RBFKernel(), num_stein_particles=x0.shape[0], num_elbo_particles=1)
        res = self.cache[key].run(jax.random.key(0), steps, progress_bar=False)
        return jax.block_until_ready(res.params["z_auto_loc"]), steps


REPEATS = 1


def timed(tool, x0, step, steps):
    """The median wall time of ``REPEATS`` calls after a first (compiling) one."""
    tool(x0, step, steps)  # compile (and any per-call set-up)
    walls = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        x, done = tool(x0, step, steps)
        walls.append(time.perf_counter() - t0)
    return float(np.median(walls)), np.asarray(x), done


def sweep(name, tool, spec, x0, step, out, n, target):
    rows = []
    grid = (None,) if name == "veil-coin-auto" else STEPS
    for steps in grid:
        wall, x, done = timed(tool, x0, step, steps or 0)
        row = {"target": target, "tool": name, "n": n, "step_size": step, "steps": int(done),
               "grad_evals": int(done) * n, "wall": wall, "error": error(spec, x)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        out.write(json.dumps(row) + "\n")
        out.flush()
        if wall > CAP_SECONDS:
            break
    return rows


def main():
    global STEP_SIZES, STEPS, CAP_SECONDS, REPEATS
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="gauss50,german,mixture2d")
    ap.add_argument("--particles", default="200,50,1000", help="the first count is where step sizes are tuned")
    ap.add_argument("--tools", default="veil-svgd,veil-coin,veil-coin-auto,blackjax,numpyro")
    ap.add_argument("--out", default="particles.jsonl")
    ap.add_argument("--report", help="print the tables of an existing results file and exit")
    ap.add_argument("--step-sizes", help="comma-separated SVGD step sizes to try (default 0.01..1)")
    ap.add_argument("--steps", help="comma-separated step counts (default 100,300,1000,3000)")
    ap.add_argument("--cap", type=float, default=CAP_SECONDS, help="stop growing S past a call this long (s)")
    ap.add_argument("--repeats", type=int, default=REPEATS, help="timed calls per setting (their median is kept)")
    args = ap.parse_args()
    if args.report:
        return report_file(args.report, args.tools.split(",") if "--tools" in sys.argv else None)
    if args.step_sizes:
        STEP_SIZES = tuple(float(v) for v in args.step_sizes.split(","))
    if args.steps:
        STEPS = tuple(int(v) for v in args.steps.split(","))
    CAP_SECONDS, REPEATS = args.cap, args.repeats
    import jax

    import blackjax
    import numpyro

    import veil

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {jax.devices()[0].device_kind}; "
          f"jax {jax.__version__}, "
          f"veil {veil.__version__}, blackjax {blackjax.__version__}, numpyro {numpyro.__version__}")
    tools_wanted = args.tools.split(",")
    counts = [int(c) for c in args.particles.split(",")]
    with open(args.out, "a") as out:
        for target in args.targets.split(","):
            spec = TARGETS[target]()
            makers = {
                "veil-svgd": lambda: Veil(spec, "svgd"), "veil-coin": lambda: Veil(spec, "coin"),
                "veil-coin-auto": lambda: Veil(spec, "coin-auto"), "veil-svng": lambda: Veil(spec, "svng"),
                "veil-msvgd": lambda: Veil(spec, "msvgd"), "veil-svmd": lambda: Veil(spec, "svmd"),
                "veil-svgd-step": lambda: VeilStep(spec, "svgd"), "veil-coin-step": lambda: VeilStep(spec, "coin"),
                "blackjax": lambda: BlackJAX(spec), "numpyro": lambda: NumPyro(spec),
            }
            mirrored_only = {"veil-msvgd", "veil-svmd"}
            tools = {k: make() for k, make in makers.items() if k in tools_wanted
                     and (target == "dirichlet" or k not in mirrored_only)}
            best_step = {}
            for n in sorted(counts, key=lambda c: c != counts[0]):  # tune at the first count
                x0 = np.asarray(jax.random.normal(jax.random.key(42), (n, spec["dim"])), np.float32)
                rows = []
                for name, tool in tools.items():
                    if name.startswith("veil-coin"):
                        rows += sweep(name, tool, spec, x0, None, out, n, target)
                        continue
                    steps = STEP_SIZES if n == counts[0] or name not in best_step else (best_step[name],)
                    tried = []
                    for s in steps:
                        tried += sweep(name, tool, spec, x0, s, out, n, target)
                    if n == counts[0]:
                        finals = {}
                        for r in tried:
                            finals[r["step_size"]] = min(finals.get(r["step_size"], math.inf), r["error"])
                        best_step[name] = min(finals, key=finals.get)
                    rows += tried
                report(rows, target, n)


def report(rows, target, n):
    """Print the time-to-accuracy table of one target and particle count.

    A configuration (tool, step size) reaches the goal at the least ``S`` from which every
    longer run of it stays within the goal: a run that passes through the goal on its way
    elsewhere (NumPyro's bandwidth rule overshoots, then settles higher) has not reached it.
    The goal is 10% (plus 0.01) above the best *final* error of any configuration that ran the
    whole step grid: the accuracy SVGD settles at with that many particles.
    """
    configs = {}
    for r in rows:
        configs.setdefault((r["tool"], r["step_size"]), []).append(r)
    finals = {c: max(rs, key=lambda r: r["steps"]) for c, rs in configs.items()}
    # Only runs that went the whole grid (or decided their own length) set the goal: a peer cut
    # short by the time cap has no final error, only a transient one.
    longest = max((r["steps"] for c, r in finals.items() if c[0] != "veil-coin-auto"), default=0)
    settled = [r for c, r in finals.items() if c[0] == "veil-coin-auto" or r["steps"] == longest]
    best = min(r["error"] for r in settled)
    goal = 1.1 * best + 0.01
    print(f"\n## {target}, {n} particles: best final error {best:.3f}; time to error <= {goal:.3f} (and staying)")
    print("| tool | step size | time to accuracy (s) | steps | final error | steps run | min error seen |")
    print("|---|---|---|---|---|---|---|")
    for tool in dict.fromkeys(r["tool"] for r in rows):
        options = []
        for (t, step), rs in configs.items():
            if t != tool:
                continue
            rs = sorted(rs, key=lambda r: r["steps"])
            for i, r in enumerate(rs):
                if all(later["error"] <= goal for later in rs[i:]):
                    options.append(r)
                    break
        mine = [r for r in rows if r["tool"] == tool]
        final = min((finals[c] for c in configs if c[0] == tool), key=lambda r: r["error"])
        lowest = min(r["error"] for r in mine)
        if options:
            h = min(options, key=lambda r: r["wall"])
            print(f"| {tool} | {h['step_size']} | {h['wall']:.3f} | {h['steps']} | {final['error']:.3f} | "
                  f"{final['steps']} | {lowest:.3f} |")
        elif final["steps"] < longest and tool != "veil-coin-auto":
            print(f"| {tool} | - | not reached in {final['steps']} steps (time cap) | - | {final['error']:.3f} | "
                  f"{final['steps']} | {lowest:.3f} |")
        else:
            print(f"| {tool} | - | not reached | - | {final['error']:.3f} | {final['steps']} | {lowest:.3f} |")
    print(flush=True)


def report_file(path, tools=None):
    """The tables of a results file; with ``tools``, of those tools' rows only (the goal is
    then set by them: e.g. SVGD's own accuracy, without SVNG's better fixed point)."""
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    if tools:
        rows = [r for r in rows if r["tool"] in tools]
    for key in dict.fromkeys((r["target"], r["n"]) for r in rows):
        report([r for r in rows if (r["target"], r["n"]) == key], *key)


if __name__ == "__main__":
    main()
