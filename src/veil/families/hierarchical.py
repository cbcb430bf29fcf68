"""``HierarchicalGaussian``: a Gaussian whose conditional scales are log-linear in earlier noise.

A centred hierarchical model's posterior is a funnel: a group effect's spread is ``exp`` of
a scale parameter drawn before it. A Gaussian cannot bend that way. Writing the model
*non-centred* (``theta_j = exp(log_tau) eps_j``) turns the funnel into something a Gaussian in
the noise describes; this family is that change of variables with learned coefficients, so
the user keeps the centred model.
"""

from __future__ import annotations

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from veil.family import Family
from veil.families.gaussian import _check_scale, _init_loc, _std_normal_logpdf
from veil._checks import check_dim as _check_dim

__all__ = ["HierarchicalGaussian"]


class HierarchicalGaussian(Family):
    r"""Gaussian noise pushed through log-linear conditional scales and a triangular mix.

    .. math::

        \ell_j = s_j + \sum_{k<j} A_{jk} \varepsilon_k, \qquad
        u_j = e^{\ell_j} \varepsilon_j, \qquad
        z = \mu + L u, \qquad \varepsilon \sim N(0, I),

    with ``L`` unit lower triangular (``I + tril(mix, -1) / sqrt(d)``), ``A`` strictly lower
    triangular (``tril(slope, -1) / sqrt(d)``) and ``s = log_scale`` (the ``1 / sqrt(d)`` as in
    :class:`FullRank`). With ``A = 0`` it is the full-rank Gaussian with Cholesky factor
    ``L diag(e^s)``. With ``A != 0`` a coordinate's spread is lognormal, ``exp`` of a linear
    function of the *noise* of the coordinates before it: Neal's funnel (``x0 ~ N(0, 9)``,
    ``x_i | x0 ~ N(0, e^{x0})``) is the member ``L = I``, ``s = (log 3, 0, ...)``,
    ``A_{i0} = 3/2`` (since ``x0 / 2 = 1.5 eps_0``): the non-centred parameterisation of a
    hierarchical model, with its coefficients fitted. Put scale parameters first: a
    coordinate's spread depends only on earlier ones, and ``Target.from_numpyro`` orders sites
    as the model samples them (hyperparameters first in most hierarchical models).

    The slopes act on the noise, not on earlier coordinates of ``z`` (as an autoregressive
    flow's conditioner would). Conditioning on ``z`` was tried (docs/benchmarks/log-linear-scales-funnel-not-kept.md): a
    scale ``exp`` in a coordinate that is itself lognormal chains ``exp`` through ``exp``, and
    some draws overflowed. Here each ``u_j`` is a Gaussian times a lognormal, so every moment is
    finite, and the moments are closed-form:

    .. math::

        E z = \mu, \qquad \operatorname{Cov} z = L \operatorname{diag}\big(e^{2 s_j + 2 \|A_j\|^2}\big) L^T,

    (``eps_j`` enters ``u_j`` linearly and independently of the ``eps_k``, ``k < j``, that set its
    scale, so the ``u_j`` are uncorrelated with mean zero; ``E e^{2 A_j eps} = e^{2 \|A_j\|^2}``).

    Density: ``u = L^{-1} (z - mu)`` (a triangular solve), then ``eps_j = u_j e^{-l_j}``, one
    coordinate per pass (``A`` is strictly lower triangular, so ``d`` passes fix all of them);
    ``log q(z) = sum_j log N(eps_j; 0, 1) - sum_j l_j``.

    Fitted by the reverse-KL ELBO with a stochastic optimizer (``veil.fit``), it drifts toward
    the funnel's neck as every such fit here has; with a deterministic objective
    (:func:`veil.dadvi`) it recovers the funnel (docs/benchmarks/dadvi-hierarchical-gaussian-funnel.md).

    Args:
        dim: dimension of ``z``.
        init_loc: starting ``mu`` (default zeros).
        init_scale: starting scale (default 0.1, as the other Gaussians); ``A`` and the mix
            start at zero, so ``q`` starts as ``MeanField(dim)`` does.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> q = veil.HierarchicalGaussian(3)
        >>> z, lq = q.sample_and_log_prob(jax.random.key(0), 5)
        >>> z.shape, bool(jnp.allclose(lq, q.log_prob(z), atol=1e-4))
        ((5, 3), True)
    """

    loc: Float[Array, " dim"]
    log_scale: Float[Array, " dim"]
    mix: Float[Array, "dim dim"]
    slope: Float[Array, "dim dim"]
    dim: int = eqx.field(static=True)
    reparameterized: ClassVar[bool] = True

    def __init__(self, dim: int, *, init_loc=None, init_scale: float = 0.1):
        self.dim = _check_dim(dim)
        self.loc = _init_loc(self.dim, init_loc)
        self.log_scale = jnp.full(self.dim, math.log(_check_scale(init_scale)), dtype=float)
        self.mix = jnp.zeros((self.dim, self.dim))
        self.slope = jnp.zeros((self.dim, self.dim))

    def lower(self) -> Float[Array, "dim dim"]:
        """``L``: unit lower triangular."""
        return jnp.eye(self.dim) + jnp.tril(self.mix, -1) / math.sqrt(self.dim)

    def slopes(self) -> Float[Array, "dim dim"]:
        """``A``: the log-scale slopes on earlier noise, strictly lower triangular."""
        return jnp.tril(self.slope, -1) / math.sqrt(self.dim)

    @property
    def noise_dim(self) -> int:
        return self.dim

    def location_field(self):
        return lambda m: m.loc

    def transform_and_log_prob(self, eps):
        log_scale = self.log_scale + eps @ self.slopes().T
        u = jnp.exp(log_scale) * eps
        return self.loc + u @ self.lower().T, _std_normal_logpdf(eps) - jnp.sum(log_scale, axis=-1)

    def sample_and_log_prob(self, key, n):
        return self.transform_and_log_prob(jax.random.normal(key, (n, self.dim)))

    def whiten(self, z):
        """The noise ``eps`` with ``z = T(eps)``."""
        z = jnp.asarray(z)
        y = jnp.reshape(z - self.loc, (-1, self.dim))
        u = jax.scipy.linalg.solve_triangular(self.lower(), y.T, lower=True, unit_diagonal=True).T
        A = self.slopes()

        def fix_one_more(_, eps):
            return u * jnp.exp(-(self.log_scale + eps @ A.T))

        eps = jax.lax.fori_loop(0, self.dim, fix_one_more, jnp.zeros_like(u))
        return jnp.reshape(eps, z.shape)

    def log_prob(self, z):
        eps = self.whiten(z)
        return _std_normal_logpdf(eps) - jnp.sum(self.log_scale + eps @ self.slopes().T, axis=-1)

    @property
    def mean(self):
        """``mu``, exactly (see the class docstring)."""
        return self.loc

    @property
    def cov(self):
        """``L diag(exp(2 s + 2 |A_j|^2)) L^T``, exactly (see the class docstring)."""
        L = self.lower()
        var_u = jnp.exp(2.0 * self.log_scale + 2.0 * jnp.sum(self.slopes() ** 2, axis=1))
        return (L * var_u) @ L.T
