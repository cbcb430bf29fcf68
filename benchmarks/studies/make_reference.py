"""Make the NUTS reference summaries shipped for ``veil demo`` (src/veil/data/reference_*.json).

    python -m benchmarks.studies.make_reference            # both models, ~2-5 min on 2 cores

NumPyro NUTS in float64, 4 chains x (2,000 warm-up + 25,000 draws), target_accept 0.95, seed 2026.
Stores mean and sd of every constrained scalar (deterministic sites included), the split R-hat
and effective sample size range, and the versions used.
"""

import json
import os
import sys
import time

import numpyro

numpyro.enable_x64()
numpyro.set_host_device_count(4)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from numpyro.diagnostics import summary  # noqa: E402
from numpyro.infer import MCMC, NUTS  # noqa: E402

from veil.demo import MODELS  # noqa: E402
from veil.result import _flat_columns  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "src", "veil", "data")
CHAINS, WARMUP, DRAWS, SEED = 4, 2_000, 25_000, 2026


def main(names):
    for name in names:
        model, data = MODELS[name]
        args = [jax.numpy.asarray(a, jax.numpy.float64) for a in data()]
        t0 = time.time()
        mcmc = MCMC(NUTS(model, target_accept_prob=0.95), num_warmup=WARMUP, num_samples=DRAWS,
                    num_chains=CHAINS, chain_method="parallel", progress_bar=False)
        mcmc.run(jax.random.key(SEED), *args)
        samples = mcmc.get_samples(group_by_chain=True)
        stats = summary(samples)
        rhat = max(float(np.max(s["r_hat"])) for s in stats.values())
        ess = min(float(np.min(s["n_eff"])) for s in stats.values())
        flat = {k: np.asarray(v).reshape((-1,) + v.shape[2:]) for k, v in samples.items()}
        cols, x = _flat_columns(flat)
        divergences = int(mcmc.get_extra_fields()["diverging"].sum())
        ref = {
            "model": name,
            "method": f"NumPyro NUTS, float64, {CHAINS} chains x ({WARMUP} warm-up + {DRAWS} draws), "
                      f"target_accept_prob=0.95, seed {SEED}",
            "versions": {"numpyro": numpyro.__version__, "jax": jax.__version__},
            "max_split_rhat": rhat, "min_ess": ess, "divergences": divergences,
            "mean": dict(zip(cols, map(float, x.mean(0)))),
            "sd": dict(zip(cols, map(float, x.std(0, ddof=1)))),
        }
        with open(os.path.join(OUT, f"reference_{name}.json"), "w") as f:
            json.dump(ref, f, indent=1)
        print(f"{name}: {time.time() - t0:.0f} s, max R-hat {rhat:.4f}, min ESS {ess:.0f}, "
              f"divergences {divergences}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
