"""Sample-based fusion (``veil.fusion.fuse_fits``) against consensus, on logistic regression.

    python -m benchmarks.studies.fusion_smc [--out fusion_smc.jsonl]

Cases: a synthetic logistic regression with few rows per shard (2,000 rows, d = 5 standard
normal features, weights N(0, 1); S = 2, 4, 8, 16: 1,000 down to 125 rows per shard, where
the sub-posteriors stop being Gaussian), and German credit (1,000 rows, d = 25; S = 4, 8).
Each shard's sub-posterior (prior^(1/S)) gets a FullRank fit with veil's defaults
(``fit_shards``); ``consensus`` multiplies the Gaussians, ``fuse_fits`` importance-resamples
each fit towards its sub-posterior and fuses the draws by SMC Fusion in a pairwise tree.

Reference: the full-data posterior by importance sampling (40,000 draws of the full-data
FullRank fit, self-normalised weights; its k-hat is printed). Reported: max |mean error| / sd
and the range of sd ratios, for both fusions, the SMC's smallest ESS fraction, its wall.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from benchmarks.peers.minibatch import log_lik, log_prior  # the same logistic regression


def datasets():
    import veil

    r = np.random.default_rng(0)
    n, d = 2000, 5
    Xs = r.standard_normal((n, d)).astype(np.float32)
    w = r.standard_normal(d)
    ys = (r.random(n) < 1 / (1 + np.exp(-Xs @ w))).astype(np.float32)
    yield "synthetic_2000_d5", Xs, ys, (2, 4, 8, 16), 2000
    X, y = veil.demo.german_credit_data()
    order = r.permutation(X.shape[0])
    yield "german_credit", np.asarray(X)[order], np.asarray(y, np.float32)[order], (4, 8), 1000


def reference(X, y):
    import veil

    d = X.shape[1]
    full = veil.Target.minibatched(log_prior, log_lik, (X, y), dim=d, batch_size=X.shape[0])
    res = veil.fit(full, veil.FullRank(d), key=jax.random.key(0), progress=False)
    z, lq = res.q.sample_and_log_prob(jax.random.key(9), 40_000)
    lw = np.asarray(veil.target.log_density_rows(full, z) - lq, np.float64)
    w = np.exp(lw - lw.max())
    w /= w.sum()
    z = np.asarray(z, np.float64)
    m = w @ z
    return m, np.sqrt(w @ (z - m) ** 2), float(res.khat)


def main():
    import veil

    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--seeds", type=int, default=1)
    a = p.parse_args()
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__}
    print(json.dumps(meta))
    print(f"{'data':>18} {'S':>3} {'seed':>4} | {'consensus err':>13} {'sd ratio':>12} "
          f"| {'smc err':>8} {'sd ratio':>12} {'min ess':>7} {'smc s':>6}")
    for name, X, y, shards, draws in datasets():
        m, sd, khat = reference(X, y)
        print(f"{name}: reference k-hat {khat:.2f}")
        d = X.shape[1]
        for S in shards:
            for seed in range(a.seeds):
                parts = veil.fusion.fit_shards(log_prior, log_lik, (X, y), veil.FullRank(d), dim=d, num_shards=S,
                                               key=jax.random.key(seed + 1), progress=False)
                cq = veil.fusion.consensus(parts)
                c_err = float(np.max(np.abs(np.asarray(cq.mean) - m) / sd))
                c_sd = np.sqrt(np.diag(np.asarray(cq.cov))) / sd
                t0 = time.perf_counter()
                try:
                    out = veil.fusion.fuse_fits(parts, key=jax.random.key(100 + seed), num_draws=draws)
                    wall = time.perf_counter() - t0
                    s_err = float(np.max(np.abs(np.asarray(out.mean) - m) / sd))
                    s_sd = np.sqrt(np.diag(np.asarray(out.cov))) / sd
                    row = {"smc_err": s_err, "smc_sd_min": float(s_sd.min()), "smc_sd_max": float(s_sd.max()),
                           "min_ess": out.min_ess, "smc_wall": wall, "failed": None}
                except ValueError as e:  # degenerate draws: reported, not hidden
                    row = {"failed": str(e)[:120]}
                khats = [float(r.khat) for r in parts]
                row.update({"data": name, "S": S, "seed": seed, "draws": draws, "consensus_err": c_err,
                            "consensus_sd_min": float(c_sd.min()), "consensus_sd_max": float(c_sd.max()),
                            "shard_khat_max": max(khats), "reference_khat": khat, **meta})
                if row["failed"] is None:
                    print(f"{name:>18} {S:>3} {seed:>4} | {c_err:>13.3f} [{c_sd.min():.2f}, {c_sd.max():.2f}] | "
                          f"{row['smc_err']:>8.3f} [{row['smc_sd_min']:.2f}, {row['smc_sd_max']:.2f}] "
                          f"{row['min_ess']:>7.3f} {row['smc_wall']:>6.1f}  (shard k-hat max {max(khats):.2f})")
                else:
                    print(f"{name:>18} {S:>3} {seed:>4} | {c_err:>13.3f} [{c_sd.min():.2f}, {c_sd.max():.2f}] "
                          f"| failed: {row['failed']}")
                if a.out:
                    with open(a.out, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
