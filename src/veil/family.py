"""The family protocol: what every variational family is, and the abilities some declare.

A family is an ``equinox.Module`` whose array fields are the variational parameters
(:class:`Family`). What a family can do beyond drawing and scoring is declared, never guessed
from attribute names: by subclassing an ability class (:class:`LocationScale`,
:class:`FactorSteps`, :class:`Gaussian`, :class:`RejectionSampled`, :class:`Components`,
:class:`Staged`) or through the protocol's own methods (:meth:`Family.fit_defaults`,
:meth:`Family.check_fittable`, :meth:`Family.location_field`). Estimators, objectives,
optimisers and ``veil.fit`` read these declarations; the concrete families live in
:mod:`veil.families`, which sits above the objectives so that a family can name its defaults.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

__all__ = [
    "Family",
    "FitDefaults",
    "MonteCarloMoments",
    "LocationScale",
    "FactorSteps",
    "Gaussian",
    "RejectionSampled",
    "Components",
    "Staged",
    "stop_gradient",
]


class FitDefaults(NamedTuple):
    """What ``veil.fit`` uses for a family when the caller leaves a setting out.

    A field left ``None`` takes the engine's default (``veil.fit``'s docstring): the ELBO with
    one reparameterised draw, :func:`veil.default_optimizer`, and ``veil.StopRule()`` (or the
    minibatch rule on a minibatched target).

    Attributes:
        objective: a ``veil.Objective``.
        optimizer: an optax ``GradientTransformation``, created once (the compiled loop is
            keyed by its identity).
        stop: a ``veil.StopRule``.
    """

    objective: Any = None
    optimizer: Any = None
    stop: Any = None

_MOMENT_KEY = 20240229


class Family(eqx.Module):
    """Abstract variational family ``q_phi(z)`` on ``R^dim``.

    Concrete families are final ``equinox.Module`` classes. Their array fields are the
    parameters ``phi``; every constraint (positive scales, positive Cholesky diagonals) comes
    from the parameterisation (``exp`` of an unconstrained field), never from clipping, so any
    optax optimizer can update every field freely.

    ``sample`` and ``sample_and_log_prob`` are reparameterised: ``z = T_phi(eps)`` with ``eps``
    drawn independently of ``phi``, so gradients flow from ``z`` to ``phi``.
    """

    dim: eqx.AbstractVar[int]
    # Whether draws are differentiable in the parameters (path-wise estimators need it).
    reparameterized: ClassVar[bool] = True
    # The estimator an error message suggests when a path-wise one is asked of a family
    # without a reparameterisation path.
    suggested_estimator: ClassVar[str] = "veil.ScoreFunction()"

    def fit_defaults(self, *, minibatched: bool) -> FitDefaults | None:
        """The objective, optimizer and stopping rule ``veil.fit`` uses for this family when
        the caller gives none (``minibatched``: whether the target is); ``None``, or a field
        left ``None``, means the engine's defaults. Flows, semi-implicit families and mixtures
        override it."""
        del minibatched
        return None

    def check_fittable(self) -> None:
        """Raise ``TypeError`` (naming what to use instead) if ``veil.fit`` cannot train this
        family by gradient; a family that can does nothing."""

    def location_field(self) -> Callable[[Family], Array] | None:
        """A selector for ``eqx.tree_at`` of the family's location (shape ``(dim,)``), which
        restarts and ``Mixture.around`` shift; ``None`` for a family without one."""
        return None

    @abc.abstractmethod
    def sample_and_log_prob(
        self, key: PRNGKeyArray, n: int
    ) -> tuple[Float[Array, "n dim"], Float[Array, " n"]]:
        """``n`` reparameterised draws and their log densities under ``q``."""

    @abc.abstractmethod
    def log_prob(self, z: Float[Array, "... dim"]) -> Float[Array, "..."]:
        """``log q(z)``, batched over leading axes."""

    @property
    def noise_dim(self) -> int:
        """Dimension of the standard-normal noise ``eps`` that :meth:`transform_and_log_prob`
        maps to draws; only families defined by such a map (the Gaussians) have one."""
        raise NotImplementedError(
            f"{type(self).__name__} is not a transform of standard-normal noise, so it cannot use "
            "quasi-Monte Carlo or unscented base points; use the default i.i.d. draws."
        )

    def transform_and_log_prob(
        self, eps: Float[Array, "n noise"]
    ) -> tuple[Float[Array, "n dim"], Float[Array, " n"]]:
        """Draws ``z = T_phi(eps)`` from given standard-normal noise, and ``log q(z)``."""
        raise NotImplementedError(
            f"{type(self).__name__} is not a transform of standard-normal noise."
        )

    def sample_with_stopped_log_prob(
        self, key: PRNGKeyArray, n: int
    ) -> tuple[Float[Array, "n dim"], Float[Array, " n"]]:
        """``n`` reparameterised draws and ``log q(z)`` at *stopped* parameters: the pair
        that sticking-the-landing, DReG and sigma-point gradients use (the draws carry the
        path gradient to the parameters, ``log q`` only its gradient in ``z``). A family that
        can get that from the noise more cheaply than :meth:`log_prob` overrides this and
        :meth:`transform_with_stopped_log_prob`."""
        z = self.sample(key, n)
        return z, stop_gradient(self).log_prob(z)

    def transform_with_stopped_log_prob(
        self, eps: Float[Array, "n noise"]
    ) -> tuple[Float[Array, "n dim"], Float[Array, " n"]]:
        """As :meth:`sample_with_stopped_log_prob`, from given noise ``eps``."""
        z = self.transform_and_log_prob(eps)[0]
        return z, stop_gradient(self).log_prob(z)

    def whiten(self, z: Float[Array, "n dim"]) -> Float[Array, "n dim"]:
        """The noise ``eps`` with ``z = T_phi(eps)``: the inverse of
        :meth:`transform_and_log_prob`, for families whose noise has the dimension of ``z``."""
        raise NotImplementedError(
            f"{type(self).__name__} has no invertible map from noise of its own dimension."
        )

    def watched(self):
        """What ``veil.fit``'s stopping rule watches for drift (a pytree of arrays): by
        default the parameters themselves. A family whose parameters are not identified (a
        flow's network weights wander while its distribution stays put) returns summaries
        of its distribution instead."""
        return eqx.filter(self, eqx.is_inexact_array)

    def sample(self, key: PRNGKeyArray, n: int) -> Float[Array, "n dim"]:
        """``n`` reparameterised draws."""
        return self.sample_and_log_prob(key, n)[0]

    @property
    @abc.abstractmethod
    def mean(self) -> Float[Array, " dim"]:
        """Mean of ``q``."""

    @property
    @abc.abstractmethod
    def cov(self) -> Float[Array, "dim dim"]:
        """Covariance of ``q``."""

    @property
    def stddev(self) -> Float[Array, " dim"]:
        """Marginal standard deviations of ``q``."""
        return jax.numpy.sqrt(jax.numpy.diagonal(self.cov))


class LocationScale(Family):
    """Ability: ``z = loc + S eps`` (field ``loc``) with a scale ``S`` the family can apply and
    transpose. veil's whitened location step (:func:`veil.optim.whitened_location`) uses it.
    The field is the subclass's own (see :class:`Components`)."""

    @abc.abstractmethod
    def scale_matvec(self, u: Float[Array, " dim"]) -> Float[Array, " dim"]:
        """``S u``."""

    @abc.abstractmethod
    def scale_rmatvec(self, g: Float[Array, " dim"]) -> Float[Array, " dim"]:
        """``S^T g``."""

    def location_field(self):
        return lambda m: m.loc


class FactorSteps(LocationScale):
    """Ability: a dense factor ``L`` that takes steps ``L -> L (I + M)`` in whitened
    coordinates (:func:`veil.optim.whitened_factor`)."""

    @abc.abstractmethod
    def factor_rmatvec(self, grads: Family) -> Float[Array, "dim dim"]:
        """The factor's gradient seen in whitened coordinates, ``L^T G``."""

    @abc.abstractmethod
    def factor_matvec(self, m: Float[Array, "dim dim"]) -> Family:
        """The parameter change of the whitened step ``m`` (a family-shaped pytree)."""


class Gaussian(LocationScale):
    """Ability: ``q`` is exactly the Gaussian ``N(mean, cov)`` (mean and covariance in closed
    form), so Gaussian checks (the mean-drift Newton step) apply to it."""


class RejectionSampled(Family):
    """Ability: draws by acceptance-rejection with a reparameterised proposal, the pieces
    that RSVI's gradient needs (``veil.RSVI``)."""

    @abc.abstractmethod
    def rsvi_draws(self, key: PRNGKeyArray, n: int, boost: int = 1):
        """``n`` draws and the log density of their accepted proposal noise."""


class Components(Family):
    """Ability: a weighted mixture of ``k`` components of one family (fields ``k`` and
    ``components``, the latter stacked), drawn from every component at once
    (``veil.Stratified``). The fields are the subclass's own, not abstract variables here:
    these would come first among its fields and reorder its parameters' leaves."""

    @property
    @abc.abstractmethod
    def weights(self) -> Float[Array, " k"]:
        """The mixture weights."""

    @abc.abstractmethod
    def component_draws(self, key: PRNGKeyArray, n: int) -> Float[Array, "k n dim"]:
        """``n`` draws from every component."""


class Staged(Family):
    """Ability: a family built over a base family (field ``base``) that ``veil.fit`` fits
    first, alone, when ``fit_base_first`` (a flow or semi-implicit family built without a
    base). The fields are the subclass's own (see :class:`Components`)."""

    @abc.abstractmethod
    def with_base(self, base: Family) -> Family:
        """The same family over ``base`` (the fitted first stage)."""

    def location_field(self):
        inner = self.base.location_field()
        return None if inner is None else (lambda m: inner(m.base))


def stop_gradient(q: Family) -> Family:
    """The same family with every parameter behind ``lax.stop_gradient``."""
    return jax.tree.map(lambda x: jax.lax.stop_gradient(x) if eqx.is_array(x) else x, q)


@eqx.filter_jit
def _monte_carlo_moments(q):
    z = q.sample(jax.random.key(_MOMENT_KEY), q.moment_draws)
    return jax.numpy.mean(z, axis=0), jax.numpy.atleast_2d(jax.numpy.cov(z.T))


class MonteCarloMoments:
    """Mixin: ``mean`` and ``cov`` of a family without closed-form moments, as Monte-Carlo
    estimates from ``moment_draws`` draws with a fixed key (deterministic; standard error
    ``sd / sqrt(moment_draws)``), compiled once per family structure."""

    moment_draws: ClassVar[int] = 10_000

    @property
    def mean(self):
        return _monte_carlo_moments(self)[0]

    @property
    def cov(self):
        return _monte_carlo_moments(self)[1]
