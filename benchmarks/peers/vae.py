"""A variational autoencoder on Fashion-MNIST, per step: veil, a hand-written fused scan, NumPyro.

    python -m benchmarks.peers.vae [--batch 128] [--repeats 3] [--s1 100] [--s2 400]
                                   [--accuracy-steps 3000] [--out results/vae/vae.jsonl]

Needs Fashion-MNIST: ``apt-get install dataset-fashion-mnist`` (files under
``/usr/share/datasets/fashion-mnist``); ``--synthetic N`` uses N random binary images instead.

The work, identical for the three tools: NumPyro's VAE example model (examples/vae.py): 784
binarised pixels (> 0.5), z of 50 dimensions, N(0, I) prior; decoder 50 -> 400 (softplus) ->
784 (sigmoid), Bernoulli likelihood; encoder 784 -> 400 (softplus) -> 100 (a location and a
log-scale per dimension); the ELBO with one draw per row; Adam 1e-3 on both networks; 128 rows
a step, drawn from the 60,000 training images (each tool its own way: one epoch a permutation).

* ``veil``: the model with ``numpyro.plate("data", 60000, subsample_size=128)``, the decoder
  registered by ``numpyro.contrib.module.eqx_module``, fitted with
  ``veil.Amortized(encoder, veil.MeanField(50), data=x)``, ``stop=None``;
* ``fused``: the same ELBO and Adam step written by hand with equinox and optax, one
  ``jax.jit``-ed ``lax.scan`` over the steps, rows by ``jax.random.permutation`` per epoch;
* ``numpyro-run`` / ``numpyro-update``: the same model, its guide written as NumPyro's example
  writes it (the encoder by ``eqx_module``, ``Normal(loc, exp(log_scale))``), ``SVI`` with
  ``Trace_ELBO()``: ``svi.run`` (one compiled ``fori_loop``) and a Python loop over a jitted
  ``svi.update``.

Per-step time: ``(t(S2) - t(S1)) / (S2 - S1)`` of warm runs; medians over repeats, the tools
interleaved, in reversed order every other repeat. Accuracy: each tool's full-data ELBO
estimate (one draw per image, every training image, nats per image) after ``--accuracy-steps``
steps from the same networks (``--accuracy-seeds k``: k fits per tool, seeds 0..k-1, for the
seed-to-seed spread the tools' differences are read against).
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

FASHION = Path("/usr/share/datasets/fashion-mnist")
Z, HIDDEN, PIXELS, STEP = 50, 400, 784, 1e-3


def load_images(synthetic: int = 0) -> np.ndarray:
    """The 60,000 training images, binarised (float32 0/1), or ``synthetic`` random ones."""
    if synthetic:
        return (np.random.default_rng(0).random((synthetic, PIXELS)) < 0.3).astype(np.float32)
    path = FASHION / "train-images-idx3-ubyte.gz"
    if not path.exists():
        raise SystemExit("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (or --synthetic N).")
    with gzip.open(path) as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, PIXELS)
    return (raw / 255.0 > 0.5).astype(np.float32)


class Decoder(eqx.Module):
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.hidden, self.out = eqx.nn.Linear(Z, HIDDEN, key=k1), eqx.nn.Linear(HIDDEN, PIXELS, key=k2)

    def __call__(self, z):  # logits of the pixels
        return self.out(jax.nn.softplus(self.hidden(z)))


class Encoder(eqx.Module):
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.hidden, self.out = eqx.nn.Linear(PIXELS, HIDDEN, key=k1), eqx.nn.Linear(HIDDEN, 2 * Z, key=k2)

    def __call__(self, x):  # (loc, log-scale offset) of q(z | x)
        return self.out(jax.nn.softplus(self.hidden(x)))


def make_model(n: int, batch: int, decoder: Decoder):
    import numpyro
    import numpyro.distributions as dist
    from numpyro.contrib.module import eqx_module

    def vae(x):
        decode = eqx_module("decoder", decoder)
        with numpyro.plate("data", n, subsample_size=batch) as idx:
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([Z]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=jax.vmap(decode)(z)).to_event(1), obs=x[idx])

    return vae


def veil_tool(x, model, encoder):
    import veil

    target = veil.Target.from_numpyro(model, jnp.asarray(x))
    guide = veil.Amortized(encoder, veil.MeanField(Z, init_scale=1.0), data=jnp.asarray(x))
    opt = optax.adam(STEP)

    def run(steps, seed=0):
        res = veil.fit(target, guide, key=jax.random.key(seed), optimizer=opt, max_steps=steps, stop=None,
                       progress=False)
        return res.params["decoder$params"], res.local.encoder

    return run


def _neg_elbo(dec, enc, xb, key, n):
    """The minibatch negative ELBO: (n / B) sum over the batch, one draw per row."""
    out = jax.vmap(enc)(xb)
    loc, log_scale = out[:, :Z], out[:, Z:]
    eps = jax.random.normal(key, loc.shape)
    z = loc + jnp.exp(log_scale) * eps
    logits = jax.vmap(dec)(z)
    log_lik = -jnp.sum(optax.sigmoid_binary_cross_entropy(logits, xb), axis=1)
    log_prior = -0.5 * jnp.sum(z**2, axis=1)
    log_q = -0.5 * jnp.sum(eps**2, axis=1) - jnp.sum(log_scale, axis=1)  # the 2 pi terms cancel
    return -(n / xb.shape[0]) * jnp.sum(log_lik + log_prior - log_q)


def fused_tool(x, decoder, encoder, batch):
    n = x.shape[0]
    opt = optax.adam(STEP)
    xs = jnp.asarray(x)
    per_epoch = n // batch

    @eqx.filter_jit
    def train(nets, key, steps: int):
        state = opt.init(eqx.filter(nets, eqx.is_inexact_array))

        def step(carry, i):
            nets, state, perm, key = carry
            key, k_perm, k_draw = jax.random.split(key, 3)
            perm = jax.lax.cond(i % per_epoch == 0, lambda: jax.random.permutation(k_perm, n), lambda: perm)
            rows = jax.lax.dynamic_slice(perm, ((i % per_epoch) * batch,), (batch,))
            grads = eqx.filter_grad(lambda nets: _neg_elbo(nets[0], nets[1], xs[rows], k_draw, n))(nets)
            updates, state = opt.update(grads, state, eqx.filter(nets, eqx.is_inexact_array))
            return (eqx.apply_updates(nets, updates), state, perm, key), None

        carry = (nets, state, jnp.arange(n), key)
        return jax.lax.scan(step, carry, jnp.arange(steps))[0][0]

    def run(steps, seed=0):
        nets = train((decoder, encoder), jax.random.key(seed), steps)
        jax.block_until_ready(nets)
        return nets

    return run


def numpyro_tools(x, model, encoder, batch):
    import numpyro
    import numpyro.distributions as dist
    from numpyro.contrib.module import eqx_module
    from numpyro.infer import SVI, Trace_ELBO

    n, xs = x.shape[0], jnp.asarray(x)

    def guide(x):
        encode = eqx_module("encoder", encoder)
        with numpyro.plate("data", n, subsample_size=batch) as idx:
            out = jax.vmap(encode)(x[idx])
            numpyro.sample("z", dist.Normal(out[:, :Z], jnp.exp(out[:, Z:])).to_event(1))

    svi = SVI(model, guide, numpyro.optim.Adam(STEP), Trace_ELBO())

    def nets(params):
        return params["decoder$params"], params["encoder$params"]

    def run(steps, seed=0):
        return nets(svi.run(jax.random.key(seed), steps, xs, progress_bar=False).params)

    update = jax.jit(svi.update)

    def loop(steps, seed=0):
        state = svi.init(jax.random.key(seed), xs)
        for _ in range(steps):
            state, _ = update(state, xs)
        jax.block_until_ready(state)
        return nets(svi.get_params(state))

    return {"numpyro-run": run, "numpyro-update": loop}


@eqx.filter_jit
def full_elbo(decoder, encoder, x, key):
    """The ELBO per image over every row of ``x`` (one draw each), in blocks of 1,000."""
    blocks = x.reshape(-1, 1000, PIXELS)
    keys = jax.random.split(key, blocks.shape[0])
    return -jnp.sum(jax.lax.map(lambda a: _neg_elbo(decoder, encoder, a[0], a[1], 1000), (blocks, keys))) / x.shape[0]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--s1", type=int, default=100)
    p.add_argument("--s2", type=int, default=400)
    p.add_argument("--accuracy-steps", type=int, default=3000)
    p.add_argument("--accuracy-seeds", type=int, default=1, help="fits per tool for the accuracy (seed-to-seed spread)")
    p.add_argument("--synthetic", type=int, default=0, help="N random binary images instead of Fashion-MNIST")
    p.add_argument("--tools", default="veil,fused,numpyro-run,numpyro-update")
    p.add_argument("--out", default="results/vae/vae.jsonl")
    args = p.parse_args()

    import numpyro

    x = load_images(args.synthetic)
    x = x[: (x.shape[0] // 1000) * 1000] if x.shape[0] >= 1000 else x
    kd, ke = jax.random.split(jax.random.key(0))
    decoder, encoder = Decoder(kd), Encoder(ke)
    model = make_model(x.shape[0], args.batch, decoder)
    all_tools = {"veil": veil_tool(x, model, encoder), "fused": fused_tool(x, decoder, encoder, args.batch),
                 **numpyro_tools(x, model, encoder, args.batch)}
    tools = {k: all_tools[k] for k in args.tools.split(",")}
    for run in tools.values():  # compile
        run(args.s1)
        run(args.s2)
    times = {name: [] for name in tools}
    order = list(tools)
    for r in range(args.repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            jax.block_until_ready(tools[name](args.s1))
            t1 = time.perf_counter()
            jax.block_until_ready(tools[name](args.s2))
            t2 = time.perf_counter()
            times[name].append(((t2 - t1) - (t1 - t0)) / (args.s2 - args.s1))
    xs = jnp.asarray(x)
    elbo, elbo_seeds = {}, {}
    if args.accuracy_steps and x.shape[0] % 1000 == 0:
        for name, run in tools.items():
            values = []
            for seed in range(args.accuracy_seeds):
                dec, enc = run(args.accuracy_steps, seed)
                values.append(round(float(full_elbo(dec, enc, xs, jax.random.key(9))), 2))
            elbo[name], elbo_seeds[name] = values[0], values
    ms = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
    row = {
        "benchmark": "vae", "images": int(x.shape[0]), "synthetic": bool(args.synthetic), "batch": args.batch,
        "ms_per_step": {k: round(v, 3) for k, v in ms.items()},
        "elbo_per_image_after": args.accuracy_steps, "elbo_per_image": elbo, "elbo_per_image_by_seed": elbo_seeds,
        "machine": platform.processor() or platform.machine(),
        "versions": {"jax": jax.__version__, "numpyro": numpyro.__version__, "equinox": eqx.__version__},
        "command": "python -m benchmarks.peers.vae " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
    }
    if "veil" in ms:
        for name in ms:
            if name != "veil":
                row[f"veil_over_{name.replace('-', '_')}"] = round(ms["veil"] / ms[name], 3)
    print(json.dumps(row, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
