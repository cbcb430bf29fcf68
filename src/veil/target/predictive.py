"""Predictive draws and pointwise log likelihoods of a NumPyro model, for any veil result.

Everything here works from *constrained* draws of the latent sites (a result's ``draws``), so
every method's result (a fit, Pathfinder's, particles') gets the same predictive checks. The
machinery is NumPyro's own: :class:`numpyro.infer.Predictive` runs the model forward with the
latent sites substituted, :func:`numpyro.infer.util.log_likelihood` scores the observed sites
draw by draw. veil adds one handler, :class:`_Unobserved`, which lets the observed sites be
drawn again rather than returned as the data (NumPyro's ``Predictive`` returns an observed
site's data unless the model is called with ``obs=None``).

The model runs with its parameters at the target's values (``numpyro.param`` sites) and its
subsampled plate, if any, over all rows: a predictive check or LOO is about the whole data set.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from numpyro import handlers
from numpyro.infer import Predictive
from numpyro.infer.util import log_likelihood
from numpyro.primitives import Messenger

__all__ = ["predictive", "prior_predictive", "pointwise_log_likelihood", "observed_data", "check_numpyro"]


class _Unobserved(Messenger):
    """Observed sample sites become latent ones: drawn from their distribution, the data ignored."""

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["value"] = None
            msg["is_observed"] = False


def _unobserved(model):
    def forward(*args, **kwargs):
        with _Unobserved():
            return model(*args, **kwargs)

    return forward


def check_numpyro(target, what: str) -> None:
    """Raise ``NotImplementedError`` for a target that is not a NumPyro model, naming what to use."""
    if target.kind != "numpyro":
        hint = {
            "pymc": " For a PyMC model: pm.sample_posterior_predictive(res.to_arviz(...), model=model).",
            "stan": " For a Stan model: its generated quantities block, run on res.draws(...).",
        }.get(target.kind, " A plain log density has no generative model to run forward.")
        raise NotImplementedError(f"{what} runs a NumPyro model forward; this target is {target.kind!r}.{hint}")


def _full_model(target):
    """The target's model on all rows of its subsampled plate, with its parameters at their values,
    run forward: its discrete latents drawn, not enumerated (given the continuous ones, a draw
    of them is a draw of the model's own)."""
    return dataclasses.replace(target, rows=None, enum_dim=None)._model()


def _args(target, args, kwargs):
    """The model's arguments: those given, else the target's own data."""
    if args or kwargs:
        return tuple(args), dict(kwargs)
    return target.data


def _latent_only(target, draws: dict) -> dict:
    """The draws of the target's latent sites (deterministic sites are recomputed by the model)."""
    latent = {s.name for s in (*target.sites, *target.local_sites)}
    return {k: v for k, v in draws.items() if k in latent}


def predictive(target, draws: dict, key: jax.Array, args=(), kwargs=None) -> dict[str, jax.Array]:
    """The observed sites (and deterministic sites) drawn by running the model forward once per
    row of ``draws`` (constrained latent values, ``name -> [n, ...]``), each draw its own key;
    the model's arguments ``args`` / ``kwargs``, else the data it was fitted to."""
    check_numpyro(target, "A predictive draw")
    args, kwargs = _args(target, args, kwargs or {})
    latent = _latent_only(target, draws)
    run = Predictive(_unobserved(_full_model(target)), posterior_samples=latent, batch_ndims=1)
    return {k: v for k, v in run(key, *args, **kwargs).items() if k not in latent}


def prior_predictive(target, key: jax.Array, num_samples: int, args=(), kwargs=None) -> dict[str, jax.Array]:
    """``num_samples`` runs of the model forward from its prior: every latent, observed and
    deterministic site, ``name -> [num_samples, ...]``."""
    check_numpyro(target, "A prior predictive draw")
    args, kwargs = _args(target, args, kwargs or {})
    return Predictive(_unobserved(_full_model(target)), num_samples=num_samples)(key, *args, **kwargs)


def pointwise_log_likelihood(target, draws: dict) -> dict[str, np.ndarray]:
    """``log p(y_i | z)`` of every observed value under every draw: ``site -> [n, *site shape]``
    (unscaled: each observation's own term, as LOO and WAIC need them)."""
    check_numpyro(target, "A pointwise log likelihood")
    args, kwargs = target.data
    out = log_likelihood(_full_model(target), _latent_only(target, draws), *args, parallel=True, **kwargs)
    return {k: np.asarray(v) for k, v in out.items()}


def observed_data(target) -> dict[str, np.ndarray]:
    """The observed sites' values in the data the target holds."""
    check_numpyro(target, "Observed data")
    args, kwargs = target.data
    tr = handlers.trace(handlers.seed(_full_model(target), rng_seed=0)).get_trace(*args, **kwargs)
    return {k: np.asarray(s["value"]) for k, s in tr.items() if s["type"] == "sample" and s["is_observed"]}

