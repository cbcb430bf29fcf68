"""Consensus fusion of shard fits against the full-data fit, on logistic regression.

    python -m benchmarks.studies.fusion [--shards 2,4,8,16] [--seeds 2] [--out fusion.jsonl]

Targets: German credit (1000 rows, 25 features with an intercept column, N(0, 1) prior on the
weights; veil's bundled copy) and a synthetic logistic regression (100,000 rows, 10 standard
normal features, weights N(0, 1)). Each is cut into S contiguous shards of shuffled rows;
every shard's sub-posterior (its likelihood times the prior^(1/S)) gets a FullRank fit with
veil's defaults, and ``veil.fusion.consensus`` multiplies them. Reference: the FullRank fit of
the full data (same defaults). Reported: max |fused mean - reference mean| / reference sd,
min and max of fused sd / reference sd, and the fits' wall times (the shards one after the
other; on S machines the wall would be the slowest shard's).
"""

from __future__ import annotations

import argparse
import json
import platform
import time


import jax
import numpy as np

from benchmarks.peers.minibatch import log_lik, log_prior  # the same logistic regression


def datasets():
    import veil

    X, y = veil.demo.german_credit_data()
    r = np.random.default_rng(0)
    order = r.permutation(X.shape[0])
    yield "german_credit", np.asarray(X)[order], np.asarray(y, np.float32)[order]
    n, d = 100_000, 10
    Xs = r.standard_normal((n, d)).astype(np.float32)
    w = r.standard_normal(d)
    ys = (r.random(n) < 1 / (1 + np.exp(-Xs @ w))).astype(np.float32)
    yield "synthetic_1e5", Xs, ys


def main():
    import veil

    p = argparse.ArgumentParser()
    p.add_argument("--shards", default="2,4,8,16")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", default="fusion.jsonl")
    args = p.parse_args()
    meta = {"machine": platform.machine(), "jax": jax.__version__}
    for name, X, y in datasets():
        d = X.shape[1]
        full = veil.Target.minibatched(log_prior, log_lik, (X, y), dim=d, batch_size=X.shape[0])
        t0 = time.perf_counter()
        ref = veil.fit(full, veil.FullRank(d), key=jax.random.key(100), progress=False)
        ref_wall = time.perf_counter() - t0
        m, sd = np.asarray(ref.q.mean), np.asarray(ref.q.stddev)
        for s in (int(v) for v in args.shards.split(",")):
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                parts = veil.fusion.fit_shards(log_prior, log_lik, (X, y), veil.FullRank(d), dim=d,
                                               num_shards=s, key=jax.random.key(seed), progress=False)
                walls = [p.wall_time for p in parts]
                q = veil.fusion.consensus(parts)
                total = time.perf_counter() - t0
                ratio = np.asarray(q.stddev) / sd
                row = {"data": name, "n": X.shape[0], "d": d, "shards": s, "seed": seed,
                       "max_err_sd": round(float(np.max(np.abs(np.asarray(q.mean) - m) / sd)), 3),
                       "sd_ratio": [round(float(ratio.min()), 3), round(float(ratio.max()), 3)],
                       "shard_khat_max": round(max(float(p.khat) for p in parts), 2),
                       "wall_all_shards": round(total, 2), "wall_slowest_shard": round(max(walls), 2),
                       "ref_wall": round(ref_wall, 2), "ref_khat": round(float(ref.khat), 2)}
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps({**row, **meta}) + "\n")


if __name__ == "__main__":
    main()
