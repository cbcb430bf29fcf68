"""Sub-posterior fusion: fit each shard of the data on its own, then combine the fits.

With the rows split into ``S`` shards, the posterior factors as

    p(z | x) ∝ prod_{s=1}^S [ p(z)^(1/S) p(x_s | z) ] = prod_s p_s(z),

so each *sub-posterior* ``p_s`` (the shard's likelihood under the prior raised to ``1/S``) can
be fitted with no communication between shards, on separate machines or one after another.
:func:`consensus` combines Gaussian fits by their product: precisions add,

    Lambda = sum_s Lambda_s,    m = Lambda^{-1} sum_s Lambda_s m_s,

which is the exact posterior whenever the sub-posteriors are Gaussian (a conjugate linear
model) and a good one when each is nearly Gaussian ("consensus" combination; Scott et al.
2016, "Bayes and big data: the consensus Monte Carlo algorithm", whose draw-averaging rule is
the same product for Gaussians). Fusion of non-Gaussian, sample-based sub-posteriors
("Divide-and-Conquer Fusion", Chan et al.) is not built yet.

Example:
    >>> import jax, jax.numpy as jnp, numpy as np, veil
    >>> x = np.random.default_rng(0).normal(1.0, 1.0, 4000).astype(np.float32)
    >>> parts = veil.fusion.fit_shards(
    ...     lambda z: -0.5 * jnp.sum(z**2), lambda z, xb: jnp.sum(-0.5 * (xb - z[0]) ** 2),
    ...     x, veil.FullRank(1), dim=1, num_shards=4, key=jax.random.key(0), progress=False)
    >>> q = veil.fusion.consensus(parts)
    >>> bool(abs(float(q.mean[0]) - x.sum() / 4001) < 0.005)
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from veil.families.base import Family
from veil.families.gaussian import FullRank, LowRank, MeanField
from veil.target import Target

__all__ = ["shard_targets", "fit_shards", "consensus"]


def _tempered(log_prior, power, z):
    return power * log_prior(z)


def shard_targets(
    log_prior: Callable[[jax.Array], jax.Array],
    log_lik: Callable[[jax.Array, Any], jax.Array],
    data: Any,
    *,
    dim: int,
    num_shards: int,
    batch_size: int | None = None,
) -> list[Target]:
    """The ``num_shards`` sub-posterior targets ``p(z)^(1/S) p(x_s | z)``.

    The rows of ``data`` (a pytree with a shared leading axis, as for
    :meth:`Target.minibatched`) are cut into ``num_shards`` contiguous, nearly equal shards
    (shuffle the rows first if their order carries structure). Each target is a
    ``Target.minibatched`` over its shard, so a shard can itself be fitted on minibatches
    (``batch_size``; default: the whole shard each step). All shards share one tempered
    prior and one ``log_lik``, so shards of equal size share one compiled fit.
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}.")
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("data holds no arrays.")
    n = np.shape(leaves[0])[0]
    if num_shards > n:
        raise ValueError(f"num_shards={num_shards} is more than the {n} rows of data.")
    prior = functools.partial(_tempered, log_prior, 1.0 / num_shards)
    bounds = np.linspace(0, n, num_shards + 1).round().astype(int)
    targets = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        shard = jax.tree.map(lambda x: x[lo:hi], data)
        b = hi - lo if batch_size is None else min(batch_size, hi - lo)
        targets.append(Target.minibatched(prior, log_lik, shard, dim=dim, batch_size=b))
    return targets


def fit_shards(
    log_prior: Callable[[jax.Array], jax.Array],
    log_lik: Callable[[jax.Array, Any], jax.Array],
    data: Any,
    q: Family,
    *,
    dim: int,
    num_shards: int,
    key: jax.Array,
    batch_size: int | None = None,
    **fit_kwargs,
):
    """Fit ``q`` to each sub-posterior of :func:`shard_targets` (independently: each fit
    sees only its shard), with ``veil.fit(..., **fit_kwargs)`` and a key per shard.

    Returns the list of :class:`~veil.VIResult`; pass it to :func:`consensus`.
    """
    from veil.fit import fit

    targets = shard_targets(log_prior, log_lik, data, dim=dim, num_shards=num_shards, batch_size=batch_size)
    keys = jax.random.split(key, len(targets))
    return [fit(t, q, key=k, **fit_kwargs) for t, k in zip(targets, keys)]


def consensus(parts: Sequence) -> Family:
    """The product of Gaussian sub-posterior fits, normalised: a Gaussian family.

    ``parts``: fitted Gaussian families (``MeanField``, ``FullRank``, ``LowRank``) or results
    whose ``.q`` is one (the output of :func:`fit_shards`). Returns a ``MeanField`` if every
    part is one (a product of diagonal Gaussians is diagonal), else a ``FullRank``.

    Raises:
        TypeError: a part is not a Gaussian family (fuse those by sampling instead).
        ValueError: the parts differ in dimension, or there are none.
    """
    families = [getattr(p, "q", p) for p in parts]
    if not families:
        raise ValueError("consensus needs at least one sub-posterior fit.")
    for f in families:
        if not isinstance(f, (MeanField, FullRank, LowRank)):
            raise TypeError(
                f"consensus multiplies Gaussian fits (MeanField, FullRank, LowRank), got "
                f"{type(f).__name__}: fit the shards with a Gaussian family."
            )
    dims = {f.dim for f in families}
    if len(dims) > 1:
        raise ValueError(f"The sub-posterior fits have different dimensions {sorted(dims)}.")
    if all(isinstance(f, MeanField) for f in families):
        prec = sum(jnp.exp(-2.0 * f.log_scale) for f in families)
        mean = sum(jnp.exp(-2.0 * f.log_scale) * f.loc for f in families) / prec
        out = MeanField(dims.pop())
        return _set(out, mean, jnp.diag(1.0 / prec))
    precs = [jnp.linalg.inv(f.cov) for f in families]
    prec = sum(precs)
    prec = 0.5 * (prec + prec.T)
    mean = jnp.linalg.solve(prec, sum(p @ f.mean for p, f in zip(precs, families)))
    return _set(FullRank(dims.pop()), mean, jnp.linalg.inv(prec))


def _set(q, mean, cov):
    from veil.pathfinder import gaussian_to_family

    return gaussian_to_family(q, mean, cov)
