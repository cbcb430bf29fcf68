"""A new objective written as a program: the combined bound CIWAE.

    python examples/combined_bound.py [--max-steps 20000]

Rainforth et al. (2018, "Tighter Variational Bounds are Not Necessarily Better") show that the
tighter importance-weighted bound gives worse gradient signal for ``q`` and propose mixing it
with the ELBO on the *same* draws: ``CIWAE_b = b * ELBO_k + (1 - b) * IWAE_k``. It is not in
veil's menu. Written with the public primitive :func:`veil.estimate` as a reduction of the
draws' log weights, it gets every gradient estimator with no gradient code: ``Reparam``,
``ScoreFunction``, and ``DReG``, whose doubly reparameterised form veil derives from the
reduction itself (``tests/test_programmable.py`` checks that all three agree in mean). ``veil.fit``
takes the function as it is; here it is fitted to German-credit logistic regression.
"""

import argparse

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

import veil

BETA = 0.5
K = 8


def ciwae(log_weights, beta=BETA):
    """``beta * mean(log w) + (1 - beta) * log mean(w)``: the bound, to maximise."""
    return beta * jnp.mean(log_weights) + (1.0 - beta) * veil.log_mean_exp(log_weights)


def ciwae_loss(q, target, key, estimator=veil.DReG()):
    """The negative CIWAE bound of ``K`` shared draws, with ``estimator``'s gradient."""
    value, _ = veil.estimate(ciwae, q, target, key, K, estimator)
    return -value


def model(x, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]))
    numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-steps", type=int, default=20_000)
    args = ap.parse_args(argv)
    x, y = veil.demo.german_credit_data()
    target = veil.Target.from_numpyro(model, x, y)
    fits = {}
    for name, objective in (("ELBO", None), (f"CIWAE(beta={BETA}, k={K})", ciwae_loss)):
        res = veil.fit(target, veil.FullRank(target.dim), key=jax.random.key(0),
                       objective=objective, max_steps=args.max_steps, progress=False)
        fits[name] = res
        print(f"{name}: {res.num_steps} steps, {res.stop_reason.split(':')[0]}, "
              f"k-hat {res.khat:.2f}, ELBO {res.elbo:.2f}")
    sds = [float(jnp.median(r.q.stddev)) for r in fits.values()]
    print(f"median posterior sd: ELBO fit {sds[0]:.4f}, CIWAE fit {sds[1]:.4f} "
          "(the importance-weighted part widens q)")
    return fits


if __name__ == "__main__":
    main()
