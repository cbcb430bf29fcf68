"""MixFlows against a Gaussian fit on Inference Gym targets.

    python -m benchmarks.studies.mixflow [--targets Banana,NealsFunnel] [--seeds 2] [--out mixflow.jsonl]
    python -m benchmarks.studies.mixflow --summarize mixflow.jsonl

Needs the bench extras (``pip install -e '.[bench]'``). Targets and accuracy measures are those
of ``time_to_accuracy.py`` (Inference Gym ground truth, constrained space), here from 4,000
draws per tool (MixFlow draws cost ``(N-1) L`` gradient evaluations each).

Tools, interleaved seed by seed:

* ``veil-fullrank``: ``veil.fit(target, FullRank(d))`` (ADVI);
* ``veil-mixflow``: ``veil.mixflow(target, key=...)`` with every default: a ``MeanField``
  reference fitted by ``veil.fit``, 100 maps of 50 leapfrog steps, step size chosen by the
  ELBO on the grid 0.002-0.1;
* ``veil-mixflow-fr``: the same over a ``FullRank`` reference fit.

Gradient evaluations count everything: the reference fit (steps x 4 draws), the step-size
search (grid x 32 trajectories x 2 (N-1) L) and the draws used for accuracy
(4,000 x (N-1) L). The MixFlow's ELBO is on the extended space (momentum and pseudo-time
included), a lower bound on the position-only ELBO, so it is not comparable to the Gaussian's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from benchmarks.common import accuracy, load_target

TARGETS = ["Banana", "NealsFunnel", "EightSchools", "GermanCreditNumericLogisticRegression",
           "BrownianMotionMissingMiddleObservations", "RadonContextualEffectsMinnesota"]
NUM_DRAWS = 4000


def run_tool(tool, target, seed):
    import jax
    import numpy as np

    import veil

    key = jax.random.key(seed)
    t0 = time.perf_counter()
    if tool == "veil-fullrank":
        res = veil.fit(target, veil.FullRank(target.dim), key=key, progress=False)
        z, log_q = jax.jit(lambda k: res.q.sample_and_log_prob(k, NUM_DRAWS))(jax.random.key(10_000 + seed))
        jax.block_until_ready(z)
        wall = time.perf_counter() - t0
        lw = np.asarray(jax.vmap(target.log_density)(z) - log_q, np.float64)
        return wall, z, {"khat": res.khat, "elbo": float(lw.mean()), "grad_evals": 4 * res.num_steps,
                         "steps": res.num_steps}
    family = veil.MeanField if tool == "veil-mixflow" else veil.FullRank
    ref = veil.fit(target, family(target.dim), key=jax.random.fold_in(key, 1), progress=False)
    res = veil.mixflow(target, ref, key=key)
    z = jax.jit(lambda k: res.q.sample(k, NUM_DRAWS))(jax.random.key(10_000 + seed))
    jax.block_until_ready(z)
    wall = time.perf_counter() - t0
    q = res.q
    per_map = q.num_leapfrog * (q.num_maps - 1)
    grads = 4 * ref.num_steps + len(res.step_sizes) * 32 * 2 * per_map + NUM_DRAWS * per_map
    return wall, z, {"khat": res.khat, "elbo": res.elbo, "elbo_se": res.elbo_se, "grad_evals": grads,
                     "step_size": res.step_size, "roundtrip": res.roundtrip_error,
                     "grid_elbos": [float(e) for e in res.elbos], "ref_steps": ref.num_steps}


def main(args):
    import veil

    tools = args.tools.split(",")
    for name in args.targets.split(","):
        log_p, to_gt, d, gt_mean, gt_sd = load_target(name)
        target = veil.Target.from_logdensity(log_p, dim=d)
        for seed in range(args.seeds):
            for tool in tools:
                wall, z, extra = run_tool(tool, target, seed)
                row = {"target": name, "dim": d, "tool": tool, "seed": seed, "wall": wall, **extra,
                       **accuracy(z, to_gt, gt_mean, gt_sd)}
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


def summarize(path):
    import numpy as np

    rows = [json.loads(line) for line in open(path)]
    print("| target (dim) | tool | max err/sd | sd ratio [min, med, max] | ELBO | k-hat | step | "
          "round trip | grad evals | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["target"] for r in rows):
        for tool in dict.fromkeys(r["tool"] for r in rows):
            rs = [r for r in rows if r["target"] == name and r["tool"] == tool]
            if not rs:
                continue
            med = lambda f: float(np.median([r[f] for r in rs]))  # noqa: E731
            step = f"{med('step_size'):.3g}" if "step_size" in rs[0] else ""
            rt = f"{med('roundtrip'):.1g}" if "roundtrip" in rs[0] else ""
            print(f"| {name} ({rs[0]['dim']}) | {tool} | {med('max_err'):.3f} | [{med('sd_ratio_min'):.2f}, "
                  f"{med('sd_ratio_median'):.2f}, {med('sd_ratio_max'):.2f}] | {med('elbo'):.2f} | "
                  f"{med('khat'):.2f} | {step} | {rt} | {med('grad_evals'):.3g} | {med('wall'):.1f} |")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    if len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
    else:
        ap = argparse.ArgumentParser()
        ap.add_argument("--targets", default=",".join(TARGETS))
        ap.add_argument("--tools", default="veil-fullrank,veil-mixflow,veil-mixflow-fr")
        ap.add_argument("--seeds", type=int, default=2)
        ap.add_argument("--out", default="mixflow.jsonl")
        main(ap.parse_args())
