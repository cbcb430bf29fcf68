"""``Guide``: a variational family written as a NumPyro guide program, as Pyro and NumPyro users
write them (``numpyro.param`` for the variational parameters, ``numpyro.sample`` for each latent
site of the model).

veil fits the density of the unconstrained vector ``z`` the target lives on. A guide draws the
model's latent sites on their own (constrained) supports, so the family maps each draw ``x`` to
``z = T^{-1}(x)`` with the model's own transforms (NumPyro's ``biject_to`` of each site's
support) and carries the change of variables:

    log q_z(z) = log q_x(T(z)) + log |det dT/dz|.

NumPyro's handlers do the rest: ``seed`` and ``trace`` to draw (its distributions' own
reparameterised samplers, so path-wise gradients flow to the parameters), ``substitute`` and
``log_density`` to score a given ``z``. The guide's ``numpyro.param`` sites are the family's
parameters, unconstrained through their constraints, so any optax optimizer moves them freely;
every veil objective and estimator that needs only draws and ``log q`` applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.distributions import biject_to
from numpyro.infer.util import log_density

from veil.family import Family, MonteCarloMoments
from veil.target import Target
from veil.target.core import _constrained, _param_sites, _unflatten

__all__ = ["Guide"]


class _Args:
    """The guide's arguments, held as one static object (compared by identity): a family's
    floating-point arrays are its trainable parameters, and the data must not be among them.
    They are constants of the compiled program (a guide rarely reads their values)."""

    def __init__(self, data):
        self.data = data


class Guide(MonteCarloMoments, Family):
    """A NumPyro guide function as a veil family over ``target``'s unconstrained space.

    Args:
        guide: a function of the model's arguments with ``numpyro.param`` and
            ``numpyro.sample`` sites, one sample site per latent site of the model, with the
            same names.
        target: the :meth:`veil.Target.from_numpyro` target the guide is for (the guide is
            called with its arguments).

    Raises:
        ValueError: a guide sample site that the model does not have, a model latent site the
            guide does not sample, a guide without ``numpyro.param`` sites, or a guide
            parameter outside its constraint -- each before anything is compiled.
        TypeError: the target is not a NumPyro model.

    On a model with local latents (a subsampled plate) the guide draws them too, as a NumPyro
    user writes it (parameter tables of the plate's size, indexed by the plate's indices): veil
    sets its plate's rows to each batch's, as it does the model's, and fits it by the one-draw
    ELBO with NumPyro's own densities (a ``veil.LocalResult``).

    Examples:
        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, veil
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> def guide(y):
        ...     loc = numpyro.param("loc", 0.0)
        ...     scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
        ...     numpyro.sample("mu", dist.Normal(loc, scale))
        >>> t = veil.Target.from_numpyro(model, jnp.array([1.0, 2.0, 3.0]))
        >>> res = veil.fit(t, veil.Guide(guide, t), key=jax.random.key(0), progress=False)
        >>> round(float(res.q.constrained_params()["loc"]), 1)  # the posterior mean, 6 / 3.01
        2.0
    """

    params: dict
    dim: int = eqx.field(static=True)
    guide: Callable = eqx.field(static=True)
    param_sites: tuple = eqx.field(static=True)
    sites: tuple = eqx.field(static=True)  # the target's latent layout (veil.target.Site)
    supports: tuple = eqx.field(static=True)  # each site's support in the model, in that order
    args: Any = eqx.field(static=True)  # the guide's arguments (the model's), in an _Args
    num_data: int | None = eqx.field(static=True)  # the plate's rows, for a model with local latents

    def __init__(self, guide: Callable, target: Target):
        if not isinstance(target, Target) or target.kind != "numpyro":
            raise TypeError("veil.Guide needs the veil.Target.from_numpyro(model, ...) target it is a guide for.")
        if not callable(guide):
            raise TypeError(f"guide must be a NumPyro guide function, got {type(guide).__name__}.")
        args, kwargs = target.data
        tr = handlers.trace(handlers.seed(guide, rng_seed=0)).get_trace(*args, **kwargs)
        sampled = [n for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]]
        latent = [s.name for s in (*target.sites, *target.local_sites)]
        extra, missing = sorted(set(sampled) - set(latent)), [n for n in latent if n not in sampled]
        if extra:
            raise ValueError(f"The guide samples site(s) {', '.join(map(repr, extra))} that the model does not "
                             f"have as latent sites (the model's: {', '.join(map(repr, latent))}).")
        if missing:
            raise ValueError(f"The guide does not sample the model's latent site(s) {', '.join(map(repr, missing))}: "
                             "a guide draws every latent site, under the same name.")
        param_sites, params = _param_sites(tr)
        if params is None:
            raise ValueError("The guide has no numpyro.param site: nothing to fit.")
        model_tr = handlers.trace(handlers.seed(target._model(), rng_seed=0)).get_trace(*args, **kwargs)
        self.params = params
        self.dim = target.dim
        self.guide = guide
        self.param_sites = param_sites
        self.sites = target.sites
        self.supports = tuple(model_tr[s.name]["fn"].support for s in target.sites)
        self.args = _Args(target.data)
        self.num_data = target.num_data if target.has_local else None

    def constrained_params(self) -> dict:
        """The guide's parameters as the guide sees them (constrained)."""
        return _constrained(self.param_sites, self.params)

    def _to_z(self, x: dict):
        """The model's sites ``x`` to the flat unconstrained ``z`` and ``log |det dT/dz|``."""
        parts, log_det = [], 0.0
        for site, support in zip(self.sites, self.supports):
            t = biject_to(support)
            u = t.inv(x[site.name])
            parts.append(jnp.reshape(u, (-1,)))
            log_det = log_det + jnp.sum(t.log_abs_det_jacobian(u, x[site.name]))
        return jnp.concatenate(parts), log_det

    def _to_x(self, z):
        values = _unflatten(self.sites, z)
        x = {s.name: biject_to(sup)(values[s.name]) for s, sup in zip(self.sites, self.supports)}
        log_det = sum(jnp.sum(biject_to(sup).log_abs_det_jacobian(values[s.name], x[s.name]))
                      for s, sup in zip(self.sites, self.supports))
        return x, log_det

    def _refuse_local(self):
        if self.num_data is not None:
            raise TypeError(
                "This guide draws a model's local latents (one per row of its subsampled plate): veil.fit runs it "
                "on the rows of each batch; it is not a family over one vector to draw from alone.")

    def sample_and_log_prob(self, key, n: int):
        self._refuse_local()
        args, kwargs = self.args.data
        guide = handlers.substitute(self.guide, data=self.constrained_params())
        names = [s.name for s in self.sites]

        def one(k):
            tr = handlers.trace(handlers.seed(guide, rng_seed=k)).get_trace(*args, **kwargs)
            log_q = sum(jnp.sum(s["fn"].log_prob(s["value"])) for s in tr.values()
                        if s["type"] == "sample" and not s["is_observed"])
            z, log_det = self._to_z({name: tr[name]["value"] for name in names})
            return z, log_q + log_det

        return jax.vmap(one)(jax.random.split(key, n))

    def log_prob(self, z):
        self._refuse_local()
        args, kwargs = self.args.data
        cparams = self.constrained_params()

        def one(z):
            x, log_det = self._to_x(z)
            return log_density(self.guide, args, kwargs, {**cparams, **x})[0] + log_det

        flat = jnp.reshape(z, (-1, self.dim))
        return jax.vmap(one)(flat).reshape(jnp.shape(z)[:-1])
