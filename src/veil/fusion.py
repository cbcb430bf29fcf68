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
the same product for Gaussians).

:func:`smc_fusion` fuses *draws* of the sub-posteriors instead, whatever their shape, by the
Fusion construction of Dai, Pollock & Roberts ("Monte Carlo Fusion", 2019) run as sequential
Monte Carlo in a divide-and-conquer tree (Chan, Pollock, Johansen & Roberts,
"Divide-and-Conquer Fusion"): see its docstring. :func:`fuse_fits` turns shard fits into
such draws (importance resampling of each ``q_s`` towards its ``p_s``) and fuses them.

Examples:
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
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from veil._checks import Int, Real
from veil.family import Family
from veil.families.gaussian import FullRank, LowRank, MeanField
from veil.target import Target, log_density_rows
from veil.families.gaussian import gaussian_to_family
from veil.fit import fit

__all__ = ["shard_targets", "fit_shards", "consensus", "smc_fusion", "fuse_fits", "FusedDraws", "FusionNode"]


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

    return gaussian_to_family(q, mean, cov)


# ---------------------------------------------------------------------------- sample-based fusion
# Likelihood terms live at once when phi is evaluated over many particles (see _phi_rows).
_PHI_BUDGET = 2**24


class FusionNode(NamedTuple):
    """How one fusion of the tree went."""

    shards: tuple[int, ...]  # the sub-posteriors this node's draws now target the product of
    time: float  # the fusion time T (in the node's whitened coordinates)
    ess: np.ndarray  # effective sample size / n after each reweighting (start, then each step)
    resamples: int  # times the particles were resampled (the final one not counted)
    dropped: int  # particle moves whose phi was not finite (given zero weight)


class FusedDraws(NamedTuple):
    """Equally weighted draws of the fused posterior, and how each fusion went."""

    draws: jax.Array  # (n, dim)
    nodes: list[FusionNode]

    @property
    def mean(self) -> jax.Array:
        return jnp.mean(self.draws, axis=0)

    @property
    def cov(self) -> jax.Array:
        return jnp.cov(self.draws, rowvar=False).reshape(self.draws.shape[1], self.draws.shape[1])

    @property
    def min_ess(self) -> float:
        """The smallest effective sample size fraction met in any fusion: below ~0.05 the
        draws stand on few distinct ancestors, and the fused draws are unreliable."""
        return float(min(np.min(n.ess) for n in self.nodes)) if self.nodes else 1.0


def _log_f(targets, x):
    """The log density of a node: the sum of its sub-posteriors' log densities."""
    return sum(t.log_density(x) for t in targets)


def _phi_rows(targets, mu, chol, u):
    """``phi(u) = (|grad A(u)|^2 + Laplacian A(u)) / 2`` for each row of ``u``, where
    ``A(u) = log f(mu + chol u)``: the killing rate of the Langevin diffusion with invariant
    density ``f^2`` relative to Brownian motion (Girsanov). Rows mapped in blocks that keep
    the likelihood terms of a minibatched target's rows under ``_PHI_BUDGET``."""
    dim = u.shape[-1]

    def one(v):
        a = lambda w: _log_f(targets, mu + chol @ w)  # noqa: E731
        g = jax.grad(a)(v)
        return 0.5 * (g @ g + jnp.trace(jax.jacfwd(jax.grad(a))(v)))

    rows = sum(t.num_data or 1 for t in targets) * (dim + 1)
    block = max(1, min(u.shape[0], _PHI_BUDGET // rows))
    return jax.lax.map(one, u, batch_size=block)


def _systematic(key, lw, n: int):
    """Systematic resampling: ``n`` ancestor indices for log weights ``lw``."""
    w = jnp.exp(lw - jnp.max(lw))
    cdf = jnp.cumsum(w / jnp.sum(w))
    points = (jax.random.uniform(key) + jnp.arange(n)) / n
    return jnp.minimum(jnp.searchsorted(cdf, points), lw.shape[0] - 1)


def _fusion_time(d2: np.ndarray, threshold: float) -> float:
    """The smallest fusion time ``T`` at which the start weights
    ``exp(-sum_c |u_c - mean u|^2 / (2T))`` keep an effective sample size of ``threshold n``
    (bisection on ``log T``; the ESS grows with ``T``). ``d2``: each particle's
    ``sum_c |u_c - mean u|^2``. A longer ``T`` would only lengthen the diffusions, whose
    weights then vary more."""
    n = d2.shape[0]

    def ess(t):
        lw = -d2 / (2 * t)
        w = np.exp(lw - lw.max())
        return w.sum() ** 2 / (w**2).sum() / n

    lo, hi = 1e-6, 1e6
    if ess(hi) < threshold:
        return hi
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ess(mid) < threshold else (lo, mid)
    return hi


@eqx.filter_jit
def _phis(children, mu, chol, u):
    """phi of every child at its particles ``u`` (children, n, dim) -> (children, n)."""
    return jnp.stack([_phi_rows(children[c], mu, chol, u[c]) for c in range(u.shape[0])])


@eqx.filter_jit
def _move(children, mu, chol, u, phi, noise, s, tau, time):
    """Move the children's particles from time ``s`` to ``s + tau`` as Brownian motions
    conditioned to meet at ``time``, with the given standard normal ``noise`` (a pair: for the
    children's mean and for their deviations). Returns the moved particles, their phi, and the
    log weight increments ``-int_s^{s+tau} sum_c phi_c`` (trapezoid rule; ``-inf`` where a phi
    is not finite)."""
    num_children = u.shape[0]
    rest = time - s
    # Their mean is a free Brownian motion of rate 1/C; their deviations from it a Brownian
    # bridge to zero at `time`, independent of the mean.
    mean = jnp.mean(u, axis=0)
    eta = noise[1] - jnp.mean(noise[1], axis=0)
    spread = jnp.sqrt(jnp.maximum(tau * (rest - tau) / rest, 0.0))
    new_mean = mean + jnp.sqrt(tau / num_children) * noise[0]
    u_new = new_mean + (u - mean) * (1.0 - tau / rest) + spread * eta
    phi_new = _phis(children, mu, chol, u_new)
    inc = -0.5 * tau * jnp.sum(phi + phi_new, axis=0)
    ok = jnp.isfinite(inc)
    return u_new, jnp.where(ok[None], phi_new, 0.0), jnp.where(ok, inc, -jnp.inf)


def _ess(lw: np.ndarray) -> float:
    """Effective sample size fraction of log weights ``lw``."""
    if not np.isfinite(lw).any():
        return 0.0
    w = np.exp(lw - lw[np.isfinite(lw)].max())
    return float(w.sum() ** 2 / (w**2).sum() / lw.shape[0])


def _fuse_node(children, u, mu, chol, time: float, key, num_steps: int, threshold: float, cess: float):
    """One fusion by sequential Monte Carlo (see :func:`smc_fusion`). ``u`` (children, n,
    dim): the children's particles in the node's whitened coordinates, paired by row.

    Steps start at ``time / num_steps`` and are halved (at most ``_MAX_HALVINGS`` times, the
    same noise rescaled) until the step's weights keep a conditional effective sample size of
    ``cess``; the next step may double again. Returns the fused particles (resampled, equally
    weighted) in the original coordinates, and the node's record."""
    n = u.shape[1]
    mu, chol = jnp.asarray(mu, jnp.float32), jnp.asarray(chol, jnp.float32)
    u = jnp.asarray(u, jnp.float32)
    lw = -np.sum((np.asarray(u) - np.asarray(u).mean(axis=0)) ** 2, axis=(0, 2)) / (2 * time)
    phi = _phis(children, mu, chol, u)
    bad = ~np.isfinite(np.asarray(phi)).all(axis=0)
    lw, dropped = np.where(bad, -np.inf, lw), int(bad.sum())
    phi = jnp.where(jnp.asarray(bad)[None], 0.0, phi)
    ess, resamples, s, tau = [_ess(lw)], 0, 0.0, time / num_steps

    def resample(key, u, phi, lw):
        idx = _systematic(key, jnp.asarray(lw, jnp.float32), n)
        return u[:, idx], phi[:, idx], np.zeros(n)

    while s < time:
        key, k_res, k_mean, k_dev = jax.random.split(key, 4)
        if ess[-1] < threshold:
            u, phi, lw = resample(k_res, u, phi, lw)
            resamples += 1
        noise = (jax.random.normal(k_mean, u.shape[1:]), jax.random.normal(k_dev, u.shape))
        tau = min(tau, time - s)
        for _ in range(_MAX_HALVINGS + 1):
            moved = _move(children, mu, chol, u, phi, noise, jnp.float32(s), jnp.float32(tau), jnp.float32(time))
            inc = np.asarray(moved[2], np.float64)
            if _conditional_ess(lw, inc) >= cess or tau <= time / num_steps / 2**_MAX_HALVINGS:
                break
            tau /= 2
        u, phi = moved[0], moved[1]
        dropped += int(np.sum(~np.isfinite(inc)))
        lw = lw + inc
        ess.append(_ess(lw))
        if ess[-1] == 0.0:
            raise FloatingPointError(
                "Every particle of the fusion lost its weight (the sub-posteriors' log densities or "
                "their derivatives were not finite where the particles moved): check the targets' "
                "log densities far from their draws, or fuse fewer shards."
            )
        s = time if time - (s + tau) < 1e-6 * time else s + tau
        tau = min(2 * tau, time / num_steps)
    # At `time` the children coincide: one point per particle, resampled by its weight.
    y = u[0, _systematic(key, jnp.asarray(lw, jnp.float32), n)]
    return mu + y @ chol.T, ess, resamples, dropped


# Halvings of a fusion step before it is taken whatever its weights.
_MAX_HALVINGS = 8


def _conditional_ess(lw: np.ndarray, inc: np.ndarray) -> float:
    """ESS fraction of the step's incremental weights under the current weights (Zhou,
    Johansen & Aston's conditional ESS): ``(sum W w)^2 / sum W w^2`` for normalised ``W``."""
    if not np.isfinite(inc).any():
        return 0.0
    W = np.exp(lw - lw[np.isfinite(lw)].max()) if np.isfinite(lw).any() else np.ones_like(lw)
    W = W / W.sum()
    w = np.exp(np.where(np.isfinite(inc), inc - inc[np.isfinite(inc)].max(), -np.inf))
    return float((W * w).sum() ** 2 / (W * w**2).sum())


def _whitening(parts: Sequence[jax.Array], names: Sequence[tuple[int, ...]]):
    """The Gaussian product of the children's moment fits: its mean and the Cholesky factor
    of its covariance, the node's whitened coordinates ``u = chol^{-1} (x - mean)``."""
    precs, shifted = [], []
    for x, name in zip(parts, names):
        x = np.asarray(x, np.float64)
        cov = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])
        if np.linalg.eigvalsh(cov)[0] <= 1e-12 * max(np.trace(cov), 1e-300):
            distinct = len(np.unique(x, axis=0))
            raise ValueError(
                f"The draws of sub-posterior(s) {list(name)} are degenerate ({distinct} distinct draws "
                f"in dimension {x.shape[1]}): they span no full-dimensional cloud to fuse. If they come "
                "from importance resampling (fuse_fits), q missed its sub-posterior: use fewer shards "
                "(more rows each) or a richer family."
            )
        prec = np.linalg.inv(cov)
        precs.append(prec)
        shifted.append(prec @ x.mean(axis=0))
    cov = np.linalg.inv(sum(precs))
    cov = 0.5 * (cov + cov.T)
    return cov @ sum(shifted), np.linalg.cholesky(cov)


def smc_fusion(
    targets: Sequence[Target],
    draws: Sequence[ArrayLike],
    *,
    key: jax.Array,
    num_steps: Int = 32,
    ess_threshold: Real = 0.5,
    cess_threshold: Real = 0.9,
) -> FusedDraws:
    """Draws of ``p(z) ∝ prod_s p_s(z)`` from draws of each sub-posterior ``p_s``: Fusion by
    sequential Monte Carlo, pairwise in a divide-and-conquer tree.

    The Fusion identity (Dai, Pollock & Roberts 2019): let ``X^c`` be Langevin diffusions with
    invariant densities ``f_c^2``, started at ``x_c ~ f_c`` and conditioned to meet at time
    ``T``. Since ``int f_c^2(x) p_T(y | x) dx = f_c^2(y)``, the meeting point ``y`` has density
    ``∝ prod_c f_c^2(y) / f_c(y) = prod_c f_c(y)``. By Girsanov's theorem each diffusion is a
    Brownian motion reweighted by ``exp(A_c(X_T) - A_c(X_0) - int_0^T phi_c(X_t) dt)``,
    ``A_c = log f_c``, ``phi_c = (|grad A_c|^2 + Laplacian A_c) / 2``; the end-point terms
    cancel against ``f_c^2 / f_c``, which leaves: draw ``x_c ~ f_c``, weight by
    ``exp(-sum_c |x_c - mean x|^2 / (2T))`` (the Brownian motions meeting), move them as
    Brownian motions conditioned to meet at ``T`` and weight by ``exp(-sum_c int phi_c)``.

    Here the move runs over ``num_steps`` equal steps of ``[0, T]`` with the weights updated
    (trapezoid rule for the path integral) and the particles resampled (systematic) whenever
    the effective sample size falls below ``ess_threshold n``, as sequential Monte Carlo
    (the "Bayesian Fusion" scheme); and sub-posteriors are fused two at a time up a binary
    tree, each node's product becoming a child of the next level, as in Divide-and-Conquer
    Fusion (Chan, Pollock, Johansen & Roberts), whose point is that a pair's fusion stays
    well-conditioned however many shards there are. Each node works in the whitened
    coordinates of the Gaussian product of its children's moment fits (a common linear
    preconditioner; the product density is unchanged up to a constant), and picks the
    smallest ``T`` at which the start weights keep ``ess_threshold n`` effective draws.

    Not exact: the trapezoid rule puts an ``O((T / num_steps)^2)`` error in each path
    integral, where the exact Fusion algorithms use unbiased Poisson estimators on bounded
    ("layered") Brownian bridges; and the draws are only as good as the sub-posterior draws
    given. Check ``FusedDraws.min_ess``, and compare a larger ``num_steps``.

    Args:
        targets: the sub-posteriors ``p_s`` (e.g. :func:`shard_targets`): their
            ``log_density`` must be twice differentiable.
        draws: for each, an array ``(n, dim)`` of draws of ``p_s`` (the same ``n``).
        key: a JAX key.
        num_steps: steps of each fusion's time mesh.
        ess_threshold: resample when the ESS falls below this fraction of ``n``.

    Returns:
        :class:`FusedDraws`: ``n`` equally weighted draws and each node's record.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> ts = [veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum((z - 1.0) ** 2), dim=1),
        ...       veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum((z + 1.0) ** 2), dim=1)]
        >>> xs = [1.0 + jax.random.normal(jax.random.key(0), (2000, 1)),
        ...       -1.0 + jax.random.normal(jax.random.key(1), (2000, 1))]
        >>> out = veil.fusion.smc_fusion(ts, xs, key=jax.random.key(2))
        >>> bool(abs(float(out.mean[0])) < 0.1 and abs(float(out.cov[0, 0]) - 0.5) < 0.1)
        True
    """
    targets, draws = list(targets), [jnp.asarray(x) for x in draws]
    if not targets or len(targets) != len(draws):
        raise ValueError(f"smc_fusion needs one array of draws per target: got {len(targets)} targets and {len(draws)} arrays.")
    dim = targets[0].dim
    for s, (t, x) in enumerate(zip(targets, draws)):
        if t.dim != dim or x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(f"Sub-posterior {s}: draws of shape {x.shape} for a target of dimension {t.dim}; "
                             f"every target needs dimension {dim} and draws of shape (n, {dim}).")
    sizes = {x.shape[0] for x in draws}
    if len(sizes) > 1:
        raise ValueError(f"Every sub-posterior needs the same number of draws, got {sorted(sizes)}.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
    if not 0.0 < ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold must be in (0, 1], got {ess_threshold!r}.")
    for s, x in enumerate(draws):
        if not bool(jnp.all(jnp.isfinite(x))):
            raise ValueError(f"The draws of sub-posterior {s} hold NaN or inf.")
    n = draws[0].shape[0]
    level = [((s,), (t,), x) for s, (t, x) in enumerate(zip(targets, draws))]
    nodes: list[FusionNode] = []
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level) - 1, 2):
            (sa, ta, xa), (sb, tb, xb) = level[i], level[i + 1]
            key, k_pair, k_fuse = jax.random.split(key, 3)
            xb = xb[jax.random.permutation(k_pair, n)]  # pair the children's draws at random
            mu, chol = _whitening([xa, xb], [sa, sb])
            u = np.stack([np.linalg.solve(chol, (np.asarray(x, np.float64) - mu).T).T for x in (xa, xb)])
            d2 = np.sum((u - u.mean(axis=0)) ** 2, axis=(0, 2))
            time = _fusion_time(d2, ess_threshold)
            fused, ess, count, dropped = _fuse_node(
                (ta, tb), u, mu, chol, time, k_fuse, int(num_steps), float(ess_threshold), float(cess_threshold))
            nodes.append(FusionNode(sa + sb, time, np.asarray(ess), count, dropped))
            nxt.append((sa + sb, ta + tb, fused))
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return FusedDraws(level[0][2], nodes)


def fuse_fits(parts: Sequence, *, key: jax.Array, num_draws: Int = 2000, oversample: Int = 4, **kwargs) -> FusedDraws:
    """Fuse fitted sub-posteriors (the results of :func:`fit_shards`) by :func:`smc_fusion`.

    Each fit's ``q_s`` gives ``oversample x num_draws`` draws, importance-resampled towards its
    target ``p_s`` (weights ``p_s / q_s``, systematic resampling) to ``num_draws``: draws of
    ``p_s`` itself, up to the importance sampling's own error (large where ``q_s`` misses
    mass: check each part's k-hat). ``kwargs`` go to :func:`smc_fusion`.
    """

    targets, draws = [], []
    for s, res in enumerate(parts):
        if not hasattr(res, "q") or not hasattr(res, "target"):
            raise TypeError(f"Part {s} is not a fit result (veil.fit / fit_shards output), got {type(res).__name__}.")
        key, k_draw, k_pick = jax.random.split(key, 3)
        z, log_q = res.q.sample_and_log_prob(k_draw, oversample * num_draws)
        lw = log_density_rows(res.target, z) - log_q
        lw = jnp.where(jnp.isfinite(lw), lw, -jnp.inf)
        draws.append(z[_systematic(k_pick, lw, num_draws)])
        targets.append(res.target)
    return smc_fusion(targets, draws, key=key, **kwargs)
