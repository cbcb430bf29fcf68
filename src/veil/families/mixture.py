"""Finite mixtures of veil families with learned weights.

``q(z) = sum_k w_k q_k(z)``, ``w = softmax(logits)``. The components are one family of one
type stacked along a leading axis (``K`` Gaussians, or ``K`` flows of one architecture), so
every component operation is one ``vmap``.

Drawing the component index is not differentiable in the weights, so a mixture has no
reparameterisation path as a whole (``reparameterized = False``) and the path-wise
estimators refuse it. Its estimator is :class:`veil.Stratified`: draw the same number of
points from *every* component and weight the per-component averages,

    ELBO(q) = sum_k w_k E_{q_k}[log p(z) - log q(z)],

which is exact as an identity, lets gradients reach the weights through ``w_k`` and the
components through their own reparameterised draws, with no score function (Morningstar,
Vikram, Ham, Gallagher & Dillon 2021, "Automatic Differentiation Variational Inference with
Mixtures"). ``veil.fit`` uses it by default for a mixture.
"""

from __future__ import annotations

import functools

from collections.abc import Sequence
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from veil.estimators import Stratified
from veil.family import Components, Family, FitDefaults
from veil.objectives import ELBO

__all__ = ["Mixture"]


@functools.cache
def _stratified(objective) -> ELBO:
    """The ELBO of ``objective`` (the components' default, ``None`` for the engine's) with its
    estimator stratified over the components. Cached: one objective per components' default."""
    if objective is None:
        return ELBO(estimator=Stratified())
    return ELBO(num_samples=objective.num_samples, estimator=Stratified(inner=objective.estimator))


def _stack(families: Sequence[Family]) -> Family:
    first = families[0]
    tree = jax.tree.structure(first)
    for i, f in enumerate(families[1:], 1):
        if type(f) is not type(first) or jax.tree.structure(f) != tree:
            raise ValueError(
                f"Mixture components must be one family of one shape; component {i} is a "
                f"{type(f).__name__} that differs from component 0 ({type(first).__name__})."
            )
    return jax.tree.map(lambda *xs: jnp.stack(xs) if eqx.is_array(xs[0]) else xs[0], *families)


class Mixture(Components):
    """Mixture ``sum_k softmax(logits)_k q_k(z)`` of ``K`` components of one family.

    Args:
        components: a sequence of ``K >= 2`` families of the same type and shape (e.g.
            ``[veil.FullRank(d, init_loc=m) for m in starts]``).
        logits: initial unnormalised log weights (default equal weights).

    Use :meth:`around` to spread copies of one family over the space. Fit with
    ``veil.fit(target, mixture, key=...)``: the default objective is the ELBO with the
    :class:`veil.Stratified` estimator (``num_samples`` draws from every component).

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> q = veil.Mixture([veil.MeanField(2, init_loc=jnp.array([-1.0, 0.0])),
        ...                   veil.MeanField(2, init_loc=jnp.array([1.0, 0.0]))])
        >>> q.weights, q.sample(jax.random.key(0), 5).shape
        (Array([0.5, 0.5], dtype=float32), (5, 2))
    """

    components: Family  # stacked: every array has a leading axis of size k
    logits: Float[Array, " k"]
    dim: int = eqx.field(static=True)
    k: int = eqx.field(static=True)
    reparameterized: ClassVar[bool] = False
    suggested_estimator: ClassVar[str] = "veil.Stratified()"

    def __init__(self, components: Sequence[Family], *, logits=None):
        components = list(components)
        if len(components) < 2 or not all(isinstance(c, Family) for c in components):
            raise ValueError("A Mixture needs a sequence of at least two veil families.")
        if isinstance(components[0], Mixture):
            raise ValueError("Components cannot themselves be mixtures; list their components.")
        self.k = len(components)
        self.dim = components[0].dim
        self.components = _stack(components)
        logits = jnp.zeros(self.k) if logits is None else jnp.asarray(logits, float)
        if logits.shape != (self.k,) or not bool(jnp.all(jnp.isfinite(logits))):
            raise ValueError(f"logits must be {self.k} finite numbers, got {logits!r}.")
        self.logits = logits

    @classmethod
    def around(cls, q: Family, k: int, *, key: PRNGKeyArray, radius: float = 2.0) -> "Mixture":
        """``k`` copies of ``q`` with their locations moved by independent Uniform(-radius,
        radius) noise per coordinate (Stan's initialisation radius), equal weights. For a flow
        the base Gaussian's location moves."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"k must be an integer >= 2, got {k!r}.")
        jitter = jax.random.uniform(key, (k, q.dim), minval=-radius, maxval=radius)
        where = q.location_field()
        if where is None:
            raise TypeError(f"{type(q).__name__} has no location to spread; build the list yourself.")
        return cls([eqx.tree_at(where, q, where(q) + j) for j in jitter])

    def fit_defaults(self, *, minibatched: bool) -> FitDefaults:
        """The components' defaults with every draw stratified over the components (the ELBO
        with draws from every component, so gradients reach the weights without the score
        function); for flow components their draw count, optimizer and stopping rule too."""
        inner = self.components.fit_defaults(minibatched=minibatched) or FitDefaults()
        return inner._replace(objective=_stratified(inner.objective))

    @property
    def weights(self) -> Float[Array, " k"]:
        """Mixture weights ``softmax(logits)``."""
        return jax.nn.softmax(self.logits)

    def component_log_probs(self, z) -> Float[Array, "k ..."]:
        """``log q_k(z)`` of every component, stacked on a leading axis."""
        return eqx.filter_vmap(lambda c: c.log_prob(z))(self.components)

    def log_prob(self, z):
        log_w = jax.nn.log_softmax(self.logits)
        per = self.component_log_probs(z)
        return jax.scipy.special.logsumexp(per + log_w.reshape((self.k,) + (1,) * (per.ndim - 1)), axis=0)

    def component_draws(self, key, n: int) -> Float[Array, "k n dim"]:
        """``n`` reparameterised draws from every component."""
        keys = jax.random.split(key, self.k)
        return eqx.filter_vmap(lambda c, kk: c.sample(kk, n))(self.components, keys)

    def sample_and_log_prob(self, key, n):
        pick_key, draw_key = jax.random.split(key)
        index = jax.random.categorical(pick_key, self.logits, shape=(n,))
        # Every component draws n points and each row keeps its own component's: K times the
        # draws of one component, but one vmapped program (K is small).
        z = self.component_draws(draw_key, n)[index, jnp.arange(n)]
        return z, self.log_prob(z)

    @property
    def mean(self):
        means = eqx.filter_vmap(lambda c: c.mean)(self.components)
        return self.weights @ means

    @property
    def cov(self):
        means = eqx.filter_vmap(lambda c: c.mean)(self.components)
        covs = eqx.filter_vmap(lambda c: c.cov)(self.components)
        mu = self.weights @ means
        second = jnp.einsum("k,kij->ij", self.weights, covs + means[:, :, None] * means[:, None, :])
        return second - jnp.outer(mu, mu)
