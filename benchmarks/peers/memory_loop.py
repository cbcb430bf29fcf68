"""Memory over many fits in one process: veil.fit vs NumPyro's SVI.run.

    python -m benchmarks.peers.memory_loop [--fits 1000] [--numpyro-fits 200]

Both fit a mean-field Gaussian to a 5-d logistic regression (n=200) for 200 steps per call,
a new seed each call, everything else fixed. Resident memory (VmRSS) and the number of memory
maps are read after 20 warm-up calls and then every 100 calls; the table gives the growth per
call over the measured calls. NumPyro is run for fewer calls: it was measured to die after
about 390 calls on this machine.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("VEIL_COMPILATION_CACHE", "0")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fits", type=int, default=1000)
    ap.add_argument("--numpyro-fits", type=int, default=200)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    import veil

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(200, 5)), jnp.float32)
    y = jnp.asarray(rng.uniform(size=200) < 0.5, jnp.float32)

    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([5]).to_event(1))
        numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)

    target = veil.Target.from_numpyro(model, x, y)
    q = veil.MeanField(target.dim)
    svi = SVI(model, AutoNormal(model), numpyro.optim.Adam(1e-2), Trace_ELBO())

    def veil_call(i):
        veil.fit(target, q, key=jax.random.key(i), max_steps=200, stop=None, progress=False)

    def numpyro_call(i):
        svi.run(jax.random.key(i), 200, x, y, progress_bar=False)

    rows = []
    for name, call, n in [("veil.fit", veil_call, args.fits), ("numpyro SVI.run", numpyro_call, args.numpyro_fits)]:
        for i in range(20):
            call(i)
        r0, m0 = rss_mib(), maps()
        trace = []
        for i in range(n):
            call(100 + i)
            if (i + 1) % 100 == 0:
                trace.append((i + 1, round(rss_mib() - r0, 1), maps() - m0))
        r1, m1 = rss_mib(), maps()
        rows.append({"tool": name, "fits": n, "rss_growth_mib": round(r1 - r0, 1),
                     "kib_per_fit": round(1024 * (r1 - r0) / n, 1), "maps_growth": m1 - m0,
                     "trace": trace})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| tool | fits measured | RSS growth (MiB) | per fit (KiB) | memory maps added |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['fits']} | {r['rss_growth_mib']} | {r['kib_per_fit']} | {r['maps_growth']} |")


if __name__ == "__main__":
    main()
