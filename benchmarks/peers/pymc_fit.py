"""A PyMC model fitted by veil (``Target.from_pymc``) against PyMC's own full-rank ADVI.

    python -m benchmarks.peers.pymc_fit [--repeats 3] [--pm-steps 10000,30000]

Models: eight schools (non-centred) and German-credit logistic regression, written in PyMC;
reference: the long NUTS runs shipped with veil (``veil/data/reference_*.json``). Per repeat
(seed r) and tool, in one process, tools interleaved:

* veil: ``veil.fit(veil.Target.from_pymc(model), veil.FullRank(d), key=jax.random.key(r))``,
  every default, target construction included in the wall time;
* PyMC: ``pm.fit(n, method="fullrank_advi", random_seed=r)`` (PyTensor's default C backend),
  then ``approx.sample(4000)``, for each ``n`` of ``--pm-steps``.

Wall time is of the first call for each (model, tool) in the process (compilation included)
and of later repeats ("warm"); accuracy is the max over constrained scalars of
``|mean - NUTS mean| / NUTS sd`` and the range of ``sd / NUTS sd``, from 4,000 draws.
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import numpy as np
import pymc as pm

import veil
from veil.demo import eight_schools_data, german_credit_data, load_reference
from veil.result import _flat_columns


def eight_schools():
    sigma, y = (np.asarray(a, np.float64) for a in eight_schools_data())
    with pm.Model() as m:
        mu = pm.Normal("mu", 0.0, 5.0)
        tau = pm.HalfCauchy("tau", 5.0)
        theta_tilde = pm.Normal("theta_tilde", 0.0, 1.0, shape=8)
        theta = pm.Deterministic("theta", mu + tau * theta_tilde)
        pm.Normal("y", theta, sigma, observed=y)
    return m


def german_credit():
    x, y = german_credit_data()
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=x.shape[1])
        pm.Bernoulli("y", logit_p=pm.math.dot(np.asarray(x, np.float64), w), observed=np.asarray(y, np.int64))
    return m


def accuracy(draws: dict, ref: dict):
    names, x = _flat_columns({k: np.asarray(v) for k, v in draws.items()})
    err, ratio = [], []
    for n, col in zip(names, x.T):
        if n in ref["mean"]:
            err.append(abs(col.mean() - ref["mean"][n]) / ref["sd"][n])
            ratio.append(col.std() / ref["sd"][n])
    return max(err), min(ratio), max(ratio)


def run_veil(model, seed):
    t0 = time.perf_counter()
    t = veil.Target.from_pymc(model)
    res = veil.fit(t, veil.FullRank(t.dim), key=jax.random.key(seed), progress=False)
    wall = time.perf_counter() - t0
    return wall, res.draws(4000, key=jax.random.key(100 + seed)), res.num_steps, res.summary().trustworthy


def run_pymc(model, seed, n):
    t0 = time.perf_counter()
    try:
        with model:
            approx = pm.fit(n=n, method="fullrank_advi", random_seed=seed, progressbar=False)
    except FloatingPointError:  # "NaN occurred in optimization"
        return time.perf_counter() - t0, None, n, None
    wall = time.perf_counter() - t0
    idata = approx.sample(4000, random_seed=seed)
    post = idata.posterior
    return wall, {k: post[k].values.reshape((-1,) + post[k].shape[2:]) for k in post.data_vars}, n, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pm-steps", default="10000,30000")
    args = ap.parse_args()
    pm_steps = [int(s) for s in args.pm_steps.split(",")]
    print(f"pymc {pm.__version__}, jax {jax.__version__}, veil; repeats {args.repeats}")
    print("| model | tool | first wall (s) | warm wall (s, median) | steps | max "
          "mean err / sd (median) | sd ratio range (over repeats) | verdict OK |")
    print("|---|---|---|---|---|---|---|---|")
    for name, make in (("eight schools", eight_schools), ("German credit", german_credit)):
        ref = load_reference(name.lower().replace(" ", "_"))
        tools = [("veil FullRank", run_veil, None)] + [(f"pm.fit fullrank_advi n={n}", run_pymc, n) for n in pm_steps]
        rows = {label: [] for label, _, _ in tools}
        for r in range(args.repeats):
            for label, fn, n in tools:
                model = make()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = fn(model, r) if n is None else fn(model, r, n)
                wall, draws, steps, ok = out
                acc = accuracy(draws, ref) if draws is not None else (np.nan, np.nan, np.nan)
                rows[label].append((wall, *acc, steps, ok, draws is None))
        for label, rs in rows.items():
            walls = [x[0] for x in rs]
            errs = [x[1] for x in rs if not x[6]] or [np.nan]
            done = [x for x in rs if not x[6]]
            lo = min((x[2] for x in done), default=np.nan)
            hi = max((x[3] for x in done), default=np.nan)
            oks = [x[5] for x in rs]
            ok = "-" if oks[0] is None else f"{sum(oks)}/{len(oks)}"
            failed = sum(x[6] for x in rs)
            if failed:
                ok = f"{failed}/{len(rs)} stopped: NaN in optimization"
            print(f"| {name} | {label} | {walls[0]:.2f} | {np.median(walls[1:]) if len(walls) > 1 else float('nan'):.2f} | "
                  f"{int(np.median([x[4] for x in rs]))} | {np.median(errs):.3f} | [{lo:.2f}, {hi:.2f}] | {ok} |", flush=True)


if __name__ == "__main__":
    main()
