"""Gaussian families: mean-field, full-rank (Cholesky) and diagonal-plus-low-rank.

All three write ``z = mu + S eps`` with ``eps ~ N(0, I)``; they differ only in the shape of
``S``. Positive scales are ``exp`` of an unconstrained field (one mechanism for every family).
Densities reuse NumPyro's distributions; sampling with its log density is written here because
``log q`` of a draw is cheapest from ``eps`` itself:
``log q(z) = sum_i log N(eps_i; 0, 1) - log |det S|``.

Default initialisation is ``mu = 0`` (the centre of unconstrained space, Stan's convention)
and marginal standard deviation ``init_scale = 0.1`` (NumPyro's ``AutoNormal`` default): small
enough that early draws stay near the initial point when the posterior is narrow (many data),
while the log-scale parameterisation lets Adam grow a scale by a constant factor per step
when the posterior is wide.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jaxtyping import Array, Float

from veil.family import FactorSteps, Gaussian, stop_gradient
from veil._checks import check_dim as _check_dim

__all__ = ["MeanField", "FullRank", "LowRank"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _init_loc(dim: int, init_loc) -> jax.Array:
    if init_loc is None:
        return jnp.zeros(dim)
    loc = jnp.asarray(init_loc, dtype=float)
    if loc.shape != (dim,):
        raise ValueError(f"init_loc must have shape ({dim},), got {loc.shape}.")
    if not bool(jnp.all(jnp.isfinite(loc))):
        raise ValueError("init_loc holds non-finite values; pass a finite starting point.")
    return loc


def _check_scale(init_scale) -> float:
    if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0):
        raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}.")
    return float(init_scale)


def _std_normal_logpdf(eps: jax.Array) -> jax.Array:
    return -0.5 * jnp.sum(eps**2, axis=-1) - eps.shape[-1] * _HALF_LOG_2PI


class MeanField(Gaussian):
    """Diagonal Gaussian ``q(z) = prod_i N(z_i; mu_i, sigma_i^2)``, ``sigma = exp(log_scale)``.

    Examples:
        >>> import jax, veil
        >>> q = veil.MeanField(3)
        >>> z, lq = q.sample_and_log_prob(jax.random.key(0), 5)
        >>> z.shape, lq.shape
        ((5, 3), (5,))
    """

    loc: Float[Array, " dim"]
    log_scale: Float[Array, " dim"]
    dim: int = eqx.field(static=True)

    def __init__(self, dim: int, *, init_loc=None, init_scale: float = 0.1):
        self.dim = _check_dim(dim)
        self.loc = _init_loc(self.dim, init_loc)
        self.log_scale = jnp.full(self.dim, math.log(_check_scale(init_scale)), dtype=float)

    @property
    def scale(self) -> Float[Array, " dim"]:
        """Marginal standard deviations ``sigma``."""
        return jnp.exp(self.log_scale)

    @property
    def mean(self):
        return self.loc

    @property
    def cov(self):
        return jnp.diag(self.scale**2)

    @property
    def stddev(self):
        return self.scale

    @property
    def distribution(self) -> dist.Distribution:
        """The same ``q`` as a NumPyro distribution (event shape ``(dim,)``)."""
        return dist.Normal(self.loc, self.scale).to_event(1)

    @property
    def noise_dim(self) -> int:
        return self.dim

    def transform_and_log_prob(self, eps):
        return self.loc + self.scale * eps, _std_normal_logpdf(eps) - jnp.sum(self.log_scale)

    def sample_and_log_prob(self, key, n):
        return self.transform_and_log_prob(jax.random.normal(key, (n, self.dim)))

    def transform_with_stopped_log_prob(self, eps):
        """Draws ``z = mu + sigma * eps`` and ``log q(z)`` at stopped parameters, from the
        noise: at ``z = T(eps)`` the value is ``log N(eps; 0, I) - sum(log_scale)`` and the
        gradient in ``z`` is ``-eps / sigma``, so the surrogate ``value + <z - stop(z),
        -eps / sigma>`` has both exactly (as :meth:`FullRank.transform_with_stopped_log_prob`),
        with no ``log_prob`` evaluation. Whole default fits: 1.06x faster on Inference Gym's
        radon, the same elsewhere (docs/benchmarks/where-a-step-goes.md)."""
        z = self.loc + self.scale * eps
        s = stop_gradient(self)
        value = _std_normal_logpdf(eps) - jnp.sum(s.log_scale)
        w = eps * jnp.exp(-s.log_scale)
        return z, value - jnp.sum((z - jax.lax.stop_gradient(z)) * w, axis=-1)

    def sample_with_stopped_log_prob(self, key, n):
        return self.transform_with_stopped_log_prob(jax.random.normal(key, (n, self.dim)))

    def whiten(self, z):
        return (z - self.loc) * jnp.exp(-self.log_scale)

    def scale_matvec(self, u):
        """``A u`` for the scale ``A = diag(sigma)`` of ``z = mu + A eps`` (see
        :meth:`FullRank.scale_matvec`)."""
        return self.scale * u

    def scale_rmatvec(self, g):
        """``A^T g``: the gradient in the noise ``eps`` of a function whose gradient in ``z``
        is ``g``."""
        return self.scale * g

    def log_prob(self, z):
        return self.distribution.log_prob(z)


class FullRank(Gaussian, FactorSteps):
    """Gaussian ``N(mu, L L^T)`` with ``L = diag(exp(log_scale)) (I + tril(unit_tril, -1))``.

    The Cholesky factor is a positive row scale times a unit lower-triangular matrix (the
    parameterisation of NumPyro's ``AutoMultivariateNormal``). Each off-diagonal parameter is
    then measured relative to its row's scale, so one optimizer step changes the covariance by
    the same relative amount whatever the posterior's scale; a raw Cholesky entry would move by
    the step size itself, which swamps a posterior with sd 0.1 under Adam's step of 0.05.
    Only the strictly lower part of ``unit_tril`` is used.

    Examples:
        >>> import jax, veil
        >>> q = veil.FullRank(3)
        >>> q.cov.shape
        (3, 3)
    """

    loc: Float[Array, " dim"]
    log_scale: Float[Array, " dim"]
    unit_tril: Float[Array, "dim dim"]
    dim: int = eqx.field(static=True)

    def __init__(self, dim: int, *, init_loc=None, init_scale: float = 0.1):
        self.dim = _check_dim(dim)
        self.loc = _init_loc(self.dim, init_loc)
        self.log_scale = jnp.full(self.dim, math.log(_check_scale(init_scale)), dtype=float)
        self.unit_tril = jnp.zeros((self.dim, self.dim))

    def _unit(self):
        return jnp.tril(self.unit_tril, -1) / math.sqrt(self.dim) + jnp.eye(self.dim)

    @property
    def scale_tril(self) -> Float[Array, "dim dim"]:
        """The Cholesky factor ``L`` of the covariance (positive diagonal ``exp(log_scale)``)."""
        return jnp.exp(self.log_scale)[:, None] * self._unit()

    @property
    def mean(self):
        return self.loc

    @property
    def cov(self):
        L = self.scale_tril
        return L @ L.T

    @property
    def distribution(self) -> dist.Distribution:
        """The same ``q`` as a NumPyro ``MultivariateNormal``."""
        return dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril)

    @property
    def noise_dim(self) -> int:
        return self.dim

    def transform_and_log_prob(self, eps):
        z = self.loc + eps @ self.scale_tril.T
        return z, _std_normal_logpdf(eps) - jnp.sum(self.log_scale)

    def sample_and_log_prob(self, key, n):
        return self.transform_and_log_prob(jax.random.normal(key, (n, self.dim)))

    def transform_with_stopped_log_prob(self, eps):
        """Draws ``z = mu + L eps`` and ``log q(z)`` at stopped parameters, with one
        triangular solve where :meth:`log_prob` takes two.

        ``log q_s(z) = log N(L_s^{-1}(z - mu_s); 0, I) - sum(log_scale_s)``. At ``z = T(eps)``
        the whitened point is ``eps`` itself, so the value needs no solve, and the gradient in
        ``z`` is ``-L^{-T} eps``: one solve with ``L^T``. (Through :meth:`log_prob`, reverse
        mode solves with ``L`` for the value and again with ``L^T`` for the gradient.) The
        surrogate ``value + <z - stop(z), -L^{-T} eps>`` has exactly that value and gradient.
        """
        z = self.loc + eps @ self.scale_tril.T
        s = stop_gradient(self)
        # L^{-T} = diag(1/scale) U^{-T} with U the unit factor; U^T is upper triangular.
        w = jnp.exp(-s.log_scale) * _unit_solve(s._unit(), eps, transposed=True)
        value = _std_normal_logpdf(eps) - jnp.sum(s.log_scale)
        return z, value - jnp.sum((z - jax.lax.stop_gradient(z)) * w, axis=-1)

    def sample_with_stopped_log_prob(self, key, n):
        return self.transform_with_stopped_log_prob(jax.random.normal(key, (n, self.dim)))

    def whiten(self, z):
        # Solve with the unit-diagonal factor after dividing out the row scales.
        r = (z - self.loc) * jnp.exp(-self.log_scale)
        return _unit_solve(self._unit(), r.reshape(-1, self.dim), transposed=False).reshape(r.shape)

    def scale_matvec(self, u):
        """``A u`` for the scale ``A = L`` of the draws ``z = mu + A eps``: the move in ``z``
        of a move ``u`` of the noise. With :meth:`scale_rmatvec` it lets an optimizer step in
        ``q``'s whitened coordinates (:func:`veil.optim.whitened_location`). Families whose
        draws are ``mu + A eps`` (MeanField, FullRank, LowRank) have both."""
        # diag(s) (I + T / sqrt(d)) u without forming L: an optimizer calls this every step.
        return jnp.exp(self.log_scale) * (u + jnp.tril(self.unit_tril, -1) @ u / math.sqrt(self.dim))

    def scale_rmatvec(self, g):
        """``A^T g``: the gradient in the noise ``eps`` of a function whose gradient in ``z``
        is ``g`` (chain rule through ``z = mu + A eps``)."""
        sg = jnp.exp(self.log_scale) * g
        # A vector-matrix product rather than T^T @ sg, so no transposed copy is asked for.
        return sg + (sg @ jnp.tril(self.unit_tril, -1)) / math.sqrt(self.dim)

    def factor_rmatvec(self, grads: "FullRank") -> Float[Array, "dim dim"]:
        r"""The gradient of the factor's parameters, seen in ``q``'s whitened coordinates.

        A move of the factor ``L -> L (I + M)``, ``M`` lower triangular, changes the
        covariance relative to its own scale whatever ``q``'s conditioning (it is a change
        of the whitened noise). This is the gradient in ``M`` at ``M = 0`` (lower
        triangular), from the gradients in ``log_scale`` and ``unit_tril`` in ``grads``: with
        ``G = sqrt(d) tril(grads.unit_tril, -1)`` and ``U`` the unit factor,

        .. math::

            \partial/\partial M = \operatorname{tril}(U^\top G)
                + \operatorname{diag}\big(g_{\log s} - \textstyle\sum_j G_{ij} U_{ij}\big),

        the adjoint of :meth:`factor_matvec` (one ``d x d x d`` product). Used by
        :func:`veil.optim.whitened_factor`.
        """
        G = math.sqrt(self.dim) * jnp.tril(grads.unit_tril, -1)
        U = self._unit()
        return jnp.tril(U.T @ G) + jnp.diag(grads.log_scale - jnp.sum(G * U, axis=1))

    def factor_matvec(self, M: Float[Array, "dim dim"]) -> "FullRank":
        r"""The parameter change (a ``FullRank``-shaped update, zero location) that moves
        the factor ``L -> L (I + M)`` to first order, ``M`` lower triangular.

        ``L (I + M) = diag(s (1 + m_ii)) U'`` with ``U' = diag(1 + m_ii)^{-1} U (I + M)``
        unit lower triangular, so to first order ``d log_scale = diag(M)`` and
        ``d unit_tril = sqrt(d) tril(U M - diag(M) U, -1)`` (one ``d x d x d`` product).
        """
        M = jnp.tril(M)
        U = self._unit()
        m = jnp.diagonal(M)
        d_unit = math.sqrt(self.dim) * jnp.tril(U @ M - m[:, None] * U, -1)
        return eqx.tree_at(lambda q: (q.loc, q.log_scale, q.unit_tril), self, (jnp.zeros_like(self.loc), m, d_unit))

    def log_prob(self, z):
        # The diagonal is known in log form, so log|det L| = sum(log_scale) exactly.
        return _std_normal_logpdf(self.whiten(z)) - jnp.sum(self.log_scale)


def _unit_solve(unit: Float[Array, "dim dim"], b: Float[Array, "n dim"], *, transposed: bool):
    """Rows of ``b`` solved against a unit lower-triangular ``U``: ``U^{-1} b_i``, or
    ``U^{-T} b_i`` when ``transposed``.

    On CPU the solve is LAPACK's trsm, which reads its matrix in column-major order. Handing
    it ``U^T`` (upper triangular) makes that order a free relayout of the row-major ``U``;
    passing ``U`` itself makes XLA write a transposed copy first (at dim = 501 the STL step
    took 1.13-1.16x longer that way; ``benchmarks/studies/fullrank_solve.py``).
    """
    x = jax.scipy.linalg.solve_triangular(
        unit.T, b.T, lower=False, trans=0 if transposed else "T", unit_diagonal=True
    )
    return x.T


def _spread_basis(dim: int, rank: int) -> jax.Array:
    """A fixed ``dim x rank`` matrix with orthogonal columns spread over all coordinates.

    The low-rank factor cannot start at zero (``W = 0`` is a stationary point of the ELBO:
    by Stein's lemma its gradient is ``E[Hessian of log p] W``), and initialisation takes no
    key, so it starts on a deterministic cosine basis instead.
    """
    i = jnp.arange(dim)[:, None] + 0.5
    j = jnp.arange(1, rank + 1)[None, :]
    return jnp.sqrt(2.0 / dim) * jnp.cos(jnp.pi * i * j / dim)


class LowRank(Gaussian):
    """Gaussian ``N(mu, diag(d^2) + W W^T)`` with ``d = exp(log_diag)`` and ``W`` of shape
    ``(dim, rank)``: covariance in ``O(dim * rank)`` parameters.

    Draws are ``z = mu + d * e1 + W e2`` with independent standard normal ``e1, e2``; the
    density uses NumPyro's ``LowRankMultivariateNormal`` (Woodbury identity, ``O(dim rank^2)``).
    At initialisation ``W`` is a small fixed basis (``init_scale / 2`` along ``rank``
    orthogonal directions) so that the ELBO gradient in ``W`` is not zero.

    Examples:
        >>> import veil
        >>> veil.LowRank(10, 2).cov_factor.shape
        (10, 2)
    """

    loc: Float[Array, " dim"]
    log_diag: Float[Array, " dim"]
    cov_factor: Float[Array, "dim rank"]
    dim: int = eqx.field(static=True)
    rank: int = eqx.field(static=True)

    def __init__(self, dim: int, rank: int, *, init_loc=None, init_scale: float = 0.1):
        self.dim = _check_dim(dim)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.dim:
            raise ValueError(f"rank must be an integer in [1, dim={self.dim}], got {rank!r}.")
        self.rank = rank
        scale = _check_scale(init_scale)
        self.loc = _init_loc(self.dim, init_loc)
        self.log_diag = jnp.full(self.dim, math.log(scale), dtype=float)
        self.cov_factor = 0.5 * scale * _spread_basis(self.dim, rank)

    @property
    def cov_diag(self) -> Float[Array, " dim"]:
        """The diagonal part ``d^2`` of the covariance."""
        return jnp.exp(2 * self.log_diag)

    @property
    def mean(self):
        return self.loc

    @property
    def cov(self):
        return jnp.diag(self.cov_diag) + self.cov_factor @ self.cov_factor.T

    @property
    def distribution(self) -> dist.Distribution:
        """The same ``q`` as a NumPyro ``LowRankMultivariateNormal``."""
        return dist.LowRankMultivariateNormal(self.loc, self.cov_factor, self.cov_diag)

    @property
    def noise_dim(self) -> int:
        return self.dim + self.rank

    def transform_and_log_prob(self, eps):
        e1, e2 = eps[:, : self.dim], eps[:, self.dim :]
        z = self.loc + jnp.exp(self.log_diag) * e1 + e2 @ self.cov_factor.T
        return z, self.log_prob(z)

    def sample_and_log_prob(self, key, n):
        z = self.sample(key, n)
        return z, self.log_prob(z)

    def sample(self, key, n):
        k1, k2 = jax.random.split(key)
        e1 = jax.random.normal(k1, (n, self.dim))
        e2 = jax.random.normal(k2, (n, self.rank))
        return self.loc + jnp.exp(self.log_diag) * e1 + e2 @ self.cov_factor.T

    def log_prob(self, z):
        return self.distribution.log_prob(z)

    def scale_matvec(self, u):
        """``A u`` for the scale ``A = [diag(d), W]`` (``dim x (dim + rank)``) of the draws
        ``z = mu + A eps`` (see :meth:`FullRank.scale_matvec`)."""
        return jnp.exp(self.log_diag) * u[: self.dim] + self.cov_factor @ u[self.dim :]

    def scale_rmatvec(self, g):
        """``A^T g``, of length ``dim + rank``: the gradient in the noise."""
        return jnp.concatenate([jnp.exp(self.log_diag) * g, g @ self.cov_factor])


def gaussian_to_family(q, loc, cov):
    """``q`` with its parameters set to (the closest it can hold to) ``N(loc, cov)``.

    ``FullRank`` holds it exactly (Cholesky factor); ``MeanField`` takes the marginal
    variances; ``LowRank(rank)`` takes the top ``rank`` eigen-directions of ``cov`` above the
    smallest kept eigenvalue as its factor and the rest of the variance as its diagonal.
    """
    loc = jnp.asarray(loc, float)
    cov = 0.5 * (jnp.asarray(cov, float) + jnp.asarray(cov, float).T)
    var = jnp.diagonal(cov)
    if isinstance(q, FullRank):
        chol = jnp.linalg.cholesky(cov)
        d = jnp.diagonal(chol)
        unit = (chol / d[:, None] - jnp.eye(q.dim)) * math.sqrt(q.dim)
        return eqx.tree_at(lambda m: (m.loc, m.log_scale, m.unit_tril), q, (loc, jnp.log(d), unit))
    if isinstance(q, MeanField):
        return eqx.tree_at(lambda m: (m.loc, m.log_scale), q, (loc, 0.5 * jnp.log(var)))
    if isinstance(q, LowRank):
        vals, vecs = jnp.linalg.eigh(cov)
        top, top_vecs = vals[-q.rank :], vecs[:, -q.rank :]
        floor = vals[-q.rank - 1] if q.rank < q.dim else 0.5 * vals[0]
        factor = top_vecs * jnp.sqrt(jnp.maximum(top - floor, 0.0))
        rest = jnp.maximum(var - jnp.sum(factor**2, axis=1), 1e-3 * var)
        return eqx.tree_at(
            lambda m: (m.loc, m.log_diag, m.cov_factor), q, (loc, 0.5 * jnp.log(rest), factor)
        )
    raise TypeError(
        f"Cannot move a {type(q).__name__} to a Gaussian; only MeanField, FullRank "
        "and LowRank can be."
    )
