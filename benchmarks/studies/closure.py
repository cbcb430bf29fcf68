"""A plain log density that closes over its data: time to a first fit, with veil lifting the
closed-over arrays out of the program (the default) and with them embedded as constants.

    python -m benchmarks.studies.closure [--n 1e6] [--d 100] [--steps 5]

``jax.jit`` embeds the arrays a traced function closes over into the program as literal
constants: compile time and memory grow with the data. ``Target.from_logdensity`` traces the
function once and passes arrays over 1 MiB to the program as inputs instead
(``veil.target.core._hoist``). Each row: wall time of ``veil.fit`` for a few steps (nearly all of
it compilation), in a fresh process per setting so no compiled program is reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import jax


def one(n: int, d: int, steps: int, hoist: bool) -> dict:
    import jax.numpy as jnp

    import veil
    import veil.target

    if not hoist:
        veil.target.core._HOIST_BYTES = 1 << 62
    X = jax.random.normal(jax.random.key(0), (n, d))
    y = (X[:, 0] > 0).astype(jnp.float32)

    def logp(z):
        f = X @ z
        return jnp.sum(y * f - jnp.logaddexp(0.0, f)) - 0.5 * jnp.sum(z**2)

    t0 = time.perf_counter()
    target = veil.Target.from_logdensity(logp, dim=d)
    res = veil.fit(target, veil.MeanField(d), key=jax.random.key(0), max_steps=steps, stop=None, progress=False)
    jax.block_until_ready(res.q.mean)
    return {"n": n, "d": d, "data_MB": round(X.nbytes / 1e6), "hoisted": hoist,
            "fit_s": round(time.perf_counter() - t0, 2), "mean0": float(res.q.mean[0])}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", default="1e6")
    p.add_argument("--d", type=int, default=100)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    args = p.parse_args()
    n = int(float(args.n))
    if args.one:
        print(json.dumps(one(n, args.d, args.steps, args.one == "on")))
        return
    print(json.dumps({"jax": jax.__version__, "devices": str(jax.devices())}))
    rows = []
    for setting in ("on", "off"):
        out = subprocess.run([sys.executable, "-m", __spec__.name, "--n", args.n, "--d", str(args.d), "--steps",
                              str(args.steps), "--one", setting], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"embedded_over_hoisted": round(rows[1]["fit_s"] / rows[0]["fit_s"], 1),
                      "same_fit": rows[0]["mean0"] == rows[1]["mean0"]}))


if __name__ == "__main__":
    main()
