"""One table of every family on every Inference Gym target, from the other scripts' rows.

    python -m benchmarks.studies.grid benchmarks/results/pathfinder/pathfinder_2026-11-26.jsonl \
        benchmarks/results/flows/flows_2026-11-26.jsonl benchmarks/results/mixflow/mixflow_2026-11-26.jsonl ...

Reads the JSON lines written by ``pathfinder.py``, ``flows.py`` and ``mixflow.py`` (same
targets, same accuracy measures: ``time_to_accuracy.accuracy``) and prints, per target, the
median over seeds of each tool's worst mean error and sd ratios against Inference Gym's ground
truth, its gradient evaluations and wall time. ``veil-fullrank`` pools the FullRank fits of all
scripts (``pathfinder.py`` calls it ``veil-fit``); Pathfinder rows are the best path's Gaussian
(``veil-pf4``: four paths; ``blackjax-pf1``: BlackJAX's single path).
"""

from __future__ import annotations

import json
import sys

ORDER = ["veil-fullrank", "veil-coupling", "veil-iaf", "veil-semi-implicit", "veil-mixflow", "veil-mixflow-fr",
         "veil-pf4", "blackjax-pf1", "numpyro-iaf", "numpyro-bnaf"]
RENAME = {"veil-fit": "veil-fullrank"}


def main(paths):
    import numpy as np

    rows = []
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            r["tool"] = RENAME.get(r["tool"], r["tool"])
            rows.append(r)
    print("| target (dim) | tool | max err/sd | sd ratio [min, med] | grad evals | wall (s) | seeds |")
    print("|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["target"] for r in rows):
        for tool in ORDER:
            rs = [r for r in rows if r["target"] == name and r["tool"] == tool]
            if not rs:
                continue
            med = lambda f: float(np.median([r[f] for r in rs]))  # noqa: E731
            print(f"| {name} ({rs[0]['dim']}) | {tool} | {med('max_err'):.3f} | [{med('sd_ratio_min'):.2f}, "
                  f"{med('sd_ratio_median'):.2f}] | {med('grad_evals'):.3g} | {med('wall'):.2f} | {len(rs)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
