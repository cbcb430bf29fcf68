"""Normalizing flows: veil's flow families against a Gaussian and NumPyro's flow guides.

    python -m benchmarks.peers.flows [--targets Banana,NealsFunnel] [--seeds 3] [--out flows.jsonl]
    python -m benchmarks.peers.flows --summarize flows.jsonl
    python -m benchmarks.peers.flows --settings      # the 2-d banana runs behind fit's flow defaults

Needs the bench extras (``pip install -e '.[bench]'``). Targets and accuracy measures are
those of ``time_to_accuracy.py`` (Inference Gym ground truth, constrained space).

Tools, interleaved seed by seed, each with every default:

* ``veil-fullrank``: ``veil.fit(target, FullRank(d))``;
* ``veil-coupling``: ``veil.flows.coupling(d, key=...)`` (8 affine coupling layers, width 50;
  ``fit`` first fits its ``MeanField`` base alone, and the counts include that stage);
* ``veil-coupling-fitted``: the same coupling flow over a default ``FullRank`` fit as its base
  (the fit's gradient evaluations and time are included);
* ``veil-iaf``: ``veil.flows.autoregressive(d, key=...)`` (8 affine IAF layers, width 50);
* ``veil-spline``: ``veil.flows.coupling(d, key=..., transformer="spline")``;
* ``veil-semi-implicit``: ``veil.SemiImplicit(d, key=...)`` (MLP 2 x 50 on d-dim mixing noise,
  K = 50 inner draws; its ELBO and k-hat use the SIVI estimate ``log q_K``, so the ELBO column
  is a lower bound for it);
* ``veil-iaf-chi2`` / ``veil-iaf-iwae``: the IAF flow fitted to ``ChiSquare(k=16)`` /
  ``IWAE(k=16)`` (mass-covering objectives, DReG gradients) instead of the ELBO;
* ``numpyro-iaf``: ``AutoIAFNormal`` (its defaults: 3 flows, hidden dims [d, d]) and
  ``numpyro-bnaf``: ``AutoBNAFNormal`` (1 flow, hidden factors [8, 8]); ``Trace_ELBO`` (1 draw),
  ``Adam(1e-3)``, 10,000 steps (no tuning of ours; NumPyro's flow examples use small steps).

veil's flows start from the default ``MeanField`` base; gradient evaluations are steps x draws.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings

from benchmarks.common import accuracy, elbo, load_target

TARGETS = ["Banana", "NealsFunnel"]
NUM_DRAWS = 20_000
NUMPYRO_STEPS = 10_000


def _veil_tool(kind, target, d):
    import jax

    import veil

    def run(seed):
        key = jax.random.key(seed)
        extra_grads = 0
        if kind == "fullrank":
            q = veil.FullRank(d)
        elif kind == "coupling-fitted":
            # A coupling flow over a fitted FullRank (the base the family docs recommend);
            # the Gaussian fit's cost is counted in.
            t0 = time.perf_counter()
            gauss = veil.fit(target, veil.FullRank(d), key=jax.random.fold_in(key, 2), progress=False)
            extra_grads, extra_wall = 4 * gauss.num_steps, time.perf_counter() - t0
            q = veil.flows.coupling(d, key=jax.random.fold_in(key, 1), base=gauss.q)
        elif kind == "coupling":
            q = veil.flows.coupling(d, key=jax.random.fold_in(key, 1))
        elif kind == "iaf":
            q = veil.flows.autoregressive(d, key=jax.random.fold_in(key, 1))
        elif kind == "semi-implicit":
            q = veil.SemiImplicit(d, key=jax.random.fold_in(key, 1))
        elif kind in ("iaf-chi2", "iaf-iwae"):
            q = veil.flows.autoregressive(d, key=jax.random.fold_in(key, 1))
        else:
            q = veil.flows.coupling(d, key=jax.random.fold_in(key, 1), transformer="spline")
        t0 = time.perf_counter()
        # Mass-covering objectives (16 draws each, DReG gradients) for the sd-ratio goal.
        objective = {"iaf-chi2": veil.ChiSquare(k=16), "iaf-iwae": veil.IWAE(k=16)}.get(kind)
        res = veil.fit(target, q, key=key, progress=False, objective=objective)
        jax.block_until_ready(res.q)
        wall = time.perf_counter() - t0 + (extra_wall if extra_grads else 0.0)
        z, log_q = jax.jit(lambda k: res.q.sample_and_log_prob(k, NUM_DRAWS))(jax.random.key(10_000 + seed))
        draws = 4 if kind == "fullrank" else 16 if objective is not None else 8
        grads = res.num_steps * draws + extra_grads
        if res.base_result is not None:  # the Gaussian stage of a flow without a base
            grads += 4 * res.base_result.num_steps
        return wall, z, log_q, res.khat, grads, {"stop": res.stop_reason, "steps": res.num_steps}

    return run


def _numpyro_tool(kind, log_p, d):
    import jax
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoBNAFNormal, AutoIAFNormal

    def model():
        z = numpyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), event_shape=(d,)))
        numpyro.factor("log_p", log_p(z))

    guide = AutoIAFNormal(model) if kind == "iaf" else AutoBNAFNormal(model)
    svi = SVI(model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO())

    def run(seed):
        from veil import psis_khat

        t0 = time.perf_counter()
        r = svi.run(jax.random.key(seed), NUMPYRO_STEPS, progress_bar=False)
        jax.block_until_ready(r.params)
        wall = time.perf_counter() - t0
        post = guide.get_posterior(r.params)
        # BNAF has no inverse: the density of a draw comes from its forward intermediates.
        z, inter = post.sample_with_intermediates(jax.random.key(10_000 + seed), (NUM_DRAWS,))
        log_q = post.log_prob(z, inter)
        lw = jax.vmap(log_p)(z[:2000]) - log_q[:2000]
        try:
            khat = psis_khat(lw)
        except ValueError:
            khat = float("nan")
        return wall, z, log_q, khat, NUMPYRO_STEPS, {}

    return run


def main(args):
    import veil

    for name in args.targets.split(","):
        log_p, to_gt, d, gt_mean, gt_sd = load_target(name)
        target = veil.Target.from_logdensity(log_p, dim=d)
        kinds = ("fullrank", "coupling", "coupling-fitted", "iaf", "spline", "semi-implicit", "iaf-chi2", "iaf-iwae")
        tools = {f"veil-{k}": _veil_tool(k, target, d) for k in kinds if args.tools is None or f"veil-{k}" in args.tools}
        tools.update({f"numpyro-{k}": _numpyro_tool(k, log_p, d) for k in ("iaf", "bnaf")
                      if args.tools is None or f"numpyro-{k}" in args.tools})
        for seed in range(args.seeds):
            for tool, run in tools.items():
                wall, z, log_q, khat, grads, extra = run(seed)
                row = {"target": name, "dim": d, "tool": tool, "seed": seed, "wall": wall, "khat": khat,
                       "grad_evals": grads, "elbo": elbo(log_p, z, log_q), **extra,
                       **accuracy(z, to_gt, gt_mean, gt_sd)}
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


def summarize(path):
    import numpy as np

    rows = [json.loads(line) for line in open(path)]
    order = ["veil-fullrank", "veil-coupling", "veil-coupling-rawbase", "veil-coupling-fitted", "veil-iaf",
             "veil-iaf-rawbase", "veil-spline", "veil-spline-rawbase", "veil-semi-implicit", "veil-iaf-chi2", "veil-iaf-iwae",
             "numpyro-iaf", "numpyro-bnaf"]
    print("| target (dim) | tool | max err/sd | sd ratio [min, med, max] | ELBO | k-hat | grad evals | wall warm (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["target"] for r in rows):
        for tool in order:
            rs = sorted([r for r in rows if r["target"] == name and r["tool"] == tool], key=lambda r: r["seed"])
            if not rs:
                continue
            med = lambda f: float(np.median([r[f] for r in rs]))  # noqa: E731
            warm = float(np.median([r["wall"] for r in rs[1:]] or [rs[0]["wall"]]))
            print(f"| {name} ({rs[0]['dim']}) | {tool} | {med('max_err'):.3f} | [{med('sd_ratio_min'):.2f}, "
                  f"{med('sd_ratio_median'):.2f}, {med('sd_ratio_max'):.2f}] | {med('elbo'):.3f} | "
                  f"{med('khat'):.2f} | {med('grad_evals'):.0f} | {warm:.2f} |")


def settings():
    """The runs behind ``fit``'s flow defaults, on a normalised 2-d banana (log Z = 0:
    x1 ~ N(0, 10^2), x2 | x1 ~ N(0.03 (x1^2 - 100), 1)), seed 1, coupling and IAF flows
    (4 layers, width 32)."""
    import jax
    import optax

    import veil

    def banana(z):
        return (-0.5 * (z[0] / 10.0) ** 2 - 0.5 * (z[1] - 0.03 * (z[0] ** 2 - 100.0)) ** 2
                - math.log(10.0) - math.log(2 * math.pi))

    target = veil.Target.from_logdensity(banana, dim=2)
    configs = [
        ("STL, 4 draws, Adam 0.05, window 200", veil.ELBO(), 0.05, veil.StopRule()),
        ("Reparam, 4 draws, Adam 0.05, window 200", veil.ELBO(estimator=veil.Reparam()), 0.05, veil.StopRule()),
        ("Reparam, 4 draws, Adam 0.02, window 200", veil.ELBO(estimator=veil.Reparam()), 0.02, veil.StopRule()),
        ("Reparam, 8 draws, Adam 0.01, window 1000 (default)", veil.ELBO(num_samples=8, estimator=veil.Reparam()), 0.01,
         veil.StopRule(min_window=1000)),
    ]
    print("| settings | flow | steps | stop | KL = -ELBO |")
    print("|---|---|---|---|---|")
    for label, objective, step, rule in configs:
        opt = optax.adam(step)
        for kind, make in (("coupling", veil.flows.coupling), ("iaf", veil.flows.autoregressive)):
            # An explicit base: these runs are of the flow stage alone (no Gaussian stage).
            q = make(2, key=jax.random.key(0), layers=4, width=32, base=veil.MeanField(2))
            res = veil.fit(target, q, key=jax.random.key(1), progress=False, objective=objective,
                           optimizer=opt, stop=rule, max_steps=20_000)
            print(f"| {label} | {kind} | {res.num_steps} | {res.stop_reason.split(':')[0]} | {-res.elbo:.3f} |", flush=True)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    if len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] == "--settings":
        settings()
    else:
        ap = argparse.ArgumentParser()
        ap.add_argument("--targets", default=",".join(TARGETS))
        ap.add_argument("--seeds", type=int, default=3)
        ap.add_argument("--out", default="flows.jsonl")
        ap.add_argument("--tools", default=None, help="comma-separated subset, e.g. veil-coupling-fitted")
        a = ap.parse_args()
        a.tools = None if a.tools is None else a.tools.split(",")
        main(a)
