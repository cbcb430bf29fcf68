"""Repulsive ensembles against the same members fitted side by side, on three modes.

    python -m benchmarks.studies.repulsive [--seeds 6]

Target: a 2-d mixture of three Gaussians (sd 0.7) at (-3, 0), (3, 0), (0, 4) with weights
0.5, 0.3, 0.2. ``veil.particles.repulsive_ensemble(t, FullRank(2), k, key=seed, strength=s)``
with members started at Uniform(-2, 2) around the origin; ``strength=0`` is the same members
without repulsion (plain restarts, fitted together). For each run: how many of the three modes
hold a member, the largest distance of a member's mean from its nearest mode, the mixture's
weight on each mode (ELBO weights, shared by the members of a mode) and the steps.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--out", default="repulsive.jsonl")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    import veil

    locs = np.array([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    weights = np.array([0.5, 0.3, 0.2])
    lj, lw = jnp.asarray(locs, jnp.float32), jnp.log(jnp.asarray(weights, jnp.float32))
    t = veil.Target.from_logdensity(lambda z: jax.nn.logsumexp(lw - 0.5 * jnp.sum((z - lj) ** 2, 1) / 0.7**2), dim=2)
    print(f"# jax {jax.__version__}, veil {veil.__version__}")
    rows = []
    with open(args.out, "a") as out:
        for k in (3, 8):
            for strength, polish in ((0.0, False), (1.0, False), (10.0, False), (10.0, True)):
                for seed in range(args.seeds):
                    res = veil.particles.repulsive_ensemble(t, veil.FullRank(2), k, key=jax.random.key(seed),
                                                            strength=strength, polish=polish, progress=False)
                    m = np.asarray(res.q.components.loc)
                    near = np.argmin(np.linalg.norm(locs[None] - m[:, None], axis=2), axis=1)
                    mode_w = np.bincount(near, weights=np.asarray(res.q.weights), minlength=3)
                    row = {"k": k, "strength": strength, "polish": polish, "seed": seed,
                           "modes": int(len(set(near.tolist()))),
                           "bias": float(np.max(np.min(np.linalg.norm(locs[None] - m[:, None], axis=2), axis=1))),
                           "weight_err": float(np.abs(mode_w - weights).max()), "steps": res.num_steps}
                    rows.append(row)
                    out.write(json.dumps(row) + "\n")
    print("| members k | strength | polish | runs with all 3 modes | median "
          "largest bias | median max weight error (all 3 found) | median steps |")
    print("|---|---|---|---|---|---|---|")
    for k in (3, 8):
        for strength, polish in ((0.0, False), (1.0, False), (10.0, False), (10.0, True)):
            rs = [r for r in rows if (r["k"], r["strength"], r["polish"]) == (k, strength, polish)]
            full = [r["weight_err"] for r in rs if r["modes"] == 3]
            print(f"| {k} | {strength:g} | {'yes' if polish else 'no'} | {sum(r['modes'] == 3 for r in rs)} of {len(rs)} | "
                  f"{np.median([r['bias'] for r in rs]):.2f} | {np.median(full) if full else float('nan'):.3f} | "
                  f"{np.median([r['steps'] for r in rs]):.0f} |")


if __name__ == "__main__":
    main()
