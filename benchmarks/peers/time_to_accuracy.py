"""Time to accuracy: default ``veil.fit`` against NumPyro's Gaussian guides on Inference Gym.

    python -m benchmarks.peers.time_to_accuracy [--targets A,B] [--seeds 3] [--out results.jsonl]

Needs ``inference-gym`` and ``tfp-nightly`` (``pip install -e '.[bench]'``) and, for German
credit and radon, the offline data shim in ``../shared/bench`` (``VEIL_SHARED`` to point
elsewhere).

For each Inference Gym target the log density on unconstrained space is
``log p(b(z)) + log|det J_b(z)|`` with ``b`` the target's default event-space bijector; both
tools fit a Gaussian to that same function:

* veil: ``veil.fit(target, FullRank(d) or MeanField(d), key=...)`` with every default
  (ELBO with 4 STL draws, Adam 0.05, the stopping rule, iterate averaging);
* NumPyro: ``AutoMultivariateNormal`` / ``AutoNormal`` on a model holding the same density as
  a factor, ``Trace_ELBO`` (1 draw), ``Adam(1e-2)``, 10,000 steps, ``SVI.run`` without a
  progress bar.

Accuracy is measured in constrained space against the target's shipped ground truth, from
20,000 draws of the fitted Gaussian: max and median over coordinates of
``|mean error| / ground-truth sd``, and the range of ``sd / ground-truth sd``. k-hat is PSIS on
2,000 fresh draws; the ELBO (higher is better: closer to the best Gaussian in KL) is a plain
Monte-Carlo estimate from the same 20,000 draws. Gradient evaluations are steps x draws per step. Wall time is per call:
"first" is the first fit in the process (compilation included), "warm" the median of the
later seeds. Tools are interleaved seed by seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from benchmarks.common import NUM_DRAWS, TARGETS, accuracy, elbo, load_target  # noqa: F401 (re-exported)

NUMPYRO_STEPS = 10_000


class VeilTool:
    def __init__(self, family, log_p, d):
        import veil

        self.veil = veil
        self.family = family
        self.target = veil.Target.from_logdensity(log_p, dim=d)
        self.d = d

    def run(self, seed):
        import jax

        q = self.veil.FullRank(self.d) if self.family == "fullrank" else self.veil.MeanField(self.d)
        t0 = time.perf_counter()
        res = self.veil.fit(self.target, q, key=jax.random.key(seed), progress=False)
        jax.block_until_ready(res.q)
        wall = time.perf_counter() - t0
        z, log_q = res.q.sample_and_log_prob(jax.random.key(10_000 + seed), NUM_DRAWS)
        extra = {"stop": res.stop_reason, "steps": res.num_steps, "elbo": elbo(self.target.log_density, z, log_q)}
        return wall, z, res.khat, res.num_steps * 4, extra


class NumPyroTool:
    """NumPyro's guide under ``SVI.run``; with ``one_blas_thread`` the run holds BLAS to one
    thread, as ``veil.fit`` does during its loop (``veil/_blas.py``): the full-rank guide's
    triangular solves are LAPACK calls on the CPU, and this row says what NumPyro gains from
    the same setting."""

    def __init__(self, family, log_p, d, one_blas_thread=False):
        self.one_blas_thread = one_blas_thread
        import numpyro
        import numpyro.distributions as dist
        from numpyro.distributions import constraints
        from numpyro.infer import SVI, Trace_ELBO
        from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

        def model():
            z = numpyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), event_shape=(d,)))
            numpyro.factor("log_p", log_p(z))

        self.guide = AutoMultivariateNormal(model) if family == "fullrank" else AutoNormal(model)
        self.svi = SVI(model, self.guide, numpyro.optim.Adam(1e-2), Trace_ELBO())
        self.log_p = log_p

    def run(self, seed):
        import jax

        from veil import psis_khat

        import contextlib

        import threadpoolctl

        limit = threadpoolctl.ThreadpoolController().limit if self.one_blas_thread else None
        t0 = time.perf_counter()
        with limit(limits=1, user_api="blas") if limit else contextlib.nullcontext():
            r = self.svi.run(jax.random.key(seed), NUMPYRO_STEPS, progress_bar=False)
            jax.block_until_ready(r.params)
        wall = time.perf_counter() - t0
        if hasattr(self.guide, "get_posterior"):  # AutoMultivariateNormal
            post = self.guide.get_posterior(r.params)
        else:  # AutoNormal: a diagonal Normal over the one site "z"
            import numpyro.distributions as dist

            post = dist.Normal(r.params["z_auto_loc"], r.params["z_auto_scale"]).to_event(1)
        z = post.sample(jax.random.key(10_000 + seed), (NUM_DRAWS,))
        zk = z[:2000]
        lw = jax.vmap(self.log_p)(zk) - post.log_prob(zk)
        try:
            khat = psis_khat(lw)
        except ValueError:
            khat = float("nan")
        extra = {"elbo": elbo(self.log_p, z, post.log_prob(z))}
        return wall, z, khat, NUMPYRO_STEPS, extra


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--families", default="fullrank,meanfield")
    ap.add_argument("--out", default="time_to_accuracy.jsonl")
    ap.add_argument("--numpyro-one-blas", action="store_true",
                    help="also run NumPyro's full-rank guide with BLAS held to one thread")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    for name in args.targets.split(","):
        log_p, bij, d, gt_mean, gt_sd = load_target(name)
        tools = {}
        for fam in args.families.split(","):
            tools[("numpyro", fam)] = NumPyroTool(fam, log_p, d)
            if fam == "fullrank" and args.numpyro_one_blas:
                tools[("numpyro-1blas", fam)] = NumPyroTool(fam, log_p, d, one_blas_thread=True)
            tools[("veil", fam)] = VeilTool(fam, log_p, d)
        for seed in range(args.seeds):
            for (tool, fam), t in tools.items():
                wall, z, khat, grads, extra = t.run(seed)
                row = {"target": name, "dim": d, "tool": tool, "family": fam, "seed": seed,
                       "wall": wall, "khat": khat, "grad_evals": grads, **extra,
                       **accuracy(z, bij, gt_mean, gt_sd)}
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


def summarize(path):
    """Print the markdown table of a results file: medians over seeds."""
    import numpy as np

    rows = [json.loads(line) for line in open(path)]
    keys = sorted({(r["target"], r["family"], r["tool"]) for r in rows},
                  key=lambda k: (TARGETS.index(k[0]) if k[0] in TARGETS else 99, k[1], k[2]))
    print("| target (dim) | family | tool | max err/sd | median err/sd | sd ratio [min, med, max] | "
          "ELBO | k-hat | grad evals | wall first (s) | wall warm (s) | warm wall / NumPyro | "
          "warm wall / NumPyro 1-BLAS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    warm = {}
    for k in keys:
        rs = sorted([r for r in rows if (r["target"], r["family"], r["tool"]) == k], key=lambda r: r["seed"])
        later = [r["wall"] for r in rs[1:]] or [rs[0]["wall"]]
        warm[k] = float(np.median(later))
    for k in keys:
        rs = sorted([r for r in rows if (r["target"], r["family"], r["tool"]) == k], key=lambda r: r["seed"])
        med = lambda f: float(np.median([r[f] for r in rs]))  # noqa: E731
        ratio = warm[k] / warm.get((k[0], k[1], "numpyro"), np.nan)
        ratio1 = warm[k] / warm.get((k[0], k[1], "numpyro-1blas"), np.nan)
        print(f"| {k[0]} ({rs[0]['dim']}) | {k[1]} | {k[2]} | {med('max_err'):.3f} | "
              f"{med('median_err'):.3f} | [{med('sd_ratio_min'):.2f}, {med('sd_ratio_median'):.2f}, "
              f"{med('sd_ratio_max'):.2f}] | {med('elbo'):.2f} | {med('khat'):.2f} | {med('grad_evals'):.0f} | "
              f"{rs[0]['wall']:.2f} | {warm[k]:.2f} | {ratio:.2f} | {'' if np.isnan(ratio1) else f'{ratio1:.2f}'} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
    else:
        main()
