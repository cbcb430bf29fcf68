"""Families with constrained supports, seen on the unconstrained space a target lives on.

A veil target is a log density on unconstrained ``R^dim``; a NumPyro site with positive support
appears there as ``u = log(x)`` (NumPyro's ``biject_to(positive)`` is ``exp``). The
:class:`Gamma` family is a Gamma distribution on ``x`` carried to ``u``:
``log q(u) = log Gamma(e^u; a, b) + u`` (the log-Jacobian of ``x = e^u``), so it composes with
every target and objective like the Gaussian families.

Draws are reparameterised two ways: ``sample`` uses JAX's Gamma sampler, differentiable in the
shape through implicit differentiation of its CDF (Figurnov et al., 2018); ``rsvi_draws`` gives
the acceptance-rejection (Marsaglia-Tsang) path and the log density of the accepted proposal
noise that :class:`veil.RSVI` needs (Naesseth et al., 2017).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import digamma, gammaln, polygamma
from jaxtyping import Array, Float

from veil.family import Family, RejectionSampled
from veil.families.gaussian import _check_dim, _check_scale

__all__ = ["Gamma", "Beta", "Dirichlet", "VonMises", "Poisson"]


def _gamma_log_density(x, a, b):
    return a * jnp.log(b) - gammaln(a) + (a - 1.0) * jnp.log(x) - b * x


def _mt_h(eps, a):
    """Marsaglia-Tsang map ``h(eps, a) = (a - 1/3)(1 + eps / sqrt(9a - 3))^3``: for accepted
    ``eps``, a Gamma(a, 1) draw (valid for a >= 1)."""
    return (a - 1.0 / 3.0) * (1.0 + eps / jnp.sqrt(9.0 * a - 3.0)) ** 3


def _mt_h_inverse(x, a):
    return jnp.sqrt(9.0 * a - 3.0) * ((x / (a - 1.0 / 3.0)) ** (1.0 / 3.0) - 1.0)


def _mt_log_pi(eps, a):
    """Log density of the *accepted* proposal noise, ``pi(eps; a) = Gamma(h(eps, a); a, 1) *
    dh/deps``."""
    c = jnp.sqrt(9.0 * a - 3.0)
    x = _mt_h(eps, a)
    log_dh = jnp.log(3.0 * (a - 1.0 / 3.0) / c) + 2.0 * jnp.log1p(eps / c)
    return _gamma_log_density(x, a, 1.0) + log_dh


def _init_shape_for_scale(scale: float) -> float:
    """Shape ``a`` with ``sd(log x) = sqrt(trigamma(a)) = scale`` for ``x ~ Gamma(a, .)``:
    Newton's method on ``trigamma(a) - scale^2`` from ``1 / scale^2 + 1/2`` (where
    ``trigamma(a) ~ 1 / (a - 1/2)``); trigamma is convex and decreasing, so it converges."""
    a = 1.0 / scale**2 + 0.5
    for _ in range(50):
        step = (float(polygamma(1, a)) - scale**2) / float(polygamma(2, a))
        a = max(a - step, a / 10)
        if abs(step) < 1e-9 * a:
            break
    return a


class Gamma(RejectionSampled):
    """Mean-field Gamma on positive values, as a family on their logs ``u = log x``.

    ``x_i ~ Gamma(a_i, b_i)`` (shape ``a``, rate ``b``) independently; the family's draws are
    ``u = log x``, which is how a NumPyro site with positive support appears in the target.
    On ``u``, ``E[u] = digamma(a) - log b`` and ``Var[u] = trigamma(a)``. Initialised, like the
    Gaussian families, at ``E[u] = init_loc`` (default 0) with ``sd(u) = init_scale``.

    Examples:
        >>> import jax, veil
        >>> q = veil.Gamma(3)
        >>> u, lq = q.sample_and_log_prob(jax.random.key(0), 5)
        >>> u.shape, lq.shape
        ((5, 3), (5,))

    References:
        Naesseth, Ruiz, Linderman & Blei (2017), Reparameterization Gradients through
        Acceptance-Rejection Sampling Algorithms; Figurnov, Mohamed & Mnih (2018), Implicit
        Reparameterization Gradients.
    """

    log_concentration: Float[Array, " dim"]
    log_rate: Float[Array, " dim"]
    dim: int = eqx.field(static=True)

    def __init__(self, dim: int, *, init_loc=None, init_scale: float = 0.1):
        self.dim = _check_dim(dim)
        a = _init_shape_for_scale(_check_scale(init_scale))
        loc = jnp.zeros(self.dim) if init_loc is None else jnp.broadcast_to(
            jnp.asarray(init_loc, dtype=float), (self.dim,))
        self.log_concentration = jnp.full(self.dim, math.log(a), dtype=float)
        self.log_rate = (float(digamma(a)) - loc).astype(float)

    @property
    def concentration(self) -> Float[Array, " dim"]:
        return jnp.exp(self.log_concentration)

    @property
    def rate(self) -> Float[Array, " dim"]:
        return jnp.exp(self.log_rate)

    @property
    def mean(self):
        return digamma(self.concentration) - self.log_rate

    @property
    def cov(self):
        return jnp.diag(polygamma(1, self.concentration))

    @property
    def distribution(self) -> dist.Distribution:
        """The same ``q`` as a NumPyro distribution on ``u = log x``."""
        base = dist.Gamma(self.concentration, self.rate).to_event(1)
        return dist.TransformedDistribution(base, dist.transforms.ExpTransform().inv)

    def _log_prob_positive(self, x):
        return jnp.sum(_gamma_log_density(x, self.concentration, self.rate), -1)

    def log_prob(self, u):
        return self._log_prob_positive(jnp.exp(u)) + jnp.sum(u, -1)

    def sample_and_log_prob(self, key, n):
        # JAX's Gamma sampler is differentiable in the shape (implicit reparameterisation).
        x = jax.random.gamma(key, self.concentration, (n, self.dim)) / self.rate
        u = jnp.log(x)
        return u, self._log_prob_positive(x) + jnp.sum(u, -1)

    def rsvi_draws(self, key, n: int, boost: int = 1):
        """Acceptance-rejection draws for :class:`veil.RSVI`: ``u`` differentiable in the
        parameters along the sampler's path with the accepted noise held fixed, and
        ``log pi(eps)`` per draw (summed over dimensions); see :func:`_rsvi_log_gamma`."""
        log_x, log_pi = _rsvi_log_gamma(key, self.concentration, (n, self.dim), boost)
        return log_x - self.log_rate, log_pi


def _rsvi_log_gamma(key, a, shape, boost: int):
    """``log x`` for ``x ~ Gamma(a, 1)`` along the Marsaglia-Tsang path, and the log density
    of the accepted noise summed over the last axis.

    Shape augmentation (Naesseth et al., Sec. 5): ``x = h(eps, a + B) * prod_{i<B}
    v_i^(1/(a + i))`` with ``v_i ~ U(0, 1)``; it makes Marsaglia-Tsang valid for any ``a > 0``
    (``B >= 1``) and shrinks the correction term as ``B`` grows. The accepted ``eps`` are
    recovered exactly by inverting ``h`` at a Gamma(a + B) draw, so no rejection loop runs.
    """
    k1, k2 = jax.random.split(key)
    big = jax.lax.stop_gradient(a) + boost
    x_big = jax.random.gamma(k1, jnp.broadcast_to(big, shape), shape)
    eps = jax.lax.stop_gradient(_mt_h_inverse(x_big, big))
    v = jax.random.uniform(k2, (boost,) + shape, minval=1e-12)
    log_x = jnp.log(_mt_h(eps, a + boost))
    for i in range(boost):
        log_x = log_x + jnp.log(v[i]) / (a + i)
    return log_x, jnp.sum(_mt_log_pi(eps, a + boost), -1)


class Beta(RejectionSampled):
    """Mean-field Beta on ``(0, 1)`` values, as a family on their logits ``u = logit x``.

    ``x_i ~ Beta(a_i, b_i)``; ``u = log G_a - log G_b`` for independent ``G_a ~ Gamma(a)``,
    ``G_b ~ Gamma(b)``, which is how NumPyro presents a unit-interval site
    (``biject_to(unit_interval)`` is the sigmoid). ``log q(u) = log Beta(x) + log x + log(1-x)``.
    On ``u``: ``E[u] = digamma(a) - digamma(b)``, ``Var[u] = trigamma(a) + trigamma(b)``.
    Initialised at ``a = b`` (``E[u] = 0``) with ``sd(u) = init_scale``. Draws are
    reparameterised through JAX's Gamma sampler (implicit gradients); ``rsvi_draws`` gives the
    acceptance-rejection path of both Gammas for :class:`veil.RSVI`.

    Examples:
        >>> import jax, veil
        >>> u, lq = veil.Beta(2).sample_and_log_prob(jax.random.key(0), 3)
        >>> u.shape
        (3, 2)
    """

    log_concentration1: Float[Array, " dim"]
    log_concentration0: Float[Array, " dim"]
    dim: int = eqx.field(static=True)

    def __init__(self, dim: int, *, init_scale: float = 0.1):
        self.dim = _check_dim(dim)
        a = _init_shape_for_scale(_check_scale(init_scale) / math.sqrt(2.0))
        self.log_concentration1 = jnp.full(self.dim, math.log(a), dtype=float)
        self.log_concentration0 = jnp.full(self.dim, math.log(a), dtype=float)

    @property
    def concentration1(self):
        return jnp.exp(self.log_concentration1)

    @property
    def concentration0(self):
        return jnp.exp(self.log_concentration0)

    @property
    def mean(self):
        return digamma(self.concentration1) - digamma(self.concentration0)

    @property
    def cov(self):
        return jnp.diag(polygamma(1, self.concentration1) + polygamma(1, self.concentration0))

    @property
    def distribution(self) -> dist.Distribution:
        """The same ``q`` as a NumPyro distribution on ``u = logit x``."""
        base = dist.Beta(self.concentration1, self.concentration0).to_event(1)
        return dist.TransformedDistribution(base, dist.transforms.SigmoidTransform().inv)

    def log_prob(self, u):
        a, b = self.concentration1, self.concentration0
        # log Beta(x) + log x + log(1 - x) with log x = -softplus(-u), log(1-x) = -softplus(u).
        log_x, log_1mx = -jax.nn.softplus(-u), -jax.nn.softplus(u)
        log_norm = gammaln(a + b) - gammaln(a) - gammaln(b)
        return jnp.sum(log_norm + a * log_x + b * log_1mx, -1)

    def sample_and_log_prob(self, key, n):
        ka, kb = jax.random.split(key)
        ga = jax.random.gamma(ka, self.concentration1, (n, self.dim))
        gb = jax.random.gamma(kb, self.concentration0, (n, self.dim))
        u = jnp.log(ga) - jnp.log(gb)
        return u, self.log_prob(u)

    def rsvi_draws(self, key, n: int, boost: int = 1):
        """Both Gammas along their acceptance-rejection paths (see :class:`Gamma`)."""
        ka, kb = jax.random.split(key)
        log_ga, pa = _rsvi_log_gamma(ka, self.concentration1, (n, self.dim), boost)
        log_gb, pb = _rsvi_log_gamma(kb, self.concentration0, (n, self.dim), boost)
        return log_ga - log_gb, pa + pb


_TWO_PI = 2.0 * math.pi


class VonMises(Family):
    """Mean-field von Mises on angles in ``(-pi, pi)``, as a family on unconstrained ``u``.

    NumPyro presents a circular site as ``theta = -pi + 2 pi sigmoid(u)``; this family is
    ``theta_i ~ VonMises(mu_i, kappa_i)`` carried to ``u``:
    ``log q(u) = log VonMises(theta) + log(2 pi) + log s + log(1 - s)``, ``s = sigmoid(u)``.
    (The map cuts the circle at ``+-pi``: a posterior with mass there is split across both
    ends of ``u``; centre the model's angle away from the cut if you can.)

    Its sampler (NumPyro's rejection sampler) has no reparameterisation path, so
    ``reparameterized = False``: ``veil.fit`` then uses the score-function estimator by
    default and says so, and path-wise estimators are refused. Initialised at ``mu = 0`` with
    concentration ``1 / init_scale^2``.

    Examples:
        >>> import jax, veil
        >>> u, lq = veil.VonMises(2).sample_and_log_prob(jax.random.key(0), 3)
        >>> u.shape
        (3, 2)
    """

    loc: Float[Array, " dim"]
    log_concentration: Float[Array, " dim"]
    dim: int = eqx.field(static=True)
    reparameterized = False

    def __init__(self, dim: int, *, init_loc=None, init_scale: float = 0.1):
        self.dim = _check_dim(dim)
        self.loc = jnp.zeros(self.dim) if init_loc is None else jnp.broadcast_to(
            jnp.asarray(init_loc, dtype=float), (self.dim,))
        self.log_concentration = jnp.full(self.dim, -2.0 * math.log(_check_scale(init_scale)), dtype=float)

    @property
    def concentration(self):
        return jnp.exp(self.log_concentration)

    @property
    def _angles(self) -> dist.Distribution:
        return dist.VonMises(self.loc, self.concentration)

    @staticmethod
    def _to_angle(u):
        return -math.pi + _TWO_PI * jax.nn.sigmoid(u)

    def log_prob(self, u):
        theta = self._to_angle(u)
        log_jac = math.log(_TWO_PI) - jax.nn.softplus(-u) - jax.nn.softplus(u)
        return jnp.sum(self._angles.log_prob(theta) + log_jac, -1)

    def sample_and_log_prob(self, key, n):
        theta = jax.lax.stop_gradient(self._angles.sample(key, (n,)))
        s = jnp.clip((theta + math.pi) / _TWO_PI, 1e-7, 1.0 - 1e-7)
        u = jnp.log(s) - jnp.log1p(-s)
        return u, self.log_prob(u)

    @property
    def mean(self):
        """Mean of ``u`` (Monte Carlo-free only for the angles; here a fixed-key estimate)."""
        u = self.sample(jax.random.key(0), 4096)
        return jnp.mean(u, 0)

    @property
    def cov(self):
        """Diagonal covariance of ``u`` from a fixed-key Monte-Carlo estimate (4,096 draws)."""
        u = self.sample(jax.random.key(0), 4096)
        return jnp.diag(jnp.var(u, 0))


class Dirichlet(RejectionSampled):
    """Dirichlet on the simplex of ``k`` components, as a family on ``k - 1`` unconstrained
    coordinates: NumPyro's stick-breaking map (``biject_to(simplex)``), so it matches a
    NumPyro simplex site.

    ``x ~ Dirichlet(a)`` is drawn as normalised independent Gammas, ``x = G / sum(G)``, and
    carried to ``u = stickbreaking^-1(x)``; ``log q(u) = log Dirichlet(x; a) + log|det J(u)|``
    with NumPyro's log-Jacobian of the map. Reparameterised through JAX's Gamma sampler;
    ``rsvi_draws`` gives the acceptance-rejection path of the Gammas for :class:`veil.RSVI`.
    Initialised at ``a_i = c`` for all ``i``, with ``c`` such that each unconstrained
    coordinate has sd about ``init_scale``.

    Examples:
        >>> import jax, veil
        >>> q = veil.Dirichlet(4)
        >>> q.dim, q.sample(jax.random.key(0), 2).shape
        (3, (2, 3))
    """

    log_concentration: Float[Array, " k"]
    k: int = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    def __init__(self, k: int, *, init_scale: float = 0.1):
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"k (the number of simplex components) must be an integer >= 2, got {k!r}.")
        self.k, self.dim = k, k - 1
        # A stick-breaking coordinate is about a logit of a Beta-like ratio of Gammas: sd
        # sqrt(2 trigamma(c)), as in Beta.
        c = _init_shape_for_scale(_check_scale(init_scale) / math.sqrt(2.0))
        self.log_concentration = jnp.full(k, math.log(c), dtype=float)

    @property
    def concentration(self):
        return jnp.exp(self.log_concentration)

    @property
    def _map(self):
        return dist.transforms.StickBreakingTransform()

    @property
    def distribution(self) -> dist.Distribution:
        return dist.TransformedDistribution(dist.Dirichlet(self.concentration), self._map.inv)

    def log_prob(self, u):
        x = self._map(u)
        return dist.Dirichlet(self.concentration).log_prob(x) + self._map.log_abs_det_jacobian(u, x)

    def _from_log_gammas(self, log_g):
        x = jax.nn.softmax(log_g, axis=-1)  # G / sum(G), from logs without overflow
        return self._map.inv(x)

    def sample_and_log_prob(self, key, n):
        g = jax.random.gamma(key, self.concentration, (n, self.k))
        u = self._from_log_gammas(jnp.log(g))
        return u, self.log_prob(u)

    def rsvi_draws(self, key, n: int, boost: int = 1):
        """The ``k`` Gammas along their acceptance-rejection paths (see :class:`Gamma`)."""
        log_g, log_pi = _rsvi_log_gamma(key, self.concentration, (n, self.k), boost)
        return self._from_log_gammas(log_g), log_pi

    @property
    def mean(self):
        """Mean of ``u`` from a fixed-key Monte-Carlo estimate (4,096 draws): the
        stick-breaking coordinates have no closed-form moments."""
        return jnp.mean(self.sample(jax.random.key(0), 4096), 0)

    @property
    def cov(self):
        """Covariance of ``u`` from the same fixed-key estimate."""
        return jnp.cov(self.sample(jax.random.key(0), 4096), rowvar=False).reshape(self.dim, self.dim)


class Poisson(Family):
    """``q(k) = prod_i Poisson(k_i; rate_i)`` for latent counts (a model's discrete sites with
    no finite support, which veil cannot sum out): draws are counts held as floats.

    A count has no reparameterisation path, so ``reparameterized = False``: ``veil.fit`` uses
    the score-function estimator (its leave-one-out baseline) by default and says so. Put it
    beside the continuous sites' family with :class:`veil.Composite` (the target lays its
    discrete sites after the continuous ones).

    Examples:
        >>> import jax, veil
        >>> k, lq = veil.Poisson(2, init_rate=3.0).sample_and_log_prob(jax.random.key(0), 4)
        >>> k.shape, bool((k == k.round()).all())
        ((4, 2), True)
    """

    log_rate: Float[Array, " dim"]
    dim: int = eqx.field(static=True)
    reparameterized = False

    def __init__(self, dim: int, *, init_rate: float = 1.0):
        self.dim = _check_dim(dim)
        self.log_rate = jnp.full(self.dim, math.log(_check_scale(init_rate)), dtype=float)

    @property
    def rate(self):
        return jnp.exp(self.log_rate)

    def log_prob(self, k):
        return jnp.sum(dist.Poisson(self.rate).log_prob(jnp.round(k)), -1)

    def sample_and_log_prob(self, key, n):
        # JAX's Poisson sampler runs on threefry keys only: one is seeded from the given key
        # (whatever its implementation), so the draws stay a function of it.
        seed = jax.random.randint(key, (), 0, jnp.iinfo(jnp.int32).max)
        threefry = jax.random.key(seed, impl="threefry2x32")
        k = jax.random.poisson(threefry, jax.lax.stop_gradient(self.rate), (n, self.dim))
        k = k.astype(self.log_rate.dtype)
        return k, self.log_prob(k)

    @property
    def mean(self):
        return self.rate

    @property
    def cov(self):
        return jnp.diag(self.rate)
