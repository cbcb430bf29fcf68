"""veil on posteriordb: Stan programs in, fits against the reference draws, misses and verdicts.

For every posterior of a local posteriordb (default ``../shared/data/posteriordb_dev``: 31
posteriors with reference draws, 10 chains x 1,000 NUTS draws) the Stan program is built with
``veil.Target.from_stan`` and fitted by each method named (default: veil's default fit,
``veil.fit(target, veil.FullRank(dim), key=...)``). Per posterior and method it reports

* ``err``: max over the reference's scalars of |mean - reference mean| / reference sd (q's
  own mean, 8,000 draws: Monte-Carlo error ~0.011 sd; the reference's mean is good to
  ~0.01 sd);
* ``sd_lo``/``sd_hi``: smallest and largest sd / reference sd;
* ``err_psis``: the same error of the Pareto-smoothed importance-weighted estimate (32,000
  draws resampled from the verdict's diagnostic draws), where k-hat < 0.7;
* the verdict (``trusted``) and its evidence: k-hat, the reweighting check, other modes, how
  the run stopped;
* gradient and value-only evaluations of the Stan model (counted by the target; the fit
  and its diagnostics) and wall time (the same; the build is timed apart);

then the count within 0.1 sd and every **silent miss**: a fit off by more than 0.1 sd that
the verdict called fine.

Methods:
  veil        veil's defaults: FullRank, default objective and stopping rule.
  advi        plain full-rank ADVI: veil's FullRank with ELBO(1 draw, Reparam), Adam(0.01),
              10,000 fixed steps (Stan's ADVI and PyMC's defaults in spirit: one draw, a
              fixed step count; no stopping rule, no averaging).
  pathfinder  BlackJAX 1.x's Pathfinder (one path, maxiter 200, 25 ELBO draws; the verdict
              column is veil's k-hat < 0.7 on its draws, which BlackJAX does not report).
  veil-pf     veil.pathfinder (4 paths; its best path's Gaussian).
  veil-pfstart  veil's default fit started from veil.pathfinder's Gaussian.
  flow        a RealNVP coupling flow (veil.flows.coupling) over veil's default FullRank fit.
  flow-chisq  the same flow fitted to the chi-square objective (16 draws): mass-covering.
  newton      veil.variational_newton (Pathfinder start, Newton steps on the ELBO, gradients only).

64-bit: ``JAX_ENABLE_X64=1`` in the environment runs every method in float64 (kilpisjarvi's
intercept-slope correlation of -0.99999 is beyond float32).

Run:  .venv/bin/python -m benchmarks.peers.posteriordb [--methods veil,advi,pathfinder]
          [--only NAME ...] [--seed 0] [--out benchmarks/results/posteriordb_DATE.jsonl]
      .venv/bin/python -m benchmarks.peers.posteriordb --table RESULTS.jsonl ...   (markdown table)
(needs ``veil[stan]``; ``pip install blackjax`` for the Pathfinder peer.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # the repository
DEFAULT_DB = ROOT.parent / "shared" / "data" / "posteriordb_dev" / "posterior_database"
NUM_DRAWS = 8000


# ----------------------------------------------------------------------------- the database
def _read_json_zip(path: Path):
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read(z.namelist()[0]))


def posterior_names(db: Path) -> list[str]:
    return sorted(p.stem for p in (db / "posteriors").glob("*.json"))


def load(db: Path, name: str) -> dict:
    """Program, data and reference draws (``{"beta[1]": array[10000], ...}``) of a posterior."""
    info = json.loads((db / "posteriors" / f"{name}.json").read_text())
    code = (db / "models" / "stan" / f"{info['model_name']}.stan").read_text()
    data = _read_json_zip(db / "data" / "data" / f"{info['data_name']}.json.zip")
    chains = _read_json_zip(db / "reference_posteriors" / "draws" / "draws" / f"{info['reference_posterior_name']}.json.zip")
    ref = {k: np.concatenate([np.asarray(c[k], np.float64) for c in chains]) for k in chains[0]}
    return {"name": name, "model": info["model_name"], "code": code, "data": data, "reference": ref}


def columns(draws: dict) -> dict:
    """Constrained draws ``{name: array[n, *shape]}`` as posteriordb's scalar columns
    ``{"beta[1]": array[n], ...}`` (1-based, first index slowest)."""
    out = {}
    for name, x in draws.items():
        x = np.asarray(x, np.float64)
        if x.ndim == 1:
            out[name] = x
            continue
        for idx in np.ndindex(*x.shape[1:]):
            out[f"{name}[{','.join(str(i + 1) for i in idx)}]"] = x[(slice(None), *idx)]
    return out


def accuracy(cols: dict, ref: dict) -> dict:
    """Max |mean error| / reference sd (and where), and the range of sd ratios."""
    errs, ratios = {}, {}
    for k, r in ref.items():
        sd = r.std()
        if k not in cols or sd == 0:
            continue
        errs[k] = abs(cols[k].mean() - r.mean()) / sd
        ratios[k] = cols[k].std() / sd
    if not errs or not all(np.isfinite(list(errs.values()))):
        return {"err": float("nan"), "worst": None, "sd_lo": float("nan"), "sd_hi": float("nan")}
    worst = max(errs, key=errs.get)
    return {"err": float(errs[worst]), "worst": worst, "sd_lo": float(min(ratios.values())),
            "sd_hi": float(max(ratios.values()))}


# ----------------------------------------------------------------------------- methods
def run_veil(target, key):
    import veil

    res = veil.fit(target, veil.FullRank(target.dim), key=key, progress=False)
    return res, _veil_row(res)


def _veil_row(res) -> dict:
    s = res.summary()
    rw = res.reweighting
    return {"trusted": bool(s.trustworthy), "khat": float(res.khat), "stop": res.stop_reason,
            "steps": int(res.num_steps), "skipped": int(res.num_skipped),
            "reweighting_off": bool(rw is not None and rw.off), "other_modes": bool(res.other_modes),
            "refined": None if res.refinement is None else res.refinement.applied,
            "refine_shift": None if res.refinement is None else res.refinement.mean_shift,
            "refine_s": None if res.refinement is None else round(res.refinement.wall_time, 2),
            "drift": None if res.mean_drift is None else round(res.mean_drift.shift, 3),
            "starts_moved": None if res.starts is None else res.starts.moved_nats,
            "starts_other_mode": None if res.starts is None else res.starts.other_mode,
            "verdict": " | ".join(s.verdict)}


def run_advi(target, key):
    import optax

    import veil

    res = veil.fit(target, veil.FullRank(target.dim), key=key, objective=veil.ELBO(1, estimator=veil.Reparam()),
                   optimizer=optax.adam(0.01), max_steps=10_000, stop=None, progress=False)
    row = _veil_row(res)
    row["trusted"] = bool(np.isfinite(row["khat"]) and row["khat"] < 0.7)  # a plain ADVI has no verdict
    return res, row


def run_pathfinder(target, key):
    import blackjax
    import jax

    x0 = jax.random.uniform(jax.random.fold_in(key, 7), (target.dim,), minval=-2.0, maxval=2.0)
    state, _ = jax.jit(lambda k, x: blackjax.vi.pathfinder.approximate(k, target.log_density, x, num_samples=25,
                                                                        maxiter=200, maxcor=6))(key, x0)
    return state, {}


def run_veil_pathfinder(target, key):
    import veil

    pf = veil.pathfinder(target, key=key)
    return pf, {}


def run_newton(target, key):
    import veil

    res = veil.variational_newton(target, key=key)
    return res, {}


def run_veil_from_pathfinder(target, key):
    import veil

    pf = veil.pathfinder(target, key=jax_fold(key, 3))
    res = veil.fit(target, pf.q, key=key, progress=False)
    return res, _veil_row(res)


def run_flow(target, key):
    import veil

    base = veil.fit(target, veil.FullRank(target.dim), key=key, progress=False)
    res = veil.fit(target, veil.flows.coupling(target.dim, key=jax_fold(key, 5), base=base.q), key=jax_fold(key, 6),
                   progress=False)
    return res, _veil_row(res)


def run_flow_chisq(target, key):
    import veil

    base = veil.fit(target, veil.FullRank(target.dim), key=key, progress=False)
    res = veil.fit(target, veil.flows.coupling(target.dim, key=jax_fold(key, 5), base=base.q), key=jax_fold(key, 6),
                   objective=veil.ChiSquare(16), progress=False)
    return res, _veil_row(res)


def jax_fold(key, i):
    import jax

    return jax.random.fold_in(key, i)


METHODS = {"veil": run_veil, "veil-pfstart": run_veil_from_pathfinder, "newton": run_newton, "flow": run_flow,
           "flow-chisq": run_flow_chisq, "advi": run_advi, "pathfinder": run_pathfinder, "veil-pf": run_veil_pathfinder}


def draws_of(method: str, out, target, key) -> tuple[dict, dict]:
    """Constrained draws of a fitted method and what they cost to get (for k-hat of peers)."""
    import jax

    import veil

    if method in ("veil", "advi", "veil-pfstart", "flow", "flow-chisq"):
        return out.draws(NUM_DRAWS, key=key), {}
    if method in ("veil-pf", "newton"):
        z = out.q.sample(key, NUM_DRAWS)
        lw = np.asarray(jax.vmap(target.log_density)(z[:2000]) - jax.vmap(out.q.log_prob)(z[:2000]), np.float64)
        khat = veil.psis_khat(lw) if np.isfinite(lw).all() else float("nan")
        return jax.vmap(target.to_constrained)(z), {"khat": float(khat), "trusted": bool(khat < 0.7)}
    import blackjax

    z, log_q = blackjax.vi.pathfinder.sample(key, out, NUM_DRAWS)
    lw = np.asarray(jax.vmap(target.log_density)(z[:2000]) - log_q[:2000], np.float64)
    khat = veil.psis_khat(lw) if np.isfinite(lw).all() else float("nan")
    return jax.vmap(target.to_constrained)(z), {"khat": float(khat), "trusted": bool(np.isfinite(khat) and khat < 0.7)}


# ----------------------------------------------------------------------------- the run
def table(paths: list[Path]) -> None:
    """A markdown table of results files (rows keyed by posterior; one column group per
    method, labelled ``file-stem:method`` when several files hold the same method)."""
    rows, groups = {}, []
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("meta"):
                continue
            label = r["method"] if len(paths) == 1 else f"{path.stem.split('_')[1]}:{r['method']}"
            if label not in groups:
                groups.append(label)
            rows.setdefault(r["posterior"], {})[label] = r
    def cell(r):
        if r is None:
            return "-"
        mark = "" if r["err"] <= 0.1 else (" **silent**" if r["trusted"] else " flagged")
        return f"{r['err']:.3f}{mark}"
    print("| posterior | d | " + " | ".join(groups) + " |")
    print("|---|---|" + "---|" * len(groups))
    for name, by in rows.items():
        d = next(iter(by.values()))["dim"]
        print(f"| {name} | {d} | " + " | ".join(cell(by.get(g)) for g in groups) + " |")
    for g in groups:
        rs = [by[g] for by in rows.values() if g in by]
        good = sum(r["err"] <= 0.1 for r in rs)
        silent = sum(r["err"] > 0.1 and r["trusted"] for r in rs)
        alarms = sum(r["err"] <= 0.1 and not r["trusted"] for r in rs)
        print(f"\n{g}: {good}/{len(rs)} within 0.1 sd, {silent} silent misses, {alarms} false alarms, median wall "
              f"{np.median([r['wall_s'] for r in rs]):.2f} s, median gradients {np.median([r['grad_evals'] for r in rs]):.0f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", type=Path, nargs="+", help="print a markdown table of results files and stop")
    p.add_argument("--db", type=Path, default=DEFAULT_DB)
    p.add_argument("--methods", default="veil")
    p.add_argument("--only", nargs="*")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path,
                   default=ROOT / "benchmarks" / "results" / "posteriordb" / f"posteriordb_{datetime.date.today()}.jsonl")
    a = p.parse_args(argv)
    if a.table:
        return table(a.table)

    import jax

    import veil

    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    names = a.only or posterior_names(a.db)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"meta": True, "date": str(datetime.datetime.now()), "machine": platform.processor() or platform.machine(),
            "python": sys.version.split()[0], "jax": jax.__version__, "veil": veil.__version__,
            "x64": bool(jax.config.jax_enable_x64),
            "command": " ".join(sys.argv)}
    with open(a.out, "a") as f:
        f.write(json.dumps(meta) + "\n")
    rows = []
    for name in names:
        post = load(a.db, name)
        t0 = time.perf_counter()
        try:
            target = veil.Target.from_stan(post["code"], post["data"])
        except Exception as e:  # noqa: BLE001 - a posterior that does not build is reported, not fatal
            print(f"{name}: build failed: {e}", flush=True)
            continue
        build = time.perf_counter() - t0
        for method in methods:
            key = jax.random.key(a.seed)
            t0 = time.perf_counter()
            sm = target.source
            errors0, grads0, evals0 = sm.model.errors(), sm.num_grad_evals, sm.num_evals
            try:
                out, row = METHODS[method](target, key)
                if method == "veil":
                    out.summary()  # the verdict's diagnostics are part of the default fit's cost
                wall = time.perf_counter() - t0
                cost = {"grad_evals": sm.num_grad_evals - grads0, "logp_evals": sm.num_evals - evals0}
                draws, extra = draws_of(method, out, target, jax.random.key(a.seed + 1))
            except Exception as e:  # noqa: BLE001
                print(f"{name} {method}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            if method in ("veil", "advi", "veil-pfstart", "flow", "flow-chisq") and row.get("khat", np.inf) < 0.7:
                # the importance-weighted (PSIS) estimates beside q's own (Yao et al. 2018)
                psis = out.resampled_draws(32_000, key=jax.random.key(a.seed + 2))
                extra["err_psis"] = accuracy(columns(psis), post["reference"])["err"]
            row = {"posterior": name, "method": method, "dim": target.dim, "build_s": round(build, 1),
                   "wall_s": round(wall, 2), **cost, **row, **extra, **accuracy(columns(draws), post["reference"]),
                   "stan_errors": sm.model.errors() - errors0}
            rows.append(row)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(_line(row), flush=True)
    report(rows)


def _line(r: dict) -> str:
    flag = "ok " if r["err"] <= 0.1 else ("MISS-flagged" if not r["trusted"] else "SILENT MISS")
    return (f"{r['posterior']:<45} {r['method']:<10} d={r['dim']:<3} err={r['err']:7.3f} sd=[{r['sd_lo']:.2f},"
            f"{r['sd_hi']:.2f}] khat={r.get('khat', float('nan')):6.2f} trusted={r['trusted']!s:<5} "
            f"{r['wall_s']:6.2f}s  psis={r.get('err_psis', float('nan')):6.3f}  {flag}")


def report(rows: list[dict]) -> None:
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        good = sum(r["err"] <= 0.1 for r in rs)
        silent = [r for r in rs if not r["err"] <= 0.1 and r["trusted"]]
        alarms = [r for r in rs if r["err"] <= 0.1 and not r["trusted"]]
        psis_good = sum(r.get("err_psis", np.inf) <= 0.1 for r in rs)
        print(f"\n{method}: within 0.1 sd on {good}/{len(rs)} (PSIS estimates: {psis_good}); silent misses "
              f"{len(silent)}; false alarms {len(alarms)}; median wall {np.median([r['wall_s'] for r in rs]):.2f}s, "
              f"median gradients {np.median([r['grad_evals'] for r in rs]):.0f}")
        for r in silent:
            print(f"  silent miss: {r['posterior']} err={r['err']:.3f} at {r['worst']} khat={r.get('khat', float('nan')):.2f}")
        for r in alarms:
            print(f"  false alarm: {r['posterior']} err={r['err']:.3f} khat={r.get('khat', float('nan')):.2f}")


if __name__ == "__main__":
    main()
