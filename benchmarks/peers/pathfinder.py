"""Pathfinder against ADVI (veil's FullRank fit) and BlackJAX's Pathfinder on Inference Gym.

    python -m benchmarks.peers.pathfinder [--targets A,B] [--seeds 3] [--out pathfinder.jsonl]
    python -m benchmarks.peers.pathfinder --summarize pathfinder.jsonl

Needs the bench extras (``pip install -e '.[bench]'``: BlackJAX, inference-gym, tfp-nightly)
and the offline data shim (see ``time_to_accuracy.py``, whose targets and accuracy measures
this script reuses).

Per target and seed, interleaved in one process:

* ``veil-pf4``: ``veil.pathfinder(target, key=...)`` with every default (4 paths, history 6,
  25 ELBO draws, Stan's uniform(-2, 2) starts). Accuracy of the best path's Gaussian ``q``
  (20,000 draws) and of 4,000 draws importance-resampled from the paths' mixture.
* ``veil-pf1`` and ``blackjax-pf1``: one path from the same start, same history (6) and ELBO
  draws (25): the best Gaussian of each. Iteration caps: veil 1000 (Stan's), BlackJAX 200
  (see ``BLACKJAX_MAXITER``).
  BlackJAX's ``approximate`` is wrapped in ``jax.jit`` once per target, as a user would.
* ``veil-fit``: default ``veil.fit`` with ``FullRank`` (the ADVI baseline; 4 STL draws/step).
* ``veil-newton``: ``veil.variational_newton`` started from ``veil-pf4``'s Pathfinder (the same
  call, so its gradients are counted in): Newton steps on the ELBO for a full-rank Gaussian,
  ``2 dim`` gradients each. Its ELBO and k-hat are from 20,000 draws of the result (not
  counted: they score it, the method does not need them).

``--tools`` runs a subset (BlackJAX is then imported only if ``blackjax-pf1`` is in it).

Gradient evaluations: Pathfinder's count the start plus every line-search trial (the count the
paper uses; BlackJAX reports its L-BFGS iterations and line-search steps, from which the same
count is formed); the density-only evaluations of the ELBO estimates (and, for ``veil-pf4``,
of the resampling) are listed separately. ADVI's are steps x draws.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from benchmarks.common import TARGETS, accuracy, elbo, load_target

TOOLS = ["veil-pf4", "veil-pf1", "blackjax-pf1", "veil-fit", "veil-newton"]

NUM_DRAWS = 20_000
BLACKJAX_MAXITER = 200
RESAMPLED = 4_000


def run_target(name, seeds, out, tools=TOOLS):
    import jax
    import numpy as np

    import veil

    log_p, to_gt, d, gt_mean, gt_sd = load_target(name)
    target = veil.Target.from_logdensity(log_p, dim=d)

    def emit(row):
        row = {"target": name, "dim": d, **row}
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")

    def q_accuracy(z):
        return accuracy(z, to_gt, gt_mean, gt_sd)

    # Jitted once per target, as a BlackJAX user would (its ``approximate`` is not jitted).
    # maxiter=200, not Stan's 1000: with 1000, BlackJAX 1.7.1 on jax 0.10.2 (CPU) hung (0% CPU,
    # no return after minutes) on SyntheticItemResponseTheory and once on radon; it stores
    # and scores the whole path, so its cost grows with maxiter, not with the iterations run.
    if "blackjax-pf1" in tools:
        import blackjax

        bj_approximate = jax.jit(
            lambda key, x0: blackjax.vi.pathfinder.approximate(key, log_p, x0, num_samples=25, maxiter=BLACKJAX_MAXITER, maxcor=6)
        )

    for seed in range(seeds):
        key = jax.random.key(seed)
        x0 = jax.random.uniform(jax.random.fold_in(key, 7), (d,), minval=-2.0, maxval=2.0)

        t0 = time.perf_counter()
        pf = veil.pathfinder(target, key=key)
        pf_wall = wall = time.perf_counter() - t0
        z = pf.q.sample(jax.random.key(10_000 + seed), NUM_DRAWS)
        rs = pf.draws(RESAMPLED, key=jax.random.key(20_000 + seed))["z"]
        if "veil-pf4" in tools:
            emit({"tool": "veil-pf4", "seed": seed, "wall": wall, "grad_evals": pf.num_grad_evals,
                  "logp_evals": pf.num_logp_evals + RESAMPLED, "khat": pf.khat, "elbo": pf.elbo,
                  **q_accuracy(z), **{f"rs_{k}": v for k, v in q_accuracy(rs).items()}})

        if "veil-newton" in tools:
            t0 = time.perf_counter()
            nt = veil.variational_newton(target, key=key, init=pf)
            jax.block_until_ready(nt.q)
            wall = pf_wall + time.perf_counter() - t0
            z, log_q = nt.q.sample_and_log_prob(jax.random.key(10_000 + seed), NUM_DRAWS)
            lw = np.asarray(jax.vmap(log_p)(z), np.float64) - np.asarray(log_q, np.float64)
            emit({"tool": "veil-newton", "seed": seed, "wall": wall, "grad_evals": nt.num_grad_evals,
                  "logp_evals": pf.num_logp_evals, "khat": veil.psis_khat(lw) if np.isfinite(lw).all() else float("nan"),
                  "elbo": elbo(log_p, z, log_q), "iters": nt.num_iters, "converged": nt.converged,
                  "halvings": nt.num_halvings, "skipped": nt.num_skipped, **q_accuracy(z)})

        if "veil-pf1" in tools:
            _pf1(veil, target, key, x0, seed, emit, q_accuracy)
        if "blackjax-pf1" in tools:
            _bj(veil, bj_approximate, log_p, key, x0, seed, emit, q_accuracy)
        if "veil-fit" not in tools:
            continue
        t0 = time.perf_counter()
        res = veil.fit(target, veil.FullRank(d), key=key, progress=False)
        jax.block_until_ready(res.q)
        wall = time.perf_counter() - t0
        z = res.q.sample(jax.random.key(10_000 + seed), NUM_DRAWS)
        emit({"tool": "veil-fit", "seed": seed, "wall": wall, "grad_evals": 4 * res.num_steps,
              "logp_evals": 0, "khat": res.khat, "elbo": res.elbo, **q_accuracy(z)})


def _pf1(veil, target, key, x0, seed, emit, q_accuracy):
    import jax

    t0 = time.perf_counter()
    pf1 = veil.pathfinder(target, key=key, num_paths=1, init=x0)
    wall = time.perf_counter() - t0
    z = pf1.q.sample(jax.random.key(10_000 + seed), NUM_DRAWS)
    emit({"tool": "veil-pf1", "seed": seed, "wall": wall, "grad_evals": pf1.num_grad_evals,
          "logp_evals": pf1.num_logp_evals, "khat": pf1.khat, "elbo": pf1.elbo, **q_accuracy(z)})


def _bj(veil, bj_approximate, log_p, key, x0, seed, emit, q_accuracy):
    import blackjax
    import jax
    import numpy as np

    t0 = time.perf_counter()
    state, info = bj_approximate(key, x0)
    jax.block_until_ready(state)
    wall = time.perf_counter() - t0
    z, log_q = blackjax.vi.pathfinder.sample(jax.random.key(10_000 + seed), state, NUM_DRAWS)
    lw = np.asarray(jax.vmap(log_p)(z[:2000]) - log_q[:2000], np.float64)
    iters = int(np.sum(np.asarray(info.path.elbo) != -np.inf)) if hasattr(info, "path") else -1
    emit({"tool": "blackjax-pf1", "seed": seed, "wall": wall, "grad_evals": _blackjax_grad_evals(info),
          "logp_evals": 25 * max(iters, 0), "khat": veil.psis_khat(lw) if np.isfinite(lw).all() else float("nan"),
          "elbo": float(state.elbo), **q_accuracy(z)})


def init_experiment(names, seeds):
    """Does starting ``veil.fit`` from Pathfinder's Gaussian save steps? Default fit from the
    default start vs from ``pf.init(FullRank(d))`` with default settings, and with the step
    already decayed (Adam 0.0125, no further decays)."""
    import jax
    import optax

    import veil

    small_step, no_decay = optax.adam(0.0125), veil.StopRule(min_decays=0, max_decays=0)
    for name in names:
        log_p, to_gt, d, gt_mean, gt_sd = load_target(name)
        target = veil.Target.from_logdensity(log_p, dim=d)
        for seed in range(seeds):
            key = jax.random.key(seed)
            pf = veil.pathfinder(target, key=key)
            for label, q, kw in [
                ("default start", veil.FullRank(d), {}),
                ("pathfinder start", pf.init(veil.FullRank(d)), {}),
                ("pathfinder start, small step", pf.init(veil.FullRank(d)), {"optimizer": small_step, "stop": no_decay}),
            ]:
                res = veil.fit(target, q, key=key, progress=False, **kw)
                acc = accuracy(res.q.sample(jax.random.key(5), NUM_DRAWS), to_gt, gt_mean, gt_sd)
                print(f"{name} seed {seed} {label}: {res.num_steps} steps, max err/sd "
                      f"{acc['max_err']:.3f}, ELBO {res.elbo:.2f}", flush=True)


def _blackjax_grad_evals(info) -> int:
    """Start + line-search evaluations of BlackJAX's L-BFGS, from its reported path."""
    import numpy as np

    path = getattr(info, "path", None)
    if path is None:
        return -1
    # BlackJAX records one state per L-BFGS iteration (finite ELBO where it ran); its
    # line search evaluations are not reported, so count one per iteration (a lower bound).
    return 1 + int(np.sum(np.isfinite(np.asarray(path.elbo))))


def summarize(path):
    import numpy as np

    rows = [json.loads(line) for line in open(path)]
    tools = TOOLS
    print("| target (dim) | tool | max err/sd | median err/sd | sd ratio [min, med, max] | "
          "resampled max err/sd, sd ratio [min, med] | ELBO | k-hat | grad evals | density evals | "
          "ADVI grad evals / these | wall warm (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    names = [t for t in TARGETS if any(r["target"] == t for r in rows)]
    names += sorted({r["target"] for r in rows} - set(names))  # targets outside the default list
    for name in names:
        fit_grads = np.median([r["grad_evals"] for r in rows if r["target"] == name and r["tool"] == "veil-fit"])
        for tool in tools:
            rs = sorted([r for r in rows if r["target"] == name and r["tool"] == tool], key=lambda r: r["seed"])
            if not rs:
                continue
            med = lambda f: float(np.median([r[f] for r in rs]))  # noqa: E731
            warm = float(np.median([r["wall"] for r in rs[1:]] or [rs[0]["wall"]]))
            resampled = (f"{med('rs_max_err'):.3f}, [{med('rs_sd_ratio_min'):.2f}, {med('rs_sd_ratio_median'):.2f}]"
                         if "rs_max_err" in rs[0] else "")
            print(f"| {name} ({rs[0]['dim']}) | {tool} | {med('max_err'):.3f} | {med('median_err'):.3f} | "
                  f"[{med('sd_ratio_min'):.2f}, {med('sd_ratio_median'):.2f}, {med('sd_ratio_max'):.2f}] | "
                  f"{resampled} | {med('elbo'):.2f} | {med('khat'):.2f} | {med('grad_evals'):.0f} | "
                  f"{med('logp_evals'):.0f} | {fit_grads / med('grad_evals'):.0f}x | {warm:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="pathfinder.jsonl")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    ap.add_argument("--init-experiment", action="store_true", help="fit from Pathfinder's start")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.init_experiment:
        return init_experiment(args.targets.split(","), args.seeds)
    for name in args.targets.split(","):
        run_target(name, args.seeds, args.out, args.tools.split(","))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
    else:
        main()
