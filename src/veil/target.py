"""Targets: a log density on unconstrained R^d and the map back to named constrained values.

A :class:`Target` is an ``equinox.Module``: its data (the arrays a NumPyro model was called
with) are ordinary array leaves, while the log-density function, the model and the site layout
are static. Under ``jax.jit`` this means a second fit with new data of the same shapes reuses
the compiled program, and a fit never bakes the data into the program as constants.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Target", "Site"]


class Site(eqx.Module):
    """Layout of one latent site inside the flat unconstrained vector."""

    name: str = eqx.field(static=True)
    offset: int = eqx.field(static=True)
    unconstrained_shape: tuple[int, ...] = eqx.field(static=True)

    @property
    def size(self) -> int:
        return math.prod(self.unconstrained_shape)


def _logdensity_from_fn(fn, z, data):
    del data
    return fn(z)


def _numpyro_logdensity(model, sites, z, data):
    from numpyro.infer.util import potential_energy

    args, kwargs = data
    return -potential_energy(model, args, kwargs, _unflatten(sites, z))


def _numpyro_loglikelihood(model, sites, z, data):
    """Sum of the observed sites' log densities (with their ``scale``), at the latent values
    ``z`` maps to: NumPyro's own trace of the model, observed sites only."""
    from numpyro import handlers
    from numpyro.infer.util import constrain_fn

    args, kwargs = data
    values = constrain_fn(model, args, kwargs, _unflatten(sites, z))
    tr = handlers.trace(handlers.substitute(model, data=values)).get_trace(*args, **kwargs)
    total = 0.0
    for site in tr.values():
        if site["type"] == "sample" and site["is_observed"]:
            lp = jnp.sum(site["fn"].log_prob(site["value"]))
            total = total + (lp if site.get("scale") is None else site["scale"] * lp)
    return total


def _unflatten(sites, z):
    return {
        s.name: z[..., s.offset : s.offset + s.size].reshape(z.shape[:-1] + s.unconstrained_shape)
        for s in sites
    }


class Target(eqx.Module):
    """A log density ``log p(z)`` on unconstrained ``R^dim``, up to an additive constant.

    Build one with :meth:`from_logdensity` (a plain function of a flat vector) or
    :meth:`from_numpyro` (any NumPyro model with continuous latent sites).

    Attributes:
        dim: dimension of the unconstrained space.
        names: names of the constrained values returned by :meth:`to_constrained`.

    Example:
        >>> import jax.numpy as jnp, veil
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=3)
        >>> float(t.log_density(jnp.zeros(3)))
        -0.0
    """

    kind: str = eqx.field(static=True)
    dim: int = eqx.field(static=True)
    fn: Callable | None = eqx.field(static=True)
    model: Callable | None = eqx.field(static=True)
    sites: tuple[Site, ...] = eqx.field(static=True)
    names: tuple[str, ...] = eqx.field(static=True)
    data: Any
    loglik: Callable | None = eqx.field(static=True, default=None)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_logdensity(
        cls, fn: Callable[[jax.Array], jax.Array], dim: int, *, log_likelihood: Callable | None = None
    ) -> "Target":
        """Wrap ``fn: R^dim -> R``, an unnormalised log density of a flat vector.

        ``log_likelihood``, optional, is the part of ``fn`` that comes from the data (``fn``
        minus the log prior); objectives that weight the likelihood
        (``veil.ELBO(likelihood_weight=...)``, ``beta=...``) need it.

        ``fn`` is checked once with abstract inputs (no computation): it must accept a vector
        of shape ``(dim,)`` and return a scalar. Keep the same ``fn`` object between fits to
        reuse the compiled program; a new lambda each time forces a new compilation.
        Draws of this target have the single name ``"z"``.
        """
        if not callable(fn):
            raise TypeError(f"fn must be a callable log density, got {type(fn).__name__}.")
        dim = _check_dim(dim)
        try:
            out = jax.eval_shape(fn, jax.ShapeDtypeStruct((dim,), jnp.float32))
        except Exception as e:  # the user's function failed on a (dim,) vector
            raise ValueError(
                f"Calling the log density on a vector of shape ({dim},) failed: {e}. "
                f"Check that `dim` ({dim}) is the length of the vector your function expects."
            ) from e
        if not hasattr(out, "shape") or out.shape != ():
            shape = getattr(out, "shape", type(out).__name__)
            raise ValueError(
                f"The log density must return a scalar, but it returned shape {shape} for an "
                f"input of shape ({dim},). Sum the per-component terms (e.g. `jnp.sum(...)`)."
            )
        if log_likelihood is not None and not callable(log_likelihood):
            raise TypeError(f"log_likelihood must be a callable, got {type(log_likelihood).__name__}.")
        site = Site("z", 0, (dim,))
        return cls("logdensity", dim, fn, None, (site,), ("z",), None, log_likelihood)

    @classmethod
    def from_numpyro(cls, model: Callable, *args, **kwargs) -> "Target":
        """Target the posterior of a NumPyro ``model(*args, **kwargs)``.

        NumPyro's own machinery gives the potential on unconstrained space (its transforms
        and log-Jacobians) and the map back to constrained sites: veil rewrites none of it.
        Array arguments are data: checked for NaN/inf here, passed to the compiled program as
        inputs, so new data of the same shapes do not recompile.

        Raises:
            NotImplementedError: the model has a discrete latent site.
            ValueError: an array argument holds NaN or inf, or the model has no latent site.
        """
        from numpyro import handlers
        from numpyro.infer.util import transform_fn
        from numpyro.distributions import biject_to

        if not callable(model):
            raise TypeError(f"model must be a NumPyro model function, got {type(model).__name__}.")
        _check_data_finite(args, kwargs)
        # Trace the model once, eagerly, to learn its latent sites and their supports.
        tr = handlers.trace(handlers.seed(model, rng_seed=0)).get_trace(*args, **kwargs)
        latent = {}
        for name, site in tr.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            fn = site["fn"]
            if getattr(fn, "has_enumerate_support", False) or fn.support.is_discrete:
                raise NotImplementedError(
                    f"Latent site '{name}' is discrete ({type(fn).__name__}); veil's families "
                    "are continuous. Marginalise it out in the model (e.g. with "
                    "`numpyro.contrib.funsor` enumeration or by summing it out by hand)."
                )
            latent[name] = site
        if not latent:
            raise ValueError("The model has no latent (unobserved) sample site: nothing to fit.")
        # Unconstrained shapes through NumPyro's own bijections.
        transforms = {n: biject_to(s["fn"].support) for n, s in latent.items()}
        unc = transform_fn(transforms, {n: s["value"] for n, s in latent.items()}, invert=True)
        sites, offset = [], 0
        for name in latent:
            shape = tuple(int(d) for d in jnp.shape(unc[name]))
            sites.append(Site(name, offset, shape))
            offset += math.prod(shape)
        deterministic = tuple(n for n, s in tr.items() if s["type"] == "deterministic")
        data = (tuple(args), dict(kwargs))
        return cls("numpyro", offset, None, model, tuple(sites), tuple(latent) + deterministic, data)

    # ------------------------------------------------------------------ evaluation
    def log_density(self, z: jax.Array) -> jax.Array:
        """``log p(z)`` for one flat unconstrained vector ``z`` of shape ``(dim,)``."""
        if self.kind == "numpyro":
            return _numpyro_logdensity(self.model, self.sites, z, self.data)
        return _logdensity_from_fn(self.fn, z, self.data)

    @property
    def has_likelihood(self) -> bool:
        """Whether :meth:`log_likelihood` is available (NumPyro models, or a plain log
        density given with ``log_likelihood=``)."""
        return self.kind == "numpyro" or self.loglik is not None

    def log_likelihood(self, z: jax.Array) -> jax.Array:
        """The data's part of :meth:`log_density` at one flat vector ``z``: the sum of the
        observed sites' log densities for a NumPyro model; ``log_density - log_likelihood``
        is the log prior (with the change-of-variables term)."""
        if self.kind == "numpyro":
            return _numpyro_loglikelihood(self.model, self.sites, z, self.data)
        if self.loglik is None:
            raise ValueError(
                "This target has no separate log likelihood: build it with "
                "veil.Target.from_logdensity(fn, dim, log_likelihood=...) or from a NumPyro model."
            )
        return self.loglik(z)

    def to_constrained(self, z: jax.Array) -> dict[str, jax.Array]:
        """Map one unconstrained vector to a dict of named constrained values.

        For NumPyro models this includes ``numpyro.deterministic`` sites; a plain log-density
        target returns ``{"z": z}``.
        """
        if self.kind == "numpyro":
            from numpyro.infer.util import constrain_fn

            args, kwargs = self.data
            return constrain_fn(
                self.model, args, kwargs, _unflatten(self.sites, z), return_deterministic=True
            )
        return {"z": z}

    def unflatten(self, z: jax.Array) -> dict[str, jax.Array]:
        """Split a flat unconstrained vector into its named unconstrained pieces."""
        return _unflatten(self.sites, z)


def _check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"dim must be a positive integer, got {dim!r}.")
    if dim <= 0:
        raise ValueError(f"dim must be a positive integer, got {dim}.")
    return int(dim)


def _check_data_finite(args, kwargs) -> None:
    leaves = jax.tree_util.tree_leaves_with_path((args, kwargs))
    for path, leaf in leaves:
        if isinstance(leaf, (jax.Array, np.ndarray)) and jnp.issubdtype(leaf.dtype, jnp.inexact):
            bad = int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf))))
            if bad:
                where = jax.tree_util.keystr(path)
                raise ValueError(
                    f"Model data {where} holds {bad} non-finite value(s) (NaN or inf). A NaN in "
                    "the data silently turns the whole posterior into NaN. Drop or impute those "
                    "entries, or model them as latent sites (e.g. with `obs_mask`)."
                )
