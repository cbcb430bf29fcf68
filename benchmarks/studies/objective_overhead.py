"""Per-step cost of each objective in veil against the same estimator written by hand.

    python -m benchmarks.studies.objective_overhead [--steps 4000] [--reps 5]

Problem: Bayesian logistic regression, n = 1000 synthetic rows, d = 25, MeanField q, Adam(1e-2),
a fixed number of steps, no stopping rule (the engine_overhead.py problem "mf25"). For each
objective/estimator, veil's ``fit`` (generic estimator code: DReG's coefficients come from
``jax.grad``/``jax.jvp`` of the reduction) runs beside a hand-written fused ``lax.scan`` loop
with the estimator's closed-form coefficients written out. Both are warmed up (compiled) first;
then calls alternate, ``--reps`` of each, and the table gives the median time per step and the
ratio veil / hand.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import logsumexp

import veil

D, N_OBS, LR = 25, 1000, 1e-2


def problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(N_OBS, D)), jnp.float32)
    w = rng.normal(size=D).astype(np.float32) * 0.5
    y = jnp.asarray(rng.uniform(size=N_OBS) < 1 / (1 + np.exp(-np.asarray(x) @ w)), jnp.float32)

    def log_p(z):
        logits = x @ z
        return jnp.sum(y * logits - jnp.logaddexp(0.0, logits)) - 0.5 * jnp.sum(z**2)

    return log_p


def lme(x):
    return logsumexp(x) - math.log(x.shape[0])


def hand_losses(log_p):
    """Each estimator by hand: (loss whose value is the objective, whose gradient is the
    estimator's), with params (loc, log_scale) of a diagonal Gaussian."""
    sg = jax.lax.stop_gradient

    def draws(p, key, n, stop_z=False):
        loc, log_s = p
        eps = jax.random.normal(key, (n, D))
        z = loc + jnp.exp(log_s) * eps
        z = sg(z) if stop_z else z
        log_q_stop = jnp.sum(-0.5 * ((z - sg(loc)) / jnp.exp(sg(log_s))) ** 2 - sg(log_s), -1)
        log_q = jnp.sum(-0.5 * ((z - loc) / jnp.exp(log_s)) ** 2 - log_s, -1)
        return z, jax.vmap(log_p)(z), log_q_stop, log_q

    def elbo_stl(p, key):
        _, lp, lqs, _ = draws(p, key, 4)
        return -jnp.mean(lp - lqs)

    def iwae_dreg(p, key):
        _, lp, lqs, _ = draws(p, key, 8)
        path = lp - lqs
        s = jax.nn.softmax(sg(path))
        return -lme(sg(path)) - jnp.sum(sg(s**2) * (path - sg(path)))

    def renyi_dreg(p, key, a=0.5):
        _, lp, lqs, _ = draws(p, key, 8)
        path = lp - lqs
        s = jax.nn.softmax((1 - a) * sg(path))
        coef = s - (1 - a) * (s - s**2)
        return -lme((1 - a) * sg(path)) / (1 - a) - jnp.sum(sg(coef) * (path - sg(path)))

    def chi_dreg(p, key):
        _, lp, lqs, _ = draws(p, key, 16)
        path = lp - lqs
        s = jax.nn.softmax(2 * sg(path))
        sur = -jnp.sum(sg(s - s**2) * path)
        return 0.5 * lme(2 * sg(path)) + sur - sg(sur)

    def fkl_dreg(p, key):
        _, lp, lqs, lq = draws(p, key, 8)
        path = lp - lqs
        s = jax.nn.softmax(sg(path))
        sur = -jnp.sum(sg(s - s**2) * path)
        return -jnp.sum(s * sg(lq)) + sur - sg(sur)

    def elbo_score(p, key):
        n = 4
        _, lp, _, lq = draws(p, key, n, stop_z=True)
        lw_path = lp - lq
        lw = sg(lw_path)
        signal = (lw - (jnp.sum(lw) - lw) / (n - 1)) / n
        sur = jnp.mean(lw_path) + jnp.sum(sg(signal) * lq)
        return -(jnp.mean(lw) + sur - sg(sur))

    return {
        "ELBO(4), STL": (veil.ELBO(num_samples=4), elbo_stl),
        "IWAE(8), DReG": (veil.IWAE(k=8), iwae_dreg),
        "Renyi(0.5, 8), DReG": (veil.Renyi(alpha=0.5, k=8), renyi_dreg),
        "ChiSquare(16), DReG": (veil.ChiSquare(k=16), chi_dreg),
        "ForwardKL(8), DReG": (veil.ForwardKL(k=8), fkl_dreg),
        "ELBO(4), score + LOO": (veil.ELBO(num_samples=4, estimator=veil.ScoreFunction()), elbo_score),
    }


def make_hand(loss, steps):
    opt = optax.adam(LR)
    params = (jnp.zeros(D), jnp.full(D, jnp.log(0.1)))

    @jax.jit
    def run(key):
        def step(carry, k):
            p, s = carry
            v, g = jax.value_and_grad(loss)(p, k)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), v

        (p, _), losses = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, steps))
        return p, losses

    return lambda seed: jax.block_until_ready(run(jax.random.key(seed)))


def make_veil(objective, target, steps):
    opt = optax.adam(LR)
    q = veil.MeanField(D)

    def run(seed):
        res = veil.fit(target, q, key=jax.random.key(seed), objective=objective, optimizer=opt,
                       max_steps=steps, stop=None, progress=False)
        return jax.block_until_ready(res.q)

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    log_p = problem()
    target = veil.Target.from_logdensity(log_p, dim=D)
    print("| objective, estimator | hand (µs/step) | veil (µs/step) | veil / hand |")
    print("|---|---|---|---|")
    for name, (objective, hand_loss) in hand_losses(log_p).items():
        runs = {"hand": make_hand(hand_loss, args.steps), "veil": make_veil(objective, target, args.steps)}
        for f in runs.values():
            f(0)  # compile
        times = {k: [] for k in runs}
        for rep in range(args.reps):
            for k, f in runs.items():
                t0 = time.perf_counter()
                f(rep + 1)
                times[k].append((time.perf_counter() - t0) / args.steps * 1e6)
        h, v = np.median(times["hand"]), np.median(times["veil"])
        print(f"| {name} | {h:.1f} | {v:.1f} | {v / h:.2f} |", flush=True)


if __name__ == "__main__":
    main()
