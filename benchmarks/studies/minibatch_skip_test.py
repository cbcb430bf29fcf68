"""The cost of the driver's skip test in a minibatch step (issue 5, docs/benchmarks/minibatch-vi-scale.md).

    python -m benchmarks.studies.minibatch_skip_test

Logistic regression as in ``minibatch.py`` (d = 10, B = 4096, mean-field, one draw, Adam),
veil's own loss and batch source (``veil.fit._VILoss`` on ``Target.minibatched``) in a loop
shaped like the driver's (blocks of 128 steps, keys by ``fold_in``), 3,000 steps, us per step
(medians of 3 interleaved calls), at n = 1e5 and 1e6:

* ``nested``: the update alone;
* ``nested+v-out``: the update and the loss value, summed over the steps (no test);
* ``nested+ok-out``: also the driver's test ``ok = isfinite(loss + sum(grads))``, counted but
  not used to gate the update;
* ``nested+where``: the update kept only where ``ok`` (``where`` on each leaf);
* ``nested+cond``: the same with ``lax.cond``, as the driver does on CPU (not in the default
  list below; add it to ``MODES``);
* ``veil.fit``: ``minibatch.veil_tool``.
"""
import time
import numpy as np
import jax
import jax.numpy as jnp
import optax
import equinox as eqx
from benchmarks.peers import minibatch as M
from benchmarks.studies.minibatch_pieces import veil_loss
MODES = ("nested", "nested+v-out", "nested+ok-out", "nested+where")


def tool(X, y, B, mode):
    loss, params = veil_loss(X, y, B)
    opt = optax.adam(M.STEP)
    @eqx.filter_jit
    def train(loss, key, nsteps):
        src = loss.target.batches
        def step(carry, k):
            p, s, bs = carry
            batch, bs = src.next(bs)
            (v, _), g = eqx.filter_value_and_grad(loss, has_aux=True)(p, k, batch=batch)
            if mode == "nested+cond":
                ok = jnp.isfinite(v + sum(jnp.sum(x) for x in jax.tree.leaves(g)))
                def upd(a):
                    p, s, g = a
                    u, s = opt.update(g, s, p)
                    return optax.apply_updates(p, u), s
                p, s = jax.lax.cond(ok, upd, lambda a: (a[0], a[1]), (p, s, g))
                return (p, s, bs), v
            if mode in ("nested+ok-out", "nested+v-out"):  # ok (or v alone) computed, not gating
                ok = jnp.isfinite(v + sum(jnp.sum(x) for x in jax.tree.leaves(g))) if mode == "nested+ok-out" else v
                u, s = opt.update(g, s, p)
                return (optax.apply_updates(p, u), s, bs), ok
            if mode == "nested+where":
                ok = jnp.isfinite(v + sum(jnp.sum(x) for x in jax.tree.leaves(g)))
                u, s2 = opt.update(g, s, p)
                new = (optax.apply_updates(p, u), s2)
                p, s = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, (p, s))
                return (p, s, bs), v
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s, bs), v
        init = (params, opt.init(params), src.init(key))
        if mode == "scan":
            (p, *_), _ = jax.lax.scan(step, init, jax.random.split(key, 3000))
        elif mode == "fori":
            (p, *_) = jax.lax.fori_loop(0, nsteps, lambda i, c: step(c, jax.random.fold_in(key, i))[0], init)
        else:  # nested, as the driver: blocks of 128 (optionally with the skip's cond)
            def block(b, c):
                keys = jax.vmap(lambda j: jax.random.fold_in(key, b * 128 + j))(jnp.arange(128))
                return jax.lax.fori_loop(0, jnp.minimum(128, nsteps - b * 128), lambda j, cc: step(cc, keys[j])[0], c)
            if mode in ("nested+ok-out", "nested+v-out"):
                def block2(b, c):
                    keys = jax.vmap(lambda j: jax.random.fold_in(key, b * 128 + j))(jnp.arange(128))
                    def inner(j, cc):
                        st, cnt = cc
                        st, ok = step(st, keys[j])
                        return st, cnt + ok
                    return jax.lax.fori_loop(0, jnp.minimum(128, nsteps - b * 128), inner, c)
                zero = jnp.zeros((), jnp.float32 if mode == 'nested+v-out' else jnp.int32)
                (p, *_), cnt = jax.lax.fori_loop(0, (nsteps + 127) // 128, block2, (init, zero))
                return p, cnt
            (p, *_) = jax.lax.fori_loop(0, (nsteps + 127) // 128, block, init)
        return p
    return lambda seed=0: jax.block_until_ready(train(loss, jax.random.key(seed), jnp.int32(3000)))
def main():
    for n in (100_000, 1_000_000):
        X, y = M.make_data(n, 10)
        tools = {m: tool(X, y, 4096, m) for m in MODES}
        tools["veil.fit"] = lambda seed=0, r=M.veil_tool(X, y, 4096): r(3000, seed)
        for f in tools.values():
            f()
            f()
        res = {k: [] for k in tools}
        for r in range(3):
            for k, f in tools.items():
                t0 = time.perf_counter()
                f(r)
                res[k].append(1e3 * (time.perf_counter() - t0) / 3)
        print(n, {k: round(float(np.median(v)), 1) for k, v in res.items()}, "us/step")


if __name__ == "__main__":
    main()
