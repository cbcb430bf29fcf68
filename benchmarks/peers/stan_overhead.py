"""What a Stan target costs per gradient in veil, against Stan's own gradient.

For each model, times (medians of repeats, microseconds per gradient):

* ``stan``: Stan's reverse-mode gradient alone, looped in C++ inside veil's bridge
  (``Model.log_density_grad`` on a batch of 256 points: one Python call, so the per-point
  time is Stan's own);
* ``veil b=1``: ``jax.jit(jax.grad(target.log_density))`` at one point (a JAX host callback
  and the conversions around it: the round trip's fixed cost);
* ``veil b=4`` / ``b=64``: the same under ``vmap`` on 4 (one step of the default ELBO) and 64
  points, per point: one round trip carries them all;
* ``httpstan``: httpstan's ``log_prob_grad(data, x)`` (a call from Python that rebuilds the
  model from its data each time), where requested with ``--httpstan``.

Run:  .venv/bin/python -m benchmarks.peers.stan_overhead [--repeats 7] [--httpstan]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np


def eight_schools():
    code = """
    data { int<lower=0> J; array[J] real y; array[J] real<lower=0> sigma; }
    parameters { real mu; real<lower=0> tau; vector[J] theta_tilde; }
    model { mu ~ normal(0, 5); tau ~ cauchy(0, 5); theta_tilde ~ normal(0, 1);
            y ~ normal(mu + tau * theta_tilde, sigma); }
    """
    return "eight schools (d=10)", code, {"J": 8, "y": [28.0, 8, -3, 7, -1, 1, 18, 12],
                                          "sigma": [15.0, 10, 16, 11, 9, 11, 10, 18]}


def regression():
    rng = np.random.default_rng(0)
    n, k = 5000, 25
    x = rng.normal(size=(n, k))
    y = x @ rng.normal(size=k) + rng.normal(size=n)
    code = """
    data { int N; int K; matrix[N, K] x; vector[N] y; }
    parameters { real alpha; vector[K] beta; real<lower=0> sigma; }
    model { alpha ~ normal(0, 10); beta ~ normal(0, 10); sigma ~ normal(0, 5);
            y ~ normal_id_glm(x, alpha, beta, sigma); }
    """
    return "regression 5,000 x 25 (d=27)", code, {"N": n, "K": k, "x": x, "y": y}


def _median_time(fn, repeats: int, inner: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--httpstan", action="store_true")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import veil

    print(f"# {platform.processor() or platform.machine()}, jax {jax.__version__}, veil {veil.__version__}")
    print(f"{'model':<30} {'stan':>8} {'veil b=1':>9} {'b=4':>8} {'b=64':>8} {'httpstan':>9}   (us per gradient)")
    for make in (eight_schools, regression):
        name, code, data = make()
        t = veil.Target.from_stan(code, data)
        d = t.dim
        rng = np.random.default_rng(1)
        z256 = rng.normal(0, 0.5, (256, d))
        model = t.source.model
        stan = _median_time(lambda: model.log_density_grad(z256), a.repeats, 3) / 256
        g1 = jax.jit(jax.grad(t.log_density))
        gb = jax.jit(jax.vmap(jax.grad(t.log_density)))
        z1 = jnp.asarray(z256[0], jnp.float32)
        z4 = jnp.asarray(z256[:4], jnp.float32)
        z64 = jnp.asarray(z256[:64], jnp.float32)
        for f, z in ((g1, z1), (gb, z4), (gb, z64)):
            jax.block_until_ready(f(z))  # compile
        b1 = _median_time(lambda: jax.block_until_ready(g1(z1)), a.repeats, 200)
        b4 = _median_time(lambda: jax.block_until_ready(gb(z4)), a.repeats, 100) / 4
        b64 = _median_time(lambda: jax.block_until_ready(gb(z64)), a.repeats, 20) / 64
        hs = float("nan")
        if a.httpstan:
            hs = _httpstan_time(code, data, z256[0], a.repeats)
        print(f"{name:<30} {1e6 * stan:8.1f} {1e6 * b1:9.1f} {1e6 * b4:8.1f} {1e6 * b64:8.1f} {1e6 * hs:9.1f}")


def _httpstan_time(code, data, x, repeats) -> float:
    import asyncio

    import httpstan.models

    asyncio.run(httpstan.models.build_services_extension_module(code))
    module = httpstan.models.import_services_extension_module(httpstan.models.calculate_model_name(code))
    data = {k: (np.asarray(v).tolist() if isinstance(v, (list, np.ndarray)) else v) for k, v in data.items()}
    x = list(map(float, x))
    return _median_time(lambda: module.log_prob_grad(data, x, True), repeats, 20)


if __name__ == "__main__":
    main()
