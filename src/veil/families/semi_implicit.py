"""Semi-implicit family: a neural sampler with Gaussian noise, fitted through the SIVI bound.

The implicit-VI idea ("Implicit Variational Inference for High-Dimensional Posteriors",
Uppal, Stensbo-Smidt, Boomsma & Frellsen 2023) is a neural sampler ``z = g(eps)`` whose density
is never written down. Scoped here to the version whose bound is exact and testable: a
*semi-implicit* hierarchy (Yin & Zhou 2018, "Semi-Implicit Variational Inference"),

    eps ~ N(0, I_k),   u | eps ~ N(m_psi(eps), diag(sigma^2)),   z = G(u),

with ``m_psi`` an MLP and ``G`` a Gaussian family's affine map (``MeanField`` or ``FullRank``,
the *base*, applied last as for veil's flows, so the network works in standardised units). The
marginal ``q(z) = E_eps[q(z | eps)]`` has no closed form, but with ``eps_0`` the mixing draw
that produced ``z`` and ``K`` further independent draws ``eps_1..eps_K``,

    log q_K(z) = log (1 / (K+1)) sum_{k=0}^{K} q(z | eps_k)

over-estimates ``log q(z)`` in expectation, ``E[log q_K(z)] >= E[log q(z)]``, decreasingly in
``K`` and tightly as ``K -> infinity`` (Yin & Zhou 2018; Molchanov, Kharitonov, Sobolev & Vetrov
2019). ``SemiImplicit.sample_and_log_prob`` returns ``log q_K``, so the ELBO that every veil
objective computes from it is a lower bound on the true ELBO of ``q`` (and on ``log Z``):
``veil.fit(target, veil.SemiImplicit(d, key=k), key=...)`` maximises the SIVI bound. The
``K`` inner draws are shared by the batch of draws (one network pass each), which keeps the
bound for every draw.

Only the ELBO with path-wise gradients (``Reparam``, fit's default here) is a bound with
``log q_K``; ``STL`` assumes the exact density and k-hat and evidence estimates computed from
``log q_K`` are approximate (``log_prob`` refuses, pointing to :meth:`log_prob_estimate`).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from veil._checks import check_positive_int as _check_positive_int
from veil.family import Family, FitDefaults, MonteCarloMoments, Staged
from veil.families.flows import NEURAL_DEFAULTS
from veil.families.gaussian import FullRank, MeanField
from veil._checks import check_dim as _check_dim

__all__ = ["SemiImplicit"]

_WATCH_KEY = 20190701
_WATCH_POINTS = 64


def _normal_logpdf(u, mean, log_sd):
    return jnp.sum(-0.5 * ((u - mean) * jnp.exp(-log_sd)) ** 2 - log_sd, axis=-1) - 0.5 * u.shape[-1] * math.log(
        2 * math.pi
    )


class SemiImplicit(MonteCarloMoments, Staged):
    """Semi-implicit family ``z = G(m(eps) + sigma * eta)`` (see the module docstring).

    Args:
        dim: dimension of ``z``.
        key: initialises the network.
        base: the Gaussian ``G`` (``MeanField`` or ``FullRank``); default ``MeanField(dim)``,
            which ``veil.fit`` fits alone first (as for flows), then the whole family over it.
        mixing_dim: dimension ``k`` of the mixing noise (default ``dim``).
        width, depth: the MLP ``m`` (``depth=0`` is an affine map, under which ``q`` is
            Gaussian: the case the tests check against closed forms).
        num_inner: ``K``, extra mixing draws in ``log q_K`` (larger: tighter bound, and
            ``K`` network passes per estimate).
        init_noise: starting ``sigma`` (standardised units).

    Examples:
        >>> import jax, veil
        >>> q = veil.SemiImplicit(2, key=jax.random.key(0), width=8)
        >>> z, lq = q.sample_and_log_prob(jax.random.key(1), 3)
        >>> z.shape, lq.shape
        ((3, 2), (3,))
    """

    net: eqx.nn.MLP
    log_noise: jax.Array
    base: Family
    dim: int = eqx.field(static=True)
    mixing_dim: int = eqx.field(static=True)
    num_inner: int = eqx.field(static=True)
    fit_base_first: bool = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        key: PRNGKeyArray,
        base: Family | None = None,
        mixing_dim: int | None = None,
        width: int = 50,
        depth: int = 2,
        num_inner: int = 50,
        init_noise: float = 0.9,
    ):

        self.dim = _check_dim(dim)
        self.mixing_dim = self.dim if mixing_dim is None else _check_positive_int("mixing_dim", mixing_dim)
        width = _check_positive_int("width", width)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative integer, got {depth!r}.")
        self.num_inner = _check_positive_int("num_inner", num_inner)
        if isinstance(init_noise, bool) or not isinstance(init_noise, (int, float)) or not (
            math.isfinite(init_noise) and init_noise > 0
        ):
            raise ValueError(f"init_noise must be a positive finite number, got {init_noise!r}.")
        self.fit_base_first = base is None
        base = MeanField(self.dim) if base is None else base
        if not isinstance(base, (MeanField, FullRank)):
            raise TypeError(f"base must be a veil.MeanField or veil.FullRank, got {type(base).__name__}.")
        if base.dim != self.dim:
            raise ValueError(f"base has dim {base.dim} but the family has dim {self.dim}.")
        net = eqx.nn.MLP(self.mixing_dim, self.dim, width, depth, activation=jnp.tanh, key=key)
        # Shrink the last layer: the network's output starts with sd ~0.1, so q starts close to
        # its base, but not at a constant m (where the last layer's expected gradient is zero).
        last = net.layers[-1]
        net = eqx.tree_at(lambda n: (n.layers[-1].weight, n.layers[-1].bias), net,
                          (0.3 * last.weight, jnp.zeros_like(last.bias)))
        self.net = net
        self.log_noise = jnp.full(self.dim, math.log(init_noise))
        self.base = base

    def fit_defaults(self, *, minibatched: bool) -> FitDefaults:
        del minibatched
        return NEURAL_DEFAULTS

    def with_base(self, base: Family) -> "SemiImplicit":
        """The same network and noise over another base (``fit``'s second stage); the base
        is then the user's, so a later ``fit`` does not refit it first."""
        new = eqx.tree_at(lambda q: q.base, self, base)
        object.__setattr__(new, "fit_base_first", False)  # a static field: not a tree leaf
        return new

    # ------------------------------------------------------------------ pieces
    def _means(self, eps):
        return jax.vmap(self.net)(eps)

    def _log_det_base(self):
        zero = jnp.zeros((1, self.dim))
        _, lq = self.base.transform_and_log_prob(zero)
        return lq[0] + 0.5 * self.dim * math.log(2 * math.pi)  # -log|det S|

    def _log_q_hat(self, u, means0, inner_means):
        """``log q_K`` in standardised units for draws ``u`` made from ``means0``."""
        own = _normal_logpdf(u, means0, self.log_noise)
        cross = jax.vmap(lambda m: _normal_logpdf(u, m, self.log_noise))(inner_means)  # [K, n]
        stacked = jnp.concatenate([own[None], cross], axis=0)
        return jax.nn.logsumexp(stacked, axis=0) - math.log(self.num_inner + 1)

    # ------------------------------------------------------------------ the Family interface
    def sample_and_log_prob(self, key, n):
        """``n`` draws and ``log q_K`` of each (an over-estimate of ``log q`` in expectation:
        the ELBO from it is the SIVI lower bound)."""
        k0, k_noise, k_inner = jax.random.split(key, 3)
        means0 = self._means(jax.random.normal(k0, (n, self.mixing_dim)))
        u = means0 + jnp.exp(self.log_noise) * jax.random.normal(k_noise, (n, self.dim))
        inner = self._means(jax.random.normal(k_inner, (self.num_inner, self.mixing_dim)))
        z = self.base.transform_and_log_prob(u)[0]
        return z, self._log_q_hat(u, means0, inner) + self._log_det_base()

    def sample(self, key, n):
        k0, k_noise = jax.random.split(key)
        means0 = self._means(jax.random.normal(k0, (n, self.mixing_dim)))
        u = means0 + jnp.exp(self.log_noise) * jax.random.normal(k_noise, (n, self.dim))
        return self.base.transform_and_log_prob(u)[0]

    def log_prob(self, z):
        raise NotImplementedError(
            "A semi-implicit family has no closed-form density. Use "
            "log_prob_estimate(z, key=..., num_inner=...), an importance estimate over the "
            "mixing noise, or sample_and_log_prob, whose log q_K gives the SIVI bound."
        )

    def log_prob_estimate(self, z, *, key: PRNGKeyArray, num_inner: int = 10_000):
        """``log (1/K) sum_k q(z | eps_k)``, ``eps_k ~ N(0, I)``: consistent for ``log q(z)``
        as ``K`` grows (biased low by about ``var / 2K`` of the ratio, by Jensen).

        Examples:
            >>> import jax, jax.numpy as jnp, veil
            >>> q = veil.SemiImplicit(2, key=jax.random.key(0), width=8)
            >>> q.log_prob_estimate(jnp.zeros((4, 2)), key=jax.random.key(1)).shape
            (4,)
        """
        z = jnp.asarray(z, float)
        flat = z.reshape(-1, self.dim)
        u = self.base.whiten(flat)
        means = self._means(jax.random.normal(key, (int(num_inner), self.mixing_dim)))
        terms = jax.vmap(lambda m: _normal_logpdf(u, m, self.log_noise))(means)
        out = jax.nn.logsumexp(terms, axis=0) - math.log(int(num_inner)) + self._log_det_base()
        return out.reshape(z.shape[:-1])

    def watched(self):
        """Where 64 fixed (mixing, noise) pairs land: the network's weights are not
        identified, its map from noise to draws settles when the fit does."""
        return self.sample(jax.random.key(_WATCH_KEY), _WATCH_POINTS)

