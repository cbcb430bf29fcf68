"""The chi-square route to the evidence on the benchmark targets (issue 28, item 4).

    python -m benchmarks.studies.evidence_route [--targets A,B] [--seeds 1] [--out results.jsonl]

Needs ``inference-gym`` and ``tfp-nightly`` and the offline data shim (as
``time_to_accuracy.py``). For each target and seed: the README's recipe, a default FullRank
ELBO fit, then ``veil.fit(target, res.q, objective=veil.ChiSquare())`` started from it, and
``log_evidence(n=20,000)`` of each fitted q. The log evidence of these targets is not known in
closed form, so the two estimates check each other: a row is

* "works" when the chi-square fit is trusted (not ``diverged``, evidence k-hat < 0.7) and its
  estimate agrees with the ELBO fit's (when that one's k-hat < 0.7 too) within 4 combined
  standard errors (plus 0.01 nats);
* "refused" when veil flags it (the chi-square fit ends ``"diverged"``, or ``log_evidence``
  warns that its k-hat is 0.7 or more);
* "SILENT MISS" otherwise: a trusted estimate that disagrees with the other trusted one.

German credit also runs with ``ChiSquare(16)``, the old default, to show the guard.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings

import jax
import numpy as np

from benchmarks.common import TARGETS, load_target

import veil


def evidence(res, seed):
    """``(LogEvidence, flagged)``; a refused estimate (non-finite weights: ``log_evidence``
    raises) is NaN and flagged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ev = res.log_evidence(key=jax.random.key(100 + seed), n=20_000)
        except ValueError:
            return veil.result.LogEvidence(math.nan, math.nan, math.nan, 20_000), True
    warned = any("means nothing" in str(w.message) or "failed" in str(w.message) for w in caught)
    return ev, warned


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = open(args.out, "a") if args.out else None
    print(f"jax {jax.__version__}; ELBO FullRank fit, then ChiSquare() from it; log_evidence(n=20000)")
    print("| target | d | objective | seed | ELBO fit k-hat | ELBO-IS log Z | chi2 stop | "
          "chi2 k-hat | chi2 log Z | chi2 sd / ELBO sd (median) | outcome | chi2 fit (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.targets.split(","):
        log_p, _, d, _, _ = load_target(name)
        target = veil.Target.from_logdensity(log_p, dim=d)
        objectives = [("ChiSquare()", veil.ChiSquare())]
        if name == "GermanCreditNumericLogisticRegression":
            objectives.append(("ChiSquare(16)", veil.ChiSquare(16)))
        for seed in range(args.seeds):
            key = jax.random.key(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                e = veil.fit(target, veil.FullRank(d), key=key, progress=False)
            ev_e, warned_e = evidence(e, seed)
            for label, objective in objectives:
                t0 = time.perf_counter()
                with warnings.catch_warnings(record=True):
                    warnings.simplefilter("always")
                    c = veil.fit(target, e.q, key=jax.random.fold_in(key, 1), objective=objective, progress=False)
                wall = time.perf_counter() - t0
                ev_c, warned_c = evidence(c, seed)
                sd_ratio = float(np.median(np.asarray(c.q.stddev) / np.asarray(e.q.stddev)))
                refused = c.stop_reason == "diverged" or warned_c
                trusted_e = not warned_e
                agree = abs(ev_c.estimate - ev_e.estimate) <= 4 * math.hypot(ev_c.se, ev_e.se) + 0.01
                outcome = "refused" if refused else ("works" if (agree or not trusted_e) else "SILENT MISS")
                row = {"target": name, "d": d, "objective": label, "seed": seed, "elbo_khat": ev_e.khat,
                       "elbo_logz": ev_e.estimate, "elbo_se": ev_e.se, "chi_stop": c.stop_reason,
                       "chi_khat": ev_c.khat, "chi_logz": ev_c.estimate, "chi_se": ev_c.se,
                       "sd_ratio": sd_ratio, "outcome": outcome, "wall": wall, "chi_steps": c.num_steps}
                if out is not None:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                stop = c.stop_reason.split(":")[0]
                print(f"| {name} | {d} | {label} | {seed} | {veil.diagnostics.format_khat(ev_e.khat)} | "
                      f"{ev_e.estimate:.3f} ± {ev_e.se:.3f} | {stop} ({c.num_steps}) | "
                      f"{veil.diagnostics.format_khat(ev_c.khat)} | {ev_c.estimate:.3f} ± {ev_c.se:.3f} | "
                      f"{sd_ratio:.2f} | {outcome} | {wall:.1f} |", flush=True)
    if out is not None:
        out.close()


if __name__ == "__main__":
    main()
