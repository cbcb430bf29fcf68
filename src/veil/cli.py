"""Command line: ``veil demo``, ``veil fit FILE.py:model --data FILE`` and ``veil --version``.

``veil fit`` fits a NumPyro model written in a Python file, as a Stan user runs a ``.stan``
file on a data file: ``veil fit model.py:model --data data.json`` prints the posterior
summary and the verdict, and ``--out draws.csv`` (or ``.nc``, ArviZ's NetCDF) writes draws.
The data file's entries are the model's keyword arguments: a JSON object (Stan's data
format: numbers and nested lists), a NumPy ``.npz`` archive, or a CSV file with a header
row (one argument per column). A Stan program is fitted the same way:
``veil fit model.stan --data data.json`` (``pip install 'veil[stan]'``; the data in Stan's
JSON format, as for CmdStan).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import jax
import numpy as np

from veil.demo import run_demo
from veil.families.gaussian import FullRank, LowRank, MeanField
from veil.fit import fit
from veil.result import _flat_columns
from veil.target import Target

FAMILIES = ("fullrank", "meanfield", "lowrank")


def _version() -> str:
    try:
        return version("veil")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="veil", description="veil: variational approximation in JAX")
    parser.add_argument("--version", action="version", version=f"veil {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit eight schools and German credit, compare with NUTS")
    demo.add_argument("--max-steps", type=int, default=20_000, help="cap on steps per fit")
    demo.add_argument("--out", default="veil_demo.png", help="PNG of traces and marginals ('' for none)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    fit_cmd = sub.add_parser("fit", help="fit a NumPyro model in a Python file: veil fit model.py:model --data data.json")
    fit_cmd.add_argument("model", help="FILE.py:NAME, a NumPyro model function NAME defined in FILE.py, "
                                   "or FILE.stan, a Stan program")
    fit_cmd.add_argument("--data", help="the model's keyword arguments: .json (an object), .npz or .csv (a header row)")
    fit_cmd.add_argument("--family", choices=FAMILIES, default="fullrank", help="the variational family (default fullrank)")
    fit_cmd.add_argument("--rank", type=int, default=4, help="rank of --family lowrank (default 4)")
    fit_cmd.add_argument("--seed", type=int, default=0, help="the fit's key: jax.random.key(seed)")
    fit_cmd.add_argument("--max-steps", type=int, default=20_000, help="cap on optimisation steps")
    fit_cmd.add_argument("--draws", type=int, default=4000, help="draws written with --out (default 4000)")
    fit_cmd.add_argument("--out", help="write draws: .csv (one column per constrained scalar) or .nc (ArviZ NetCDF)")
    fit_cmd.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            run_demo(max_steps=args.max_steps, out=args.out or None, seed=args.seed,
                     progress=not args.no_progress)
            return 0
        return run_fit(args)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        print(f"veil {args.command}: error: {e}", file=sys.stderr)
        return 2


def run_fit(args) -> int:
    """``veil fit``: every input checked before the fit; exit status 0 for a fit the verdict
    trusts, 1 for one it does not (so scripts can tell), 2 for bad input."""
    if args.out is not None and os.path.splitext(args.out)[1] not in (".csv", ".nc"):
        raise ValueError(f"--out must end in .csv or .nc, got {args.out!r}.")
    if args.out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise ValueError(f"--out {args.out}: the folder {os.path.dirname(os.path.abspath(args.out))} does not exist.")
    if args.draws < 1 or args.max_steps < 1:
        raise ValueError("--draws and --max-steps must be positive.")
    stan = args.model.endswith(".stan")
    if stan:
        if not os.path.isfile(args.model):
            raise FileNotFoundError(f"No Stan program {args.model!r}.")
        if args.data and not args.data.endswith(".json"):
            raise ValueError(f"A Stan program's data must be a .json file (Stan's JSON data format), got {args.data!r}.")
        if args.data and not os.path.isfile(args.data):
            raise FileNotFoundError(f"No data file {args.data!r}.")
    else:
        model = load_model(args.model)
        data = load_data(args.data) if args.data else {}

    target = (Target.from_stan(args.model, args.data) if stan
              else Target.from_numpyro(model, **data))
    q = {"fullrank": lambda: FullRank(target.dim), "meanfield": lambda: MeanField(target.dim),
         "lowrank": lambda: LowRank(target.dim, min(args.rank, target.dim))}[args.family]()
    res = fit(target, q, key=jax.random.key(args.seed), max_steps=args.max_steps,
              progress=not args.no_progress)
    summary = res.summary()
    print(summary)
    if args.out is not None:
        _write_draws(res, args.out, args.draws, jax.random.key(args.seed + 1))
        print(f"{args.draws} draws written to {os.path.abspath(args.out)}")
    return 0 if summary.trustworthy else 1


def load_model(spec: str):
    """The function ``NAME`` of ``FILE.py`` for ``spec = "FILE.py:NAME"``."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"The model must be given as FILE.py:NAME (e.g. model.py:model), got {spec!r}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model file {path!r}.")
    module_spec = importlib.util.spec_from_file_location(f"veil_user_model_{abs(hash(path))}", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{path!r} is not a Python file.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    model = getattr(module, name, None)
    if not callable(model):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ValueError(f"{path} defines no function {name!r}; it defines: {', '.join(found) or 'none'}.")
    return model


def load_data(path: str) -> dict:
    """The model's keyword arguments from a ``.json``, ``.npz`` or ``.csv`` file, as arrays
    (integers stay integers: index arrays, counts)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No data file {path!r}.")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        with open(path) as fh:
            raw = json.load(fh)
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object (name -> value), got a {type(raw).__name__}.")
        out = {}
        for k, v in raw.items():
            a = np.asarray(v)
            if a.dtype.kind not in "biuf":
                raise ValueError(f"Data entry {k!r} in {path} is not numeric (got {a.dtype}); "
                                 "give numbers, or lists of numbers of one shape.")
            out[k] = a
        return out
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    if ext == ".csv":
        table = np.genfromtxt(path, delimiter=",", names=True)
        if table.dtype.names is None:
            raise ValueError(f"{path} needs a header row naming its columns.")
        return {k: np.asarray(table[k]) for k in table.dtype.names}
    raise ValueError(f"The data file must end in .json, .npz or .csv, got {path!r}.")


def _write_draws(res, out: str, n: int, key) -> None:
    if out.endswith(".nc"):
        res.to_arviz(n, key=key).to_netcdf(out)
        return
    names, x = _flat_columns({k: np.asarray(v) for k, v in res.draws(n, key=key).items()})
    np.savetxt(out, x, delimiter=",", header=",".join(names), comments="")


if __name__ == "__main__":
    sys.exit(main())
