"""Targets: a log density on unconstrained R^d and the map back to named constrained values.

A :class:`Target` is an ``equinox.Module``: its data (the arrays a NumPyro model was called
with) are ordinary array leaves, while the log-density function, the model and the site layout
are static. Under ``jax.jit`` this means a second fit with new data of the same shapes reuses
the compiled program, and a fit never bakes the data into the program as constants.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from numpyro import handlers
from numpyro.distributions import biject_to
from numpyro.distributions import constraints as dist_constraints
from numpyro.distributions.distribution import validation_enabled as numpyro_validation
from numpyro.infer.util import _guess_max_plate_nesting, constrain_fn, potential_energy, transform_fn
from numpyro.infer.util import log_density as numpyro_log_density
from numpyro.primitives import Messenger

from veil.target import predictive as _predictive, pymc as _pymc, stan as _stan
from veil._checks import Int
from veil._checks import check_dim as _check_dim
from veil._checks import check_positive_int
from veil.loop.batching import DiskBatches, OnDisk, Shuffled, ShuffledIndices
from veil.target.health import check_log_density

__all__ = ["Target", "Site", "log_density_rows"]

# Memory for one block of full-data log densities over many draws (floats): a minibatched
# target's data can be large, so ``log_density_rows`` maps over the draws in blocks whose
# per-row likelihood terms stay under this many values.
_ROWS_BUDGET = 2**24


class Site(eqx.Module):
    """Layout of one latent site inside the flat unconstrained vector."""

    name: str = eqx.field(static=True)
    offset: int = eqx.field(static=True)
    unconstrained_shape: tuple[int, ...] = eqx.field(static=True)

    @property
    def size(self) -> int:
        return math.prod(self.unconstrained_shape)


# Closed-over arrays larger than this (bytes, all together) are lifted out of a plain log
# density and passed to the compiled program as arguments (see ``_hoist``).
_HOIST_BYTES = 2**20


class _Hoisted:
    """A function of ``z`` whose large closed-over arrays are lifted out as arguments.

    ``jax.jit`` embeds the arrays a function closes over into the compiled program as
    literal constants: an 800 MB design matrix in ``lambda z: loglik(z, X, y)`` gave a
    1.6 GB program text and a 17 s compilation (jax 0.10, CPU), and memory for the copy.
    Tracing the function once to a jaxpr separates those arrays (its ``consts``) from the
    computation; calling ``self(z, consts)`` evaluates the jaxpr with the arrays given as
    ordinary inputs, which ``jit``, ``grad`` and ``vmap`` see as data, not program.
    Metadata (``__qualname__``, ...) are the user's function's, so checkpoints still match.
    """

    def __init__(self, fn, traced):
        functools.update_wrapper(self, fn)
        self.source, self.jaxpr, self.aval = fn, traced.jaxpr, traced.in_avals[0]
        # The closure's own arrays (to recognise the same closure again), and the same
        # arrays on the device once, for the fits.
        self.raw = tuple(traced.consts)
        self.consts = tuple(jnp.asarray(c) for c in self.raw)

    def __call__(self, z, consts):
        if (jnp.shape(z), jnp.result_type(z)) != (self.aval.shape, self.aval.dtype):
            return self.source(z)  # traced for another shape/dtype: the function as written
        return jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(self.jaxpr, consts))(z)[0]


_HOISTED: "weakref.WeakKeyDictionary[Callable, _Hoisted]" = weakref.WeakKeyDictionary()


def _hoist(fn: Callable, traced) -> tuple[Callable, tuple | None]:
    """``(fn, None)``, or ``(_Hoisted, consts)`` when ``fn`` closes over more than
    ``_HOIST_BYTES`` of arrays. ``traced`` is ``jax.make_jaxpr(fn)`` at one ``(dim,)``
    vector. The same ``fn`` over the same arrays gives back the same ``_Hoisted`` object, so
    a second target from it reuses the compiled program."""
    raw = tuple(traced.consts)
    size = sum(getattr(c, "nbytes", 0) for c in raw)
    if size <= _HOIST_BYTES or not all(isinstance(c, (jax.Array, np.ndarray)) for c in raw):
        return fn, None
    try:
        old = _HOISTED.get(fn)
    except TypeError:  # not weak-referenceable: no reuse
        old = None
    if (old is not None and str(old.jaxpr) == str(traced.jaxpr)
            and len(old.raw) == len(raw) and all(a is b for a, b in zip(old.raw, raw))):
        return old, old.consts
    hoisted = _Hoisted(fn, traced)
    try:
        _HOISTED[fn] = hoisted
    except TypeError:
        pass
    return hoisted, hoisted.consts


def _trace_scalar_fn(fn, dim: int, what: str):
    """``jax.make_jaxpr(fn)`` at a ``(dim,)`` vector (no computation), checking that ``fn``
    accepts it and returns a scalar."""
    try:
        traced = jax.make_jaxpr(fn)(jnp.zeros((dim,)))
    except Exception as e:  # the user's function failed on a (dim,) vector
        raise ValueError(
            f"Calling {what[:1].lower() + what[1:]} on a vector of shape ({dim},) failed: {e}. "
            f"Check that `dim` ({dim}) is the length of the vector your function expects."
        ) from e
    shapes = [getattr(a, "shape", None) for a in traced.out_avals]
    if shapes != [()]:
        shape = shapes[0] if len(shapes) == 1 else f"{len(shapes)} outputs"
        raise ValueError(
            f"{what} must return a scalar, but it returned shape {shape} for an "
            f"input of shape ({dim},). Sum the per-component terms (e.g. `jnp.sum(...)`)."
        )
    return traced


def _call(fn, z, consts):
    """``fn(z)``, or a hoisted function with its arrays."""
    return fn(z) if consts is None else fn(z, consts)


def _swap_args(fn, params, z):
    return fn(z, params)


def _logdensity_from_fn(fn, z, data):
    return _call(fn, z, None if data is None else data[0])


def _with_rows(model, plate: str | None, num_data: int | None, rows):
    """``model`` with the indices of its subsampled plate set: ``rows`` (a batch) or, when
    ``rows`` is None, all ``num_data`` rows, at which NumPyro's scale ``N / len(indices)``
    is one. ``model`` itself when it has no subsampled plate."""
    if plate is None:
        return model

    indices = jnp.arange(num_data) if rows is None else rows

    class _SetPlateRows(Messenger):
        def process_message(self, msg):
            if msg["type"] == "plate" and msg["name"] == plate:
                msg["value"] = indices
                msg["args"] = (msg["args"][0], indices.shape[0])

    def model_on_rows(*args, **kwargs):
        with _SetPlateRows():
            return model(*args, **kwargs)

    return model_on_rows


def _numpyro_logdensity(model, sites, z, data, enum: bool = False):
    args, kwargs = data
    return -potential_energy(model, args, kwargs, _unflatten(sites, z), enum=enum)


def _numpyro_log_joint(model, sites, z, data, enum: bool = False):
    """``log p(x, theta)`` at the constrained values ``z`` maps to: NumPyro's joint log density,
    without the change-of-variables term that :func:`_numpyro_logdensity` includes (discrete
    latents summed out where ``enum``)."""
    args, kwargs = data
    values = constrain_fn(model, args, kwargs, _unflatten(sites, z))
    if enum:
        from numpyro.contrib.funsor import log_density as enumerated_log_density

        return enumerated_log_density(model, args, kwargs, values)[0]
    return numpyro_log_density(model, args, kwargs, values)[0]


# Largest table of enumerated log densities veil builds (float32 numbers: 2 GiB).
_ENUM_MAX_NUMBERS = 2**29


def _check_enumeration(trace, enumerated: dict) -> int:
    """The first dim enumeration may use (NumPyro's rule: left of every plate). Raises if
    summing the discrete sites out would need a table larger than ``_ENUM_MAX_NUMBERS``,
    estimated as the product of their support sizes times the largest batch of any site
    (parallel enumeration gives each site its own dim), or if funsor is missing."""
    try:
        import funsor  # noqa: F401  (NumPyro's enumeration runs on it)
    except ImportError as e:
        raise ImportError(
            f"The model has discrete latent site(s) {', '.join(map(repr, enumerated))}, which veil sums out "
            "with NumPyro's enumeration; it needs funsor: pip install funsor.") from e
    sizes = {n: int(np.shape(s["fn"].enumerate_support(expand=False))[0]) for n, s in enumerated.items()}
    batch = max(math.prod(s["fn"].batch_shape) for s in trace.values() if s["type"] == "sample")
    numbers = math.prod(sizes.values()) * batch
    if numbers > _ENUM_MAX_NUMBERS:
        raise ValueError(
            f"Summing out the discrete latent site(s) {', '.join(f'{n!r} ({k} values)' for n, k in sizes.items())} "
            f"by enumeration needs a table of about {numbers:.3g} numbers ({4 * numbers / 2**30:.3g} GiB in float32), "
            "more than veil builds (2 GiB). Enumerate fewer sites at once (a Markov chain's sites with "
            "numpyro.contrib.control_flow.scan), or sum them out by hand.")
    return -_guess_max_plate_nesting(trace) - 1


def _enumerated(model, first_dim: int):
    """``model`` with its discrete latents enumerated in parallel (NumPyro's handlers)."""
    from numpyro.contrib.funsor import config_enumerate, enum

    return enum(config_enumerate(model), first_dim)


def _numpyro_loglikelihood(model, sites, z, data):
    """Sum of the observed sites' log densities (with their ``scale``), at the latent values
    ``z`` maps to: NumPyro's own trace of the model, observed sites only."""
    args, kwargs = data
    values = constrain_fn(model, args, kwargs, _unflatten(sites, z))
    tr = handlers.trace(handlers.substitute(model, data=values)).get_trace(*args, **kwargs)
    total = 0.0
    for site in tr.values():
        if site["type"] == "sample" and site["is_observed"]:
            lp = jnp.sum(site["fn"].log_prob(site["value"]))
            total = total + (lp if site.get("scale") is None else site["scale"] * lp)
    return total


def _minibatch_logdensity(log_prior, log_lik, num_data, z, data):
    """``log p(z) + (N / n) log_lik(z, data)`` for ``n`` rows of data: the full-data log
    density when ``data`` is all ``N`` rows, its unbiased minibatch estimate for a batch."""
    if _leading(data) > num_data:  # all rows of data padded to split over devices
        data = jax.tree.map(lambda x: x[:num_data], data)
    scale = num_data / _leading(data)
    return log_prior(z) + scale * log_lik(z, data)


def _streamed_loglik(log_lik, store, z: jax.Array) -> jax.Array:
    """``sum_{i=1}^N log_lik(z_k, x_i)`` for each row ``z_k`` of ``z`` (shape ``(n, dim)``),
    the ``N`` rows read from an on-disk ``store`` (:class:`veil.loop.batching.OnDisk`) a block at a
    time by a host callback inside the program, so they are never all in memory.

    A block holds at most ``store.stream_rows()`` rows and ``2**24 / n`` of them (the
    ``n x block`` likelihood terms live at once). Each block's work is under
    ``jax.checkpoint``: a gradient reads the block again instead of keeping every block for
    the backward pass.
    """
    n, total_rows = z.shape[0], store.num_data
    size = max(1, min(store.stream_rows(), _ROWS_BUDGET // max(n, 1)))
    full, rest = divmod(total_rows, size)

    def block_sum(b, rows):
        def read(b):
            start = int(b) * size
            return store.slice(start, start + rows)

        x = jax.pure_callback(read, store.shapes(rows), b, vmap_method="sequential")
        return jax.vmap(log_lik, (0, None))(z, x)

    body = jax.checkpoint(lambda acc, b: (acc + block_sum(b, size), None))
    acc = jnp.zeros(n, jnp.result_type(z.dtype, jnp.float32))
    acc, _ = jax.lax.scan(body, acc, jnp.arange(full, dtype=jnp.int32))
    if rest:
        acc = acc + block_sum(jnp.int32(full), rest)
    return acc


class ParamSite(eqx.Module):
    """A model parameter (a ``numpyro.param`` site): its name and the constraint its values
    keep; the target holds it unconstrained (``biject_to(constraint)`` maps it back)."""

    name: str = eqx.field(static=True)
    constraint: Any = eqx.field(static=True)


def _param_sites(trace) -> tuple[tuple[ParamSite, ...], dict | None]:
    """The model's ``numpyro.param`` sites and their initial values, unconstrained (``None``
    for a model without any). A site's value may be a pytree of arrays (a network's weights,
    ``numpyro.contrib.module.eqx_module`` / ``flax_module``), its constraint applied to every
    leaf. An initial value outside its constraint is an error naming it."""
    sites, values = [], {}
    for name, site in trace.items():
        if site["type"] != "param":
            continue
        constraint = site["kwargs"].get("constraint", dist_constraints.real)
        value = jax.tree.map(jnp.asarray, site["value"])
        for leaf in jax.tree.leaves(value):
            if not bool(jnp.all(constraint.check(leaf))):
                raise ValueError(
                    f"numpyro.param site '{name}' starts at {np.asarray(leaf)!r:.60}, outside its constraint "
                    f"({constraint}): give it an initial value inside it."
                )
        unconstrained = jax.tree.map(biject_to(constraint).inv, value)
        if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(unconstrained)):
            raise ValueError(f"numpyro.param site '{name}' starts on the edge of its constraint ({constraint}).")
        sites.append(ParamSite(name, constraint))
        # strongly typed, so that an optimizer's updates keep the dtype
        values[name] = jax.tree.map(lambda u: u.astype(jax.dtypes.canonicalize_dtype(jnp.float64)), unconstrained)
    return tuple(sites), (values or None)


def _constrained(sites: tuple[ParamSite, ...], params) -> dict:
    """The parameters ``params`` (unconstrained) mapped through each site's constraint."""
    return {s.name: jax.tree.map(biject_to(s.constraint), params[s.name]) for s in sites}


def _with_params(model, sites: tuple[ParamSite, ...], params):
    """``model`` with its ``numpyro.param`` sites set to ``params`` (unconstrained, mapped back
    through each site's constraint); ``model`` itself when it has none."""
    if not sites:
        return model
    return handlers.substitute(model, data=_constrained(sites, params))


def _unflatten_local(sites, z_local):
    """A ``[rows, local_dim]`` array of local values split into ``name -> [rows, *shape]``."""
    rows = z_local.shape[0]
    return {s.name: z_local[:, s.offset:s.offset + s.size].reshape((rows, *s.unconstrained_shape)) for s in sites}


def _leading(data) -> int:
    return jax.tree.leaves(data)[0].shape[0]


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

    Examples:
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
    num_data: int | None = eqx.field(static=True, default=None)
    batch_size: int | None = eqx.field(static=True, default=None)
    plate: str | None = eqx.field(static=True, default=None)  # a NumPyro model's subsampled plate
    rows: Any = None  # that plate's current indices (a batch), or None for all rows
    mesh: Any = eqx.field(static=True, default=None)  # devices the rows are sharded over
    store: Any = eqx.field(static=True, default=None)  # rows kept on disk (batching.OnDisk)
    constrain: Callable | None = eqx.field(static=True, default=None)  # a PyMC model's map to its variables
    arviz_dims: tuple | None = eqx.field(static=True, default=None)  # (coords, dims) for ArviZ, as tuples
    source: Any = eqx.field(static=True, default=None)  # a Stan model instance (veil.target.stan.StanModel)
    params: Any = None  # a NumPyro model's parameters (numpyro.param sites), unconstrained: array leaves
    param_sites: tuple = eqx.field(static=True, default=())  # their names and constraints (ParamSite)
    local_sites: tuple = eqx.field(static=True, default=())  # latent sites inside the subsampled plate, per row
    enum_dim: int | None = eqx.field(static=True, default=None)  # discrete latents summed out: enumeration's first dim
    discrete_sites: tuple = eqx.field(static=True, default=())  # discrete latents fitted by a discrete family (names)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_logdensity(
        cls, fn: Callable[..., jax.Array], dim: int, *, log_likelihood: Callable | None = None, params: Any = None
    ) -> "Target":
        """Wrap ``fn: R^dim -> R``, an unnormalised log density of a flat vector.

        With ``params`` (a pytree of floating-point arrays, its starting values), ``fn`` is
        ``fn(z, params)``: a model with parameters, which ``veil.fit`` learns beside ``q`` by the
        ELBO (variational EM); ``res.params`` holds the learned pytree. The parameters are
        unconstrained: write constraints into ``fn`` (``jnp.exp`` of a log scale). Arrays ``fn``
        closes over are compiled into the program in this form (pass large data through a
        NumPyro model, or ``Target.minibatched``).

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
        if log_likelihood is not None and not callable(log_likelihood):
            raise TypeError(f"log_likelihood must be a callable, got {type(log_likelihood).__name__}.")
        if params is not None:
            return cls._with_plain_params(fn, dim, log_likelihood, params)
        fn, consts = _hoist(fn, _trace_scalar_fn(fn, dim, "The log density"))
        check_log_density(fn, consts, dim)
        lik_consts = None
        if log_likelihood is not None:
            log_likelihood, lik_consts = _hoist(log_likelihood, _trace_scalar_fn(log_likelihood, dim, "log_likelihood"))
        data = None if consts is None and lik_consts is None else (consts, lik_consts)
        site = Site("z", 0, (dim,))
        return cls("logdensity", dim, fn, None, (site,), ("z",), data, log_likelihood)

    @classmethod
    def _with_plain_params(cls, fn, dim: int, log_likelihood, params) -> "Target":
        """``from_logdensity`` for ``fn(z, params)``: the starting values checked (floating-point
        and finite), ``fn`` checked at them as a plain log density is."""
        if log_likelihood is not None:
            raise NotImplementedError(
                "log_likelihood= with params= is not supported yet: build the target without "
                "log_likelihood (objectives that weight the likelihood need it).")
        leaves = jax.tree.leaves(params)
        if not leaves or not all(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves):
            raise TypeError("params must be a pytree of floating-point arrays (the parameters' starting values).")
        params = jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.result_type(x)), params)  # strongly typed
        if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params)):
            raise ValueError("params hold non-finite values (NaN or inf): start them at finite values.")
        at_start = functools.partial(_swap_args, fn, params)
        _trace_scalar_fn(at_start, dim, "The log density")
        check_log_density(at_start, None, dim)
        site = Site("z", 0, (dim,))
        return cls("logdensity", dim, fn, None, (site,), ("z",), None, params=params)

    @classmethod
    def minibatched(
        cls,
        log_prior: Callable[[jax.Array], jax.Array],
        log_lik: Callable[[jax.Array, Any], jax.Array],
        data: Any,
        *,
        dim: Int,
        batch_size: Int,
    ) -> "Target":
        """A posterior over global latents whose likelihood is a sum over ``N`` data rows,
        fitted on minibatches.

        ``log p(z | data) = log_prior(z) + sum_{i=1}^N log p(x_i | z) + const``. Each step of
        ``veil.fit`` draws a batch ``B`` of ``batch_size`` rows and uses the unbiased estimate
        ``log_prior(z) + (N / |B|) log_lik(z, batch)``: the gradient estimate stays unbiased,
        and a step costs ``O(batch_size)``, not ``O(N)``. Batches are the rows of one random
        permutation per epoch (every row once per epoch, the ``N mod batch_size`` rows left
        over sit that epoch out), drawn inside the compiled loop: no host round trip.

        Args:
            log_prior: ``z -> log p(z)`` for a flat vector of shape ``(dim,)`` (include any
                change-of-variables term for constrained latents).
            log_lik: ``(z, batch) -> sum_i log p(x_i | z)``, the *summed* log likelihood of the
                rows of ``batch`` (same pytree as ``data`` with a leading axis of length
                ``|B|``). veil scales it by ``N / |B|``; do not scale it yourself.
            data: a pytree (array, tuple or dict of arrays) whose leaves share a leading axis
                of length ``N``, the rows. Memory-mapped arrays (``np.load(path,
                mmap_mode="r")``), or a :class:`veil.loop.batching.OnDisk`, stay on disk: each chunk
                of the fit reads its batches' rows ahead on a background thread, and full-data
                evaluations stream the rows in blocks (same fit, same key, as in memory).
            dim: dimension of ``z``.
            batch_size: rows per step, ``1 <= batch_size <= N``.

        Only global latents: a latent per row (a mixture assignment, a per-row random
        effect) cannot be fitted this way, since a step sees only its batch's rows;
        amortised families for such models come with the VAE toolkit.

        ``log_density`` and ``log_likelihood`` of the returned target use all ``N`` rows
        (diagnostics such as k-hat and the summary are computed on the full data, in blocks
        of draws that bound memory).

        Raises:
            ValueError: leaves with different leading lengths, a batch size outside
                ``[1, N]``, a NaN or inf in the data (named, with the first bad row), or
                functions that fail or do not return a scalar on a ``(dim,)`` vector and a
                batch.

        Examples:
            >>> import jax, jax.numpy as jnp, veil
            >>> x = jnp.linspace(-1.0, 1.0, 1000)
            >>> t = veil.Target.minibatched(
            ...     lambda z: -0.5 * jnp.sum(z**2),
            ...     lambda z, xb: jnp.sum(-0.5 * (xb - z[0]) ** 2),
            ...     x, dim=1, batch_size=100)
            >>> t.num_data, t.batch_size
            (1000, 100)
        """

        if not callable(log_prior) or not callable(log_lik):
            raise TypeError("log_prior and log_lik must be callables: z -> scalar and (z, batch) -> scalar.")
        dim = _check_dim(dim)
        store = None
        if isinstance(data, OnDisk) or any(isinstance(x, np.memmap) for x in jax.tree.leaves(data)):
            store = data if isinstance(data, OnDisk) else OnDisk(data)  # rows stay on disk
            data = store.data
        leaves = jax.tree_util.tree_leaves_with_path(data)
        if not leaves:
            raise ValueError("data holds no arrays: pass an array, or a tuple/dict of arrays sharing their first axis.")
        lengths = {}
        for path, leaf in leaves:
            shape = np.shape(leaf)
            if not shape:
                raise ValueError(
                    f"data leaf {jax.tree_util.keystr(path) or '(the array)'} is a scalar; every leaf "
                    "needs a leading axis of rows. Put constants in log_lik's closure instead."
                )
            lengths[jax.tree_util.keystr(path) or "(the array)"] = shape[0]
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"{k}: {v}" for k, v in lengths.items())
            raise ValueError(
                f"The data leaves must share their leading axis (one row per observation), but "
                f"their lengths differ ({listed})."
            )
        num_data = next(iter(lengths.values()))
        if num_data == 0:
            raise ValueError(
                "data has no rows (its leading axis has length 0): there is nothing to fit. Check "
                "how the data were loaded or filtered."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise TypeError(f"batch_size must be an integer, got {batch_size!r}.")
        if not 1 <= batch_size <= num_data:
            raise ValueError(
                f"batch_size must be between 1 and the number of rows N={num_data}, got {batch_size}. "
                + ("Use batch_size=N for full-batch steps." if batch_size > num_data else "")
            )
        if store is not None:
            store.check_finite()  # one pass over the file, a block at a time
            batch, data = store.shapes(int(batch_size)), None
        else:
            _check_rows_finite(leaves)
            # On the device (a copy: the user's arrays are untouched); arrays already there,
            # such as a multi-host global array, stay as they are.
            data = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), data)
            batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((int(batch_size),) + x.shape[1:], x.dtype), data)
        z = jax.ShapeDtypeStruct((dim,), jnp.float32)
        for name, call in (("log_prior", lambda: jax.eval_shape(log_prior, z)),
                           ("log_lik", lambda: jax.eval_shape(log_lik, z, batch))):
            try:
                out = call()
            except Exception as e:
                args = f"a vector of shape ({dim},)" + (f" and a batch of {batch_size} rows" if name == "log_lik" else "")
                raise ValueError(f"Calling {name} on {args} failed: {e}") from e
            if getattr(out, "shape", None) != ():
                raise ValueError(
                    f"{name} must return a scalar, but it returned shape {getattr(out, 'shape', type(out).__name__)}. "
                    "Sum the per-row terms (e.g. `jnp.sum(...)`)."
                )
        if store is None and all(isinstance(x, jax.Array) and x.is_fully_addressable for x in jax.tree.leaves(data)):
            # The health checks of a plain log density (reads past dim, flat coordinates) on
            # the prior plus the likelihood of the first batch's rows.
            first = jax.tree.map(lambda x: x[: int(batch_size)], data)
            check_log_density(lambda z: log_prior(z) + log_lik(z, first), None, dim,
                              "The log density (log_prior + log_lik of a batch)")
        site = Site("z", 0, (dim,))
        return cls("minibatched", dim, log_prior, None, (site,), ("z",), data, log_lik, int(num_data),
                   int(batch_size), store=store)

    @property
    def is_minibatched(self) -> bool:
        """Whether ``veil.fit`` steps on minibatches of this target's data."""
        return self.batch_size is not None

    @property
    def batches(self):
        """The batch source ``veil.fit`` draws each step's batch from (``None`` for a
        full-data target): rows of the data for ``minibatched``, indices of the subsampled
        plate for a NumPyro model."""

        if not self.is_minibatched:
            return None
        if self.kind == "numpyro":
            return ShuffledIndices(self.num_data, self.batch_size)
        if self.store is not None:
            return DiskBatches(self.store, self.batch_size)
        return Shuffled(self.data, self.batch_size, self.num_data)

    def on_batch(self, batch) -> "Target":
        """This target evaluated on one batch: for ``minibatched``, ``batch`` (rows of the
        data) replaces the data; for a NumPyro model with a subsampled plate, ``batch`` (row
        indices) becomes the plate's indices. Its ``log_density`` is then the unbiased
        minibatch estimate ``log prior + (N/|B|) log lik``."""
        if not self.is_minibatched:
            raise ValueError(
                "on_batch needs a minibatched target (veil.Target.minibatched, or a NumPyro "
                "model with numpyro.plate(..., subsample_size=B))."
            )
        if self.mesh is not None:  # each device computes its share of the batch's rows
            batch = jax.lax.with_sharding_constraint(batch, _row_sharding(self.mesh))
        if self.kind == "numpyro":
            return eqx.tree_at(lambda t: t.rows, self, batch, is_leaf=lambda x: x is None)
        # (an on-disk target's data is None until a batch takes its place)
        return eqx.tree_at(lambda t: t.data, self, batch, is_leaf=lambda x: x is None)

    def shard(self, mesh) -> "Target":
        """This target with its rows sharded over the devices of ``mesh`` (a
        ``jax.sharding.Mesh``; rows split over all its axes), for ``veil.fit(..., mesh=mesh)``.

        Each step's batch is then split over the devices too: every device evaluates the
        likelihood of ``batch_size / devices`` rows and XLA sums the gradients. The batch
        order is the same as on one device, so a fit gives the same result up to the order
        of floating-point sums. For ``minibatched`` targets, rows that do not split evenly are
        padded with copies of row 0 that are never drawn nor counted; a NumPyro model's
        arrays with ``N`` rows (those its plate indexes) must split evenly.

        Raises:
            ValueError: the target is not minibatched, the batch size is not a multiple of
                the number of devices, or (NumPyro) ``N`` is not.
        """
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
        if not self.is_minibatched:
            raise ValueError(
                "Only the rows of a minibatched target can be sharded over devices (veil.Target."
                "minibatched, or a NumPyro model with plate(..., subsample_size=B)); for a "
                "full-data target, veil.fit(..., mesh=...) shards its restarts instead."
            )
        if self.store is not None:
            raise ValueError(
                "The rows of this target are on disk (memory-mapped), and veil does not shard "
                "on-disk rows over devices yet: load them into memory (np.asarray) to use a mesh, "
                "or fit on one device."
            )
        devices = mesh.size
        if self.batch_size % devices:
            raise ValueError(
                f"The batch of {self.batch_size} rows does not split evenly over the mesh's "
                f"{devices} devices; use a batch_size that is a multiple of {devices} "
                f"(e.g. {-(-self.batch_size // devices) * devices})."
            )
        spec = _row_sharding(mesh)
        if self.kind == "numpyro":
            if self.num_data % devices:
                raise ValueError(
                    f"The model's {self.num_data} rows do not split evenly over {devices} devices: "
                    f"drop {self.num_data % devices} rows or use a mesh whose size divides {self.num_data}."
                )
            data = jax.tree.map(
                lambda x: jax.device_put(x, spec) if getattr(x, "ndim", 0) and x.shape[0] == self.num_data else x,
                self.data)
        else:
            pad = -self.num_data % devices
            data = jax.tree.map(
                lambda x: jax.device_put(jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x, spec),
                self.data)
        return dataclasses.replace(self, data=data, mesh=mesh)
    def _model(self):
        model = _with_params(_with_rows(self.model, self.plate, self.num_data, self.rows), self.param_sites, self.params)
        return model if self.enum_dim is None else _enumerated(model, self.enum_dim)

    # ------------------------------------------------------------------ model parameters
    @property
    def has_params(self) -> bool:
        """Whether the model has parameters (``numpyro.param`` sites, or ``params=`` of a plain
        log density) that ``veil.fit`` learns beside ``q`` (by the ELBO: variational EM)."""
        return self.params is not None

    def with_params(self, params) -> "Target":
        """The same target with its parameters set to ``params`` (unconstrained, as
        :attr:`params` holds them)."""
        return eqx.tree_at(lambda t: t.params, self, params)

    def constrained_params(self) -> Any:
        """The model parameters' current values: a NumPyro model's as a dict, constrained; a plain
        log density's as the pytree ``fn`` takes; ``{}`` for a target without parameters."""
        if self.params is None:
            return {}
        if self.kind == "numpyro":
            return _constrained(self.param_sites, self.params)
        return self.params

    @classmethod
    def from_numpyro(cls, model: Callable, *args, **kwargs) -> "Target":
        """Target the posterior of a NumPyro ``model(*args, **kwargs)``.

        NumPyro's own machinery gives the potential on unconstrained space (its transforms
        and log-Jacobians) and the map back to constrained sites: veil rewrites none of it.
        Array arguments are data: checked for NaN/inf here, passed to the compiled program as
        inputs, so new data of the same shapes do not recompile.

        ``numpyro.param`` sites are model parameters: ``veil.fit`` learns them beside ``q``
        (by the ELBO, a lower bound on the log marginal likelihood: variational EM, or type-II
        maximum likelihood), within their constraints, and ``res.params`` holds the learned
        values. Until a fit, the target holds their initial values.

        Latent sites inside a subsampled plate (``numpyro.plate(..., subsample_size=B)``) are
        local, one per data row (:attr:`local_sites`): ``veil.fit`` fits them with a local guide
        (``veil.PerDatum``, ``veil.Amortized``, a ``veil.Guide`` program). Discrete latent sites
        with a finite support are summed out by NumPyro's enumeration (needs funsor).

        Raises:
            NotImplementedError: a discrete latent site without a finite support, more than one
                subsampled plate, or a local site whose leading axis is not the plate's rows.
            ValueError: an array argument holds NaN or inf, the model has no continuous latent
                site, a ``numpyro.param`` starts outside its constraint, or enumerating the
                discrete sites would need more than 2 GiB.
        """
        if not callable(model):
            raise TypeError(f"model must be a NumPyro model function, got {type(model).__name__}.")
        _check_data_finite(args, kwargs)
        # Trace the model once, eagerly, to learn its latent sites and their supports.
        try:
            tr = handlers.trace(handlers.seed(model, rng_seed=0)).get_trace(*args, **kwargs)
        except ValueError:
            # A numpyro.param outside its constraint makes the distributions it feeds refuse
            # their arguments: name the parameter rather than the distribution.
            with numpyro_validation(False):
                _param_sites(handlers.trace(handlers.seed(model, rng_seed=0)).get_trace(*args, **kwargs))
            raise
        param_sites, params = _param_sites(tr)
        latent, enumerated, discrete = {}, {}, {}
        for name, site in tr.items():
            if site["type"] == "sample" and site["is_observed"] and isinstance(site["value"], str):
                raise TypeError(
                    f"Observed site '{name}' was given text ({site['value']!r:.40}), not numbers. Data "
                    "go to a NumPyro model as arrays (jnp.asarray(...) of numbers); to load a file, "
                    "read it first (numpy.loadtxt, pandas)."
                )
            if site["type"] != "sample" or site["is_observed"]:
                continue
            fn = site["fn"]
            if getattr(fn, "has_enumerate_support", False):
                enumerated[name] = site
                continue
            if fn.support.is_discrete:
                discrete[name] = site  # no finite support to sum over: fitted by a discrete family
                continue
            latent[name] = site
        if not latent and enumerated:
            raise ValueError(
                f"The model's only latent site(s) {', '.join(map(repr, enumerated))} are discrete, which veil "
                "sums out exactly: no continuous latent is left to fit (its marginal likelihood needs no fit).")
        if not latent and not discrete:
            raise ValueError("The model has no latent (unobserved) sample site: nothing to fit.")
        if discrete and enumerated:
            raise NotImplementedError(
                f"The model has discrete sites veil sums out ({', '.join(map(repr, enumerated))}) and discrete sites "
                f"it fits by a discrete family ({', '.join(map(repr, discrete))}); both at once are not supported yet.")
        enum_dim = _check_enumeration(tr, enumerated) if enumerated else None
        plate, num_data, batch_size, local = _subsampled_plate(tr, latent)
        # Unconstrained shapes through NumPyro's own bijections; a local site's per row.
        transforms = {n: biject_to(s["fn"].support) for n, s in latent.items()}
        unc = transform_fn(transforms, {n: s["value"] for n, s in latent.items()}, invert=True)
        sites, local_sites, offset, local_offset = [], [], 0, 0
        if discrete and local:
            raise NotImplementedError("Discrete latents without a finite support inside a subsampled plate are not "
                                      "supported: drop subsample_size.")
        for name in latent:
            shape = tuple(int(d) for d in jnp.shape(unc[name]))
            if name in local:
                local_sites.append(Site(name, local_offset, shape[1:]))
                local_offset += math.prod(shape[1:])
            else:
                sites.append(Site(name, offset, shape))
                offset += math.prod(shape)
        for name, site in discrete.items():  # after the continuous sites: counts held as floats
            shape = tuple(int(d) for d in jnp.shape(site["value"]))
            sites.append(Site(name, offset, shape))
            offset += math.prod(shape)
        deterministic = tuple(n for n, s in tr.items() if s["type"] == "deterministic")
        data = (tuple(args), dict(kwargs))
        return cls("numpyro", offset, None, model, tuple(sites), tuple(latent) + tuple(discrete) + deterministic, data,
                   None, num_data, batch_size, plate, params=params, param_sites=param_sites,
                   local_sites=tuple(local_sites), enum_dim=enum_dim, discrete_sites=tuple(discrete))

    @classmethod
    def from_pymc(cls, model) -> "Target":
        """Target the posterior of a PyMC model (``with pm.Model() as model: ...``).

        The joint log density on PyMC's unconstrained value variables (``model.logp()``, its
        transforms' log-Jacobians included) and the map back to the free variables and the
        deterministics are PyMC's own graphs, compiled to JAX by PyTensor's JAX backend: no
        hand translation. Observed values and ``pm.Data`` arrays are inputs of the compiled
        program, so new data of the same shapes do not recompile. Draws are named as PyMC
        names its variables, and ``res.to_arviz`` carries the model's coords and dims.

        Needs PyMC >= 5.16 (``pip install 'veil[pymc]'``). PyMC's value variables keep their
        names in :attr:`sites` (``tau_log__`` for a positive ``tau``).

        Raises:
            NotImplementedError: the model has a discrete free variable.
            ValueError: the model has no free variable, or its data hold NaN or inf.

        Examples:
            >>> import numpy as np, pymc as pm, veil
            >>> with pm.Model() as m:
            ...     mu = pm.Normal("mu", 0.0, 10.0)
            ...     _ = pm.Normal("y", mu, 1.0, observed=np.array([1.0, 2.0, 3.0]))
            >>> t = veil.Target.from_pymc(m)
            >>> t.dim, t.names
            (1, ('mu',))
        """
        try:
            import pymc as pm
        except ImportError as e:  # pragma: no cover - the optional dependency is missing
            raise ImportError("Target.from_pymc needs PyMC: pip install 'veil[pymc]'.") from e
        if not isinstance(model, pm.Model):
            raise TypeError(f"model must be a pymc.Model, got {type(model).__name__}.")
        parts = _pymc.model_parts(model)
        _check_data_finite(parts.data, {})
        sites, offset = [], 0
        for name, shape in parts.sites:
            sites.append(Site(name, offset, shape))
            offset += math.prod(shape)
        data = tuple(jnp.asarray(d) for d in parts.data)
        return cls("pymc", offset, parts.log_density, None, tuple(sites), parts.names, data,
                   constrain=parts.constrain, arviz_dims=(parts.coords, parts.dims))

    @classmethod
    def from_stan(cls, program, data=None, *, seed: int = 0) -> "Target":
        """Target the posterior of a Stan program given its data.

        ``program`` is Stan code or the path of a ``.stan`` file; ``data`` a dict of arrays and
        numbers (Stan's data block names), a JSON string or the path of a JSON file, as for
        CmdStan. The program is translated by ``stanc`` and compiled with the Stan headers that
        PyPI's ``httpstan`` ships and the machine's C++ compiler, once per machine (about
        20-60 s; cached under ``$VEIL_CACHE``, default ``~/.cache/veil``, by program). One model
        instance keeps its data; each step of a fit sends all its draws to it in one call.

        The log density is Stan's ``log_prob`` on the unconstrained space with normalising
        constants and the constraining transforms' log-Jacobians, its gradient Stan's reverse
        mode. Draws carry the parameters and transformed parameters, named and shaped as in
        the program. Stan's gradient is opaque to JAX: methods that need second derivatives or
        forward-mode derivatives of the log density do not apply to these targets.

        Needs ``pip install 'veil[stan]'`` (httpstan >= 4.13; tested with 4.13.0, which ships stanc3 2.35) and g++ or
        clang++.

        Raises:
            ValueError: the program does not compile (stanc's message is shown), the data miss
                a variable or break a declared constraint (Stan's message), or the program has
                no parameters.

        Examples:
            >>> import veil
            >>> code = '''
            ... data { int N; vector[N] y; }
            ... parameters { real mu; real<lower=0> sigma; }
            ... model { mu ~ normal(0, 10); sigma ~ lognormal(0, 1); y ~ normal(mu, sigma); }
            ... '''
            >>> t = veil.Target.from_stan(code, {"N": 3, "y": [1.0, 2.0, 3.0]})  # doctest: +SKIP
            >>> t.dim, t.names  # doctest: +SKIP
            (2, ('mu', 'sigma'))
        """
        sm = _stan.StanModel(program, data, seed=seed)
        log_density, constrain = _stan.jax_functions(sm)
        sites, offset = [], 0
        for name, size in sm.sites:
            sites.append(Site(name, offset, (size,)))
            offset += size
        names = tuple(n for n, _ in sm.variables)
        target = cls("stan", sm.dim, log_density, None, tuple(sites), names, None,
                     constrain=constrain, source=sm)
        check_log_density(log_density, None, sm.dim)
        return target

    def _fix_discrete(self, z):
        """``(model, continuous sites, their part of z)``: the model with its discrete sites
        (counts held as floats in ``z``, rounded) fixed at their values, as observed values are;
        the model itself where it has none."""
        if not self.discrete_sites:
            return self._model(), self.sites, z
        values = _unflatten(self.sites, z)
        fixed = {n: jnp.round(values[n]) for n in self.discrete_sites}
        continuous = tuple(s for s in self.sites if s.name not in self.discrete_sites)
        size = sum(s.size for s in continuous)
        return handlers.substitute(self._model(), data=fixed), continuous, z[..., :size]

    # ------------------------------------------------------------------ local latents
    @property
    def has_local(self) -> bool:
        """Whether the model has local latents: latent sites inside its subsampled plate, one
        per data row (``local_sites``), fitted by a local guide (``veil.PerDatum``,
        ``veil.Amortized``) beside the global family."""
        return bool(self.local_sites)

    @property
    def local_dim(self) -> int:
        """Unconstrained size of one row's local latents."""
        return sum(s.size for s in self.local_sites)

    def log_density_local(self, z: jax.Array, z_local: jax.Array) -> jax.Array:
        """``log p(z, z_local)`` with the local latents of the target's current rows
        (``z_local`` of shape ``(rows, local_dim)``, unconstrained: the batch's rows after
        :meth:`on_batch`, all ``N`` rows otherwise). On a batch it is NumPyro's unbiased
        estimate: the plate's terms, local priors included, scaled by ``N / B``."""
        args, kwargs = self.data
        values = {**_unflatten(self.sites, z), **_unflatten_local(self.local_sites, z_local)}
        return -potential_energy(self._model(), args, kwargs, values)

    def to_constrained_local(self, z: jax.Array, z_local: jax.Array) -> dict[str, jax.Array]:
        """As :meth:`to_constrained`, with the local latents of the current rows
        (``name -> [rows, ...]``)."""
        args, kwargs = self.data
        values = {**_unflatten(self.sites, z), **_unflatten_local(self.local_sites, z_local)}
        return constrain_fn(self._model(), args, kwargs, values, return_deterministic=True)

    def _refuse_local(self, what: str) -> None:
        if self.local_sites:
            raise ValueError(
                f"{what} needs every latent, and this model has local latents "
                f"({', '.join(repr(s.name) for s in self.local_sites)}, one per row of the plate "
                f"'{self.plate}'): use log_density_local(z, z_local), and fit it with a local guide "
                "(veil.fit(target, veil.Structured(global_family, veil.PerDatum(...))))."
            )

    # ------------------------------------------------------------------ evaluation
    def log_density_rows(self, z: jax.Array) -> jax.Array:
        """``log p`` of each row of ``z`` (shape ``(n, dim)``); see :func:`log_density_rows`."""
        return log_density_rows(self, z)

    def log_density(self, z: jax.Array) -> jax.Array:
        """``log p(z)`` for one flat unconstrained vector ``z`` of shape ``(dim,)``."""
        if self.kind == "stan":
            return self.fn(z)
        if self.kind == "pymc":
            values = _unflatten(self.sites, z)
            return self.fn(*(values[s.name] for s in self.sites), *self.data)[0]
        if self.kind == "numpyro":
            self._refuse_local("log_density(z)")
            model, sites, z = self._fix_discrete(z)
            return _numpyro_logdensity(model, sites, z, self.data, self.enum_dim is not None)
        if self.kind == "minibatched" and self._on_disk:
            return self.fn(z) + _streamed_loglik(self.loglik, self.store, z[None])[0]
        if self.kind == "minibatched":
            return _minibatch_logdensity(self.fn, self.loglik, self.num_data, z, self.data)
        if self.params is not None:  # a plain log density with parameters: fn(z, params)
            return self.fn(z, self.params)
        return _logdensity_from_fn(self.fn, z, self.data)

    def log_joint(self, z: jax.Array) -> jax.Array:
        """``log p`` at the *constrained* values one flat vector ``z`` maps to, without the
        change-of-variables term (``log |det J|`` of the transforms to unconstrained space) that
        :meth:`log_density` includes: what the classical MAP maximises (``veil.MAP()``). The
        same as :meth:`log_density` for a plain log density, which has no transforms.

        Raises:
            NotImplementedError: a Stan model (veil's bridge asks Stan for the density with
                its Jacobian only).
        """
        if self.kind == "stan":
            raise NotImplementedError(
                "A Stan target's density without the change-of-variables term is not available "
                "in veil yet: use veil.MAP(jacobian=True), the mode on the unconstrained space."
            )
        if self.kind == "pymc":
            values = _unflatten(self.sites, z)
            return self.fn(*(values[s.name] for s in self.sites), *self.data)[1]
        if self.kind == "numpyro":
            model, sites, z = self._fix_discrete(z)
            return _numpyro_log_joint(model, sites, z, self.data, self.enum_dim is not None)
        return self.log_density(z)

    @property
    def _on_disk(self) -> bool:
        """All rows on disk (not a batch of them in memory)."""
        return self.store is not None and self.data is None

    @property
    def has_likelihood(self) -> bool:
        """Whether :meth:`log_likelihood` is available (NumPyro models, or a plain log
        density given with ``log_likelihood=``)."""
        if self.enum_dim is not None:  # the observed sites' terms hold the enumerated dims
            return False
        return self.kind in ("numpyro", "minibatched") or self.loglik is not None

    def log_likelihood(self, z: jax.Array) -> jax.Array:
        """The data's part of :meth:`log_density` at one flat vector ``z``: the sum of the
        observed sites' log densities for a NumPyro model; ``log_density - log_likelihood``
        is the log prior (with the change-of-variables term)."""
        if self.kind == "numpyro":
            return _numpyro_loglikelihood(self._model(), self.sites, z, self.data)
        if self.kind == "minibatched" and self._on_disk:
            return _streamed_loglik(self.loglik, self.store, z[None])[0]
        if self.kind == "minibatched":
            return self.num_data / _leading(self.data) * self.loglik(z, self.data)
        if self.loglik is None:
            raise ValueError(
                "This target has no separate log likelihood: build it with "
                "veil.Target.from_logdensity(fn, dim, log_likelihood=...) or from a NumPyro model."
            )
        return _call(self.loglik, z, None if self.data is None else self.data[1])

    def prior_predictive(self, key: jax.Array, *args, num_samples: int = 1000, **kwargs) -> dict[str, jax.Array]:
        """``num_samples`` runs of a NumPyro model forward from its prior: every latent,
        observed and deterministic site, ``name -> [num_samples, ...]``; the model takes
        ``*args, **kwargs``, else the data the target holds (its observed values drawn anew).

        Raises:
            NotImplementedError: the target is not a NumPyro model.

        Examples:
            >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, veil
            >>> def model(y=None):
            ...     mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
            ...     numpyro.sample("y", dist.Normal(mu, 1.0).expand([3]), obs=y)
            >>> t = veil.Target.from_numpyro(model, jnp.zeros(3))
            >>> {k: v.shape for k, v in t.prior_predictive(jax.random.key(0), num_samples=5).items()}
            {'mu': (5,), 'y': (5, 3)}
        """
        _predictive.check_numpyro(self, "A prior predictive draw")
        num_samples = check_positive_int("num_samples", num_samples)
        return _predictive.prior_predictive(self, key, num_samples, args, kwargs)

    def to_constrained(self, z: jax.Array) -> dict[str, jax.Array]:
        """Map one unconstrained vector to a dict of named constrained values.

        For NumPyro models this includes ``numpyro.deterministic`` sites; a plain log-density
        target returns ``{"z": z}``.
        """
        if self.kind == "stan":
            return self.constrain(z)
        if self.kind == "pymc":
            values = _unflatten(self.sites, z)
            out = self.constrain(*(values[s.name] for s in self.sites), *self.data)
            return dict(zip(self.names, out))
        if self.kind == "numpyro":
            args, kwargs = self.data
            model, sites, zc = self._fix_discrete(z)
            out = constrain_fn(model, args, kwargs, _unflatten(sites, zc), return_deterministic=True)
            if self.discrete_sites:
                out.update({k: v for k, v in _unflatten(self.sites, z).items() if k in self.discrete_sites})
            return out
        return {"z": z}

    def unflatten(self, z: jax.Array) -> dict[str, jax.Array]:
        """Split a flat unconstrained vector into its named unconstrained pieces."""
        return _unflatten(self.sites, z)


def _row_sharding(mesh):
    """Leading axis (rows) split over every axis of ``mesh``; the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def _subsampled_plate(trace, latent) -> tuple[str | None, int | None, int | None, tuple[str, ...]]:
    """The model's plate with ``subsample_size < size`` (name, N, B) and the latent sites inside
    it (local latents, one per row), or Nones and ``()``; refuses more than one such plate, and
    a local site whose leading axis is not the plate's rows."""
    plates = [(name, *site["args"]) for name, site in trace.items()
              if site["type"] == "plate" and site["args"][1] is not None and site["args"][1] != site["args"][0]]
    if not plates:
        return None, None, None, ()
    if len(plates) > 1:
        raise NotImplementedError(
            f"The model subsamples {len(plates)} plates ({', '.join(p[0] for p in plates)}); veil "
            "fits models with one subsampled plate. Keep subsample_size on the data plate only."
        )
    name, size, batch = plates[0]
    local = tuple(n for n, site in latent.items() if any(f.name == name for f in site["cond_indep_stack"]))
    for n in local:
        shape = jnp.shape(latent[n]["value"])
        if not shape or shape[0] != batch:
            raise NotImplementedError(
                f"Local latent site '{n}' (inside the subsampled plate '{name}') has shape {shape}: veil "
                f"reads a local site's rows from its leading axis, which should be the plate's {batch} "
                "rows. Put the plate's dim first (numpyro.plate(..., dim=-k) for a value of k "
                "axes, or .to_event() for the per-row axes)."
            )
    return name, int(size), int(batch), local


def log_density_rows(target: Target, z: jax.Array) -> jax.Array:
    """``target.log_density`` of each row of ``z`` (shape ``(n, dim)``).

    A plain ``vmap`` for most targets. For a minibatched target each row reads all ``N`` data
    rows, and a ``vmap`` over ``n`` draws would hold ``n x N`` likelihood terms at once; the
    draws are then mapped over in blocks of at most ``2**24 / N`` (at least one).
    """
    if not target.is_minibatched:
        return jax.vmap(target.log_density)(z)
    if target._on_disk:  # the rows streamed once for all the draws
        return jax.vmap(target.fn)(z) + _streamed_loglik(target.loglik, target.store, z)
    block = max(1, min(z.shape[0], _ROWS_BUDGET // target.num_data))
    return jax.lax.map(target.log_density, z, batch_size=block)


def _finite_on_device(leaf) -> bool:
    """Whether a device array is finite throughout, checked where it lives (a 4 GB array on a
    GPU is not copied to the host to be checked); ``False`` for host arrays and for global
    arrays spanning processes, which the callers check piece by piece on the host."""
    if not isinstance(leaf, jax.Array) or not leaf.is_fully_addressable:
        return False
    return bool(_all_finite(leaf))


@jax.jit
def _all_finite(x):
    return jnp.isfinite(x).all()


def _check_rows_finite(leaves) -> None:
    """Name the first data leaf holding a NaN or inf, and the first bad row in it."""
    for path, leaf in leaves:
        if not np.issubdtype(np.dtype(leaf.dtype), np.inexact) or _finite_on_device(leaf):
            continue
        # A global array of several processes (multi-host data): each process checks the rows
        # it holds, numbered as rows of the whole array.
        parts = ([(s.index[0].start or 0, np.asarray(s.data)) for s in leaf.addressable_shards]
                 if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable else [(0, np.asarray(leaf))])
        for offset, arr in parts:
            bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
            if bad.any():
                where = jax.tree_util.keystr(path) or "(the array)"
                raise ValueError(
                    f"data {where} holds non-finite values (NaN or inf) in {int(bad.sum())} row(s), the "
                    f"first at row {offset + int(np.argmax(bad))}. A NaN row turns every step that draws "
                    "it into NaN. Drop or impute those rows before building the target."
                )


def _check_data_finite(args, kwargs) -> None:
    leaves = jax.tree_util.tree_leaves_with_path((args, kwargs))
    for path, leaf in leaves:
        if (isinstance(leaf, (jax.Array, np.ndarray)) and jnp.issubdtype(leaf.dtype, jnp.inexact)
                and not _finite_on_device(leaf)):
            finite = np.isfinite(np.asarray(leaf))
            bad = int(finite.size - np.count_nonzero(finite))
            if bad:
                where = jax.tree_util.keystr(path)
                first = tuple(int(i) for i in np.argwhere(~finite)[0]) if finite.ndim else ()
                raise ValueError(
                    f"Model data {where} holds {bad} non-finite value(s) (NaN or inf), the first at "
                    f"index {first[0] if len(first) == 1 else first}. A NaN in "
                    "the data silently turns the whole posterior into NaN. Drop or impute those "
                    "entries, or model them as latent sites (e.g. with `obs_mask`)."
                )
