"""Cost of a FullRank sticking-the-landing step on the CPU, piece by piece.

    python -m benchmarks.studies.fullrank_solve [--dims 100,501] [--steps 200] [--reps 5]

STL evaluates ``log q`` at stopped parameters on the draws, which for ``N(mu, L L^T)`` means
triangular solves with the ``dim x dim`` factor. On XLA:CPU those are LAPACK ``trsm`` calls
(SciPy's OpenBLAS). Each row is one compiled ``lax.scan`` of ``--steps`` steps of the same
algorithm (4 draws of ``veil.FullRank``, standard-normal log target so that the family's
cost is what is measured, plain gradient step), timed per step; variants:

* ``reparam``: log q from the noise, ``-|eps|^2/2 - sum(log_scale)``: no solve at all (the
  plain reparameterisation gradient; the floor);
* ``stl-L``: ``stop_gradient(q).log_prob(z)`` solving with ``L`` itself (veil before
  2026-11-27): two solves (the value's, and the transposed one of reverse mode), and XLA
  writes ``L`` transposed into LAPACK's column-major order first;
* ``stl-LT``: the same two solves handed ``L^T`` with ``trans="T"`` (a free relayout);
* ``stl-1``: :meth:`veil.FullRank.sample_with_stopped_log_prob`: the value from the noise,
  one solve with ``L^T`` for the gradient;
* ``+1thr``: the variant with BLAS limited to one thread (as ``veil.fit`` does during its
  loop, ``veil/_blas.py``).

Variants are interleaved within each repeat; medians over repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="100,501")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--draws", type=int, default=4)
    args = ap.parse_args()

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import threadpoolctl

    import veil
    from veil.family import stop_gradient
    from veil.families.gaussian import _std_normal_logpdf

    controller = threadpoolctl.ThreadpoolController()
    s = args.draws

    def log_p(z):
        return -0.5 * jnp.sum(z**2, -1)

    def reparam(q, k):
        z, lq = q.sample_and_log_prob(k, s)
        return jnp.mean(lq - log_p(z))

    def stl_l(q, k):  # the pre-2026-11-27 whiten: solve with L, row-major
        z = q.sample(k, s)
        qs = stop_gradient(q)
        r = (z - qs.loc) * jnp.exp(-qs.log_scale)
        eps = jax.scipy.linalg.solve_triangular(qs._unit(), r.T, lower=True, unit_diagonal=True).T
        lq = _std_normal_logpdf(eps) - jnp.sum(qs.log_scale)
        return jnp.mean(lq - log_p(z))

    def stl_lt(q, k):  # veil's log_prob now: the same two solves, handed L^T
        z = q.sample(k, s)
        return jnp.mean(stop_gradient(q).log_prob(z) - log_p(z))

    def stl_1(q, k):
        z, lq = q.sample_with_stopped_log_prob(k, s)
        return jnp.mean(lq - log_p(z))

    def compiled(loss):
        @jax.jit
        def run(q, key):
            def step(q, k):
                g = eqx.filter_grad(loss)(q, k)
                return jax.tree.map(lambda a, b: a - 1e-4 * b, q, g), None

            return jax.lax.scan(step, q, jax.random.split(key, args.steps))[0]

        return run

    variants = [("reparam", reparam), ("stl-L", stl_l), ("stl-LT", stl_lt), ("stl-1", stl_1)]
    print(f"# {platform.processor() or platform.machine()}, jax {jax.__version__}, "
          f"BLAS {[i['internal_api'] + ' ' + i['version'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']}")
    print(f"# {args.draws} draws per step, {args.steps} steps per call, median of {args.reps} repeats\n")
    print("| dim | variant | us/step (BLAS default threads) | us/step (1 BLAS thread) | vs stl-L default |")
    print("|---|---|---|---|---|")
    for d in [int(x) for x in args.dims.split(",")]:
        q = veil.FullRank(d)
        q = eqx.tree_at(lambda q: q.unit_tril, q, 0.3 * jax.random.normal(jax.random.key(1), (d, d)))
        fns = {name: compiled(f) for name, f in variants}
        for f in fns.values():  # compile outside the timing
            jax.block_until_ready(f(q, jax.random.key(0)))
        times = {(name, t): [] for name in fns for t in ("default", "one")}
        for rep in range(args.reps):
            for name, f in fns.items():
                for threads in ("default", "one"):
                    ctx = controller.limit(limits=1, user_api="blas") if threads == "one" else contextlib.nullcontext()
                    with ctx:
                        t0 = time.perf_counter()
                        jax.block_until_ready(f(q, jax.random.key(rep + 1)))
                        times[name, threads].append((time.perf_counter() - t0) / args.steps * 1e6)
        base = np.median(times["stl-L", "default"])
        for name in fns:
            a, b = np.median(times[name, "default"]), np.median(times[name, "one"])
            print(f"| {d} | {name} | {a:.0f} | {b:.0f} | {base / a:.2f}x / {base / b:.2f}x faster |")


if __name__ == "__main__":
    main()
