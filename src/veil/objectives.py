"""Objectives: Monte-Carlo losses to minimise, each a small immutable value.

An objective is called as ``objective(q, target, key) -> (loss, aux)``, where ``target`` is a
:class:`~veil.Target` or a plain log-density function of a flat vector; ``loss`` is a scalar to
minimise and ``aux`` an :class:`ObjectiveAux` with the bound's value and the draws' log weights.

Most objectives here are a *reduction* of the log weights ``log w_i = log p(z_i) - log q(z_i)``
of ``n`` draws from ``q`` (:class:`WeightObjective`): the ELBO is their mean, the
importance-weighted bound their log-mean-exp. Written that way, an objective composes with every
gradient estimator (:mod:`veil.estimators`): ``IWAE(8, estimator=DReG())`` is a value, not a
class.

One calling rule for all: an objective takes its draw count first (``ELBO(4)``, ``IWAE(8)``,
``Renyi(8, alpha=0.5)``, ``ChiSquare(16)``, ``ForwardKL(8)``; ``MMD(reference, 64)`` after its
reference) and everything else, the estimator included, by keyword.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jaxtyping import Array, Float, PRNGKeyArray

from veil.estimators import STL, DReG, Draws, Estimator, Reparam, ScoreFunction, _values
from veil.family import stop_gradient
from veil.kernels import RBF, Kernel
from veil.family import Family

__all__ = [
    "Objective",
    "WeightObjective",
    "ObjectiveAux",
    "ELBO",
    "IWAE",
    "Renyi",
    "ChiSquare",
    "ForwardKL",
    "log_mean_exp",
    "log_density_of",
    "estimate",
    "FunctionObjective",
    "MMD",
    "SumObjective",
]


class ObjectiveAux(NamedTuple):
    """Side outputs of an objective: the bound estimate and the draws' log weights."""

    bound: Float[Array, ""]
    log_weights: Float[Array, " n"]


def log_mean_exp(x: Float[Array, "... n"], axis: int = -1) -> Float[Array, "..."]:
    """``log(mean(exp(x)))`` along ``axis``, without overflow.

    Examples:
        >>> import jax.numpy as jnp, veil
        >>> float(veil.log_mean_exp(jnp.array([1000.0, 1000.0])))
        1000.0
    """
    return logsumexp(x, axis=axis) - math.log(x.shape[axis])


def log_density_of(target) -> Callable:
    """The log-density function of a :class:`~veil.Target` or of a plain callable."""
    log_density = getattr(target, "log_density", target)
    if not callable(log_density):
        raise TypeError(
            f"target must be a veil.Target or a log-density function, got {type(target).__name__}."
        )
    return log_density


def _check_count(name: str, value, usage: str | None = None) -> int:
    """``value`` if it is a positive integer; else a ``ValueError`` that, for an objective,
    gives its call pattern (``usage``): every objective takes its draw count first and
    everything else (the estimator, an order, weights) by keyword."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = "" if usage is None else (
            f" Objectives take their draw count first and the rest by keyword: {usage}.")
        raise ValueError(f"{name} must be a positive integer, got {value!r}.{hint}")
    return value


def estimate(
    f: Callable[[Float[Array, " n"]], Float[Array, ""]],
    q: Family,
    target,
    key: PRNGKeyArray,
    n: int,
    estimator: Estimator | None = None,
) -> tuple[Float[Array, ""], Draws]:
    """The programmable-VI primitive: ``f(log w)`` of ``n`` fresh draws, differentiable.

    ``f`` maps the draws' log weights ``log p(z_i) - log q(z_i)`` to a scalar; the value
    returned is ``f(log w)`` and its gradient with respect to ``q``'s parameters is
    ``estimator``'s estimate of ``grad E[f(log w)]`` (default :class:`~veil.Reparam`; any
    smooth ``f`` also gets :class:`~veil.DReG` and :class:`~veil.ScoreFunction`). A new
    objective is then a few lines; see ``examples/combined_bound.py``.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> value, draws = veil.estimate(jnp.mean, veil.MeanField(2),
        ...                              lambda z: -0.5 * jnp.sum(z**2), jax.random.key(0), 4)
        >>> draws.z.shape
        (4, 2)
    """
    estimator = Reparam() if estimator is None else estimator
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be a veil estimator such as veil.DReG(), got {estimator!r}.")
    return estimator.estimate(f, q, log_density_of(target), key, _check_count("n", n))


class Objective(eqx.Module):
    """Abstract objective: ``__call__(q, target, key) -> (loss, aux)``.

    Objectives add and scale: ``veil.ELBO() + 0.1 * veil.MMD(reference)`` is a
    :class:`SumObjective` whose loss is the weighted sum of the terms' losses, each term with
    its own key.
    """

    @abc.abstractmethod
    def __call__(
        self, q: Family, target, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], ObjectiveAux]:
        """A scalar loss to minimise and its :class:`ObjectiveAux`."""

    def init_state(self, q: Family):
        """State the objective carries from step to step (``None``: stateless, the rule);
        ``veil.fit`` threads it through :meth:`call_with_state`."""
        estimator = getattr(self, "estimator", None)
        return estimator.init_state() if isinstance(estimator, Estimator) else None

    def call_with_state(self, q: Family, target, key: PRNGKeyArray, state):
        """``(loss, aux, new_state)``; stateless objectives return ``state`` unchanged."""
        loss, aux = self(q, target, key)
        return loss, aux, state

    def check_family(self, q: Family) -> None:
        """Raise if this objective's gradient estimator cannot work with ``q`` (called by
        ``veil.fit`` before any computation)."""
        estimator = getattr(self, "estimator", None)
        if isinstance(estimator, Estimator):
            estimator.check_family(q)

    def __add__(self, other):
        if not isinstance(other, Objective):
            return NotImplemented
        return SumObjective(_terms(self) + _terms(other), _weights(self) + _weights(other))

    def __mul__(self, weight):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            return NotImplemented
        return SumObjective(_terms(self), tuple(float(weight) * w for w in _weights(self)))

    __rmul__ = __mul__


class WeightObjective(Objective):
    """An objective that maximises ``E[reduce(log w_1, ..., log w_n)]``, ``z_i ~ q`` i.i.d.

    Subclasses define :meth:`reduce` and :attr:`num_draws`, and set ``linear = True`` when the
    reduction is linear in the log weights (which is when :class:`~veil.STL` is unbiased).
    The estimator decides how the gradient is formed; the loss is ``-reduce(log w)``.
    """

    estimator: eqx.AbstractVar[Estimator]
    linear: ClassVar[bool] = False

    @property
    @abc.abstractmethod
    def num_draws(self) -> int:
        """Draws per evaluation."""

    @abc.abstractmethod
    def reduce(self, log_weights: Float[Array, " n"]) -> Float[Array, ""]:
        """The bound (to maximise) as a function of the draws' log weights."""

    def __check_init__(self):
        if not isinstance(self.estimator, Estimator):
            raise TypeError(
                f"estimator must be a veil estimator such as veil.STL(), got {self.estimator!r}."
            )
        self.estimator.check(type(self).__name__, self.linear)

    def __call__(self, q, target, key):
        bound, draws = self.estimator.estimate(
            self.reduce, q, log_density_of(target), key, self.num_draws
        )
        return -bound, ObjectiveAux(jax.lax.stop_gradient(bound), draws.log_weights)

    def call_with_state(self, q, target, key, state):
        if state is None:
            return (*self(q, target, key), None)
        bound, draws, state = self.estimator.estimate_with_state(
            self.reduce, q, log_density_of(target), key, self.num_draws, state
        )
        return -bound, ObjectiveAux(jax.lax.stop_gradient(bound), draws.log_weights), state


class ELBO(WeightObjective):
    """The evidence lower bound, ``ELBO(q) = E_q[log p(z) - log q(z)] <= log Z``.

    Maximising it minimises ``KL(q || p)``. The loss is the negative Monte-Carlo estimate
    ``-(1/n) sum_s [log p(z_s) - log q(z_s)]`` from ``num_samples`` draws.

    Args:
        num_samples: draws per step; more draws reduce gradient noise at proportional cost.
        estimator: where gradients flow; :class:`~veil.STL` (default) has zero variance at
            an exact fit and gave the most accurate fits per step in our measurements;
            :class:`~veil.Reparam` is the plain path-wise estimator,
            :class:`~veil.ScoreFunction` the one for families without reparameterisation.
        likelihood_weight: ``k`` in ``E_q[k log p(y|z) + log p(z) - log q(z)]``: ``k > 1``
            emphasises the data, as in the data-emphasised objective (Harvey et al.) that
            learns hyperparameters well when the likelihood's few terms are outweighed by many
            parameters' priors; ``k < 1`` tempers it (a "cold" or "tempered" posterior).
            Needs a target with a separate likelihood (NumPyro models have one).
        beta: ``b`` in ``E_q[log p(y|z)] - b KL(q || p(z))``, as in the beta-VAE (Higgins et
            al.); with both, ``E_q[k log p(y|z) + b (log p(z) - log q(z))]``. The optimum is
            the ``q`` closest in KL to the posterior with likelihood raised to ``k / b``.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> loss, aux = veil.ELBO(num_samples=4)(
        ...     veil.MeanField(2), lambda z: -0.5 * jnp.sum(z**2), jax.random.key(0))
        >>> loss.shape
        ()

    References:
        Jordan, Ghahramani, Jaakkola & Saul (1999), An Introduction to Variational Methods
        for Graphical Models; Kucukelbir et al. (2017), Automatic Differentiation
        Variational Inference.
    """

    num_samples: int = eqx.field(static=True, default=4)
    estimator: Estimator = eqx.field(default=STL(), kw_only=True)
    likelihood_weight: float | int = eqx.field(static=True, default=1.0, kw_only=True)
    beta: float | int = eqx.field(static=True, default=1.0, kw_only=True)
    linear: ClassVar[bool] = True

    def __check_init__(self):
        _check_count("num_samples", self.num_samples, "veil.ELBO(4, estimator=veil.STL())")
        for name in ("likelihood_weight", "beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                math.isfinite(v) and v > 0
            ):
                raise ValueError(f"{name} must be a finite positive number, got {v!r}.")

    def __call__(self, q, target, key):
        if self.likelihood_weight == 1 and self.beta == 1:
            return super().__call__(q, target, key)
        # E[k log lik + b (log prior - log q)] = b * E[(k / b) log lik + log prior - log q]:
        # the plain ELBO of a target whose likelihood is raised to the power k / b, times b.
        if not getattr(target, "has_likelihood", False):
            raise ValueError(
                "ELBO(likelihood_weight=..., beta=...) needs the target's log likelihood apart "
                "from its prior: use veil.Target.from_numpyro(model, ...) or "
                "veil.Target.from_logdensity(fn, dim, log_likelihood=...)."
            )
        extra = self.likelihood_weight / self.beta - 1.0

        def tempered(z):
            return target.log_density(z) + extra * target.log_likelihood(z)

        bound, draws = self.estimator.estimate(self.reduce, q, tempered, key, self.num_samples)
        bound = self.beta * bound
        return -bound, ObjectiveAux(jax.lax.stop_gradient(bound), draws.log_weights)

    @property
    def num_draws(self) -> int:
        return self.num_samples

    def reduce(self, log_weights):
        return jnp.mean(log_weights)


class IWAE(WeightObjective):
    """The importance-weighted bound ``E[log (1/k) sum_i w_i] <= log Z``, ``w_i = p(z_i)/q(z_i)``.

    Tighter than the ELBO for ``k > 1`` and increasing in ``k`` (``k = 1`` is the ELBO). Fitting
    ``q`` to it makes ``q`` a good *proposal* for importance sampling rather than a good
    approximation in ``KL(q || p)``: expect a wider ``q``. The default estimator is
    :class:`~veil.DReG`: the plain path-wise estimator's signal-to-noise ratio for ``q``'s
    parameters decays like ``1/sqrt(k)`` (Rainforth et al., 2018); DReG's does not.

    Args:
        k: importance samples per bound estimate.
        estimator: :class:`~veil.DReG` (default), :class:`~veil.Reparam` or
            :class:`~veil.ScoreFunction`; :class:`~veil.STL` is biased here and rejected.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> loss, aux = veil.IWAE(k=8)(
        ...     veil.MeanField(2), lambda z: -0.5 * jnp.sum(z**2), jax.random.key(0))
        >>> aux.log_weights.shape
        (8,)

    References:
        Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders.
    """

    k: int = eqx.field(static=True, default=8)
    estimator: Estimator = eqx.field(default=DReG(), kw_only=True)

    def __check_init__(self):
        _check_count("k", self.k, "veil.IWAE(8, estimator=veil.DReG())")

    @property
    def num_draws(self) -> int:
        return self.k

    def reduce(self, log_weights):
        return log_mean_exp(log_weights)


class Renyi(WeightObjective):
    """The variational Rényi bound ``L_a = 1/(1-a) E[log (1/k) sum_i w_i^(1-a)]``.

    ``a -> 1`` is the ELBO (the limit is taken exactly at ``a = 1``), ``a = 0`` the IWAE bound;
    ``0 < a < 1`` interpolates between the mass-covering IWAE and the mode-seeking ELBO, and
    ``a > 1`` is more mode-seeking than the ELBO. Non-increasing in ``a``. Orders ``a < 0``
    (where ``L_a`` bounds ``log Z`` from above) are refused: maximising their ``k``-draw
    estimate does not fit ``q`` to ``p`` (measured: MeanField fits to a correlated Gaussian
    wandered 1-2 sd off the mean); for an upper bound and a mass-covering fit use
    :class:`ChiSquare`.

    Args:
        k: draws per bound estimate.
        alpha: the order ``a >= 0`` (keyword only: ``Renyi(8, alpha=0.5)``).
        estimator: :class:`~veil.DReG` (default), :class:`~veil.Reparam`,
            :class:`~veil.ScoreFunction`; :class:`~veil.STL` only at ``alpha = 1``.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> log_p = lambda z: -0.5 * jnp.sum(z**2)
        >>> q, key = veil.MeanField(2), jax.random.key(0)
        >>> bool(jnp.allclose(veil.Renyi(alpha=0.0, k=4)(q, log_p, key)[0],
        ...                   veil.IWAE(k=4)(q, log_p, key)[0]))
        True

    References:
        Li & Turner (2016), Rényi Divergence Variational Inference.
    """

    k: int = eqx.field(static=True, default=8)
    alpha: float | int = eqx.field(static=True, default=0.5, kw_only=True)
    estimator: Estimator = eqx.field(default=DReG(), kw_only=True)

    def __check_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
            math.isfinite(self.alpha) and self.alpha >= 0
        ):
            raise ValueError(
                f"alpha must be a finite number >= 0, got {self.alpha!r} (alpha = 0 is IWAE, 1 "
                "the ELBO); for an upper bound on log Z and a mass-covering fit use veil.ChiSquare()."
            )
        _check_count("k", self.k, "veil.Renyi(8, alpha=0.5)")

    @property
    def linear(self) -> bool:  # type: ignore[override]
        return self.alpha == 1

    @property
    def num_draws(self) -> int:
        return self.k

    def reduce(self, log_weights):
        if self.alpha == 1:
            return jnp.mean(log_weights)
        return log_mean_exp((1.0 - self.alpha) * log_weights) / (1.0 - self.alpha)


def _check_wake_estimator(name: str, estimator) -> None:
    ok = isinstance(estimator, DReG) or (
        isinstance(estimator, ScoreFunction) and estimator.baseline is None
    )
    if not ok:
        raise ValueError(
            f"{name} takes estimator=veil.DReG() (reparameterisable families) or "
            f"veil.ScoreFunction(baseline=None) (any family), got {estimator!r}: its gradient "
            "is a self-normalised weighted score, which the other estimators do not form."
        )


def _tilted_score(q, log_density, key, k: int, power: float, scale: float, estimator):
    """A zero-valued surrogate whose gradient is ``-scale * sum_i s_i grad log q(z_i)``,
    ``s = softmax(power * log w)``, the self-normalised estimate of
    ``-scale * E_q[w^power grad log q] / E_q[w^power]``, and the draws.

    With :class:`~veil.DReG` the score terms are rewritten path-wise with
    ``E[s_i grad log q(z_i)] = E[grad_{z_i} s_i dz_i/dphi]`` and
    ``ds_i/dlog w_i = power * (s_i - s_i^2)``: the gradient becomes
    ``-scale * power * sum_i (s_i - s_i^2) * path-gradient of log w_i``, which vanishes at an
    exact fit. With ``ScoreFunction(baseline=None)`` ``z`` is stopped and the score form is used.
    """
    if isinstance(estimator, DReG):
        z = q.sample(key, k)
        log_q = stop_gradient(q).log_prob(z)  # gradients through the draws only
    else:
        z = jax.lax.stop_gradient(q.sample(key, k))
        log_q = q.log_prob(z)  # gradients through the parameters only
    log_p = jax.vmap(log_density)(z)
    s = jax.lax.stop_gradient(jax.nn.softmax(power * (log_p - log_q)))
    if isinstance(estimator, DReG):
        surrogate = -scale * power * jnp.sum((s - s**2) * (log_p - log_q))
    else:
        surrogate = -scale * jnp.sum(s * log_q)
    return surrogate - jax.lax.stop_gradient(surrogate), _values(z, log_p, log_q)


class ChiSquare(Objective):
    """The chi-square upper bound (CUBO): minimise ``CUBO(q) = 1/2 log E_q[(p(z)/q(z))^2] >= log Z``.

    Minimising it minimises the chi-square divergence ``chi^2(p || q)``, which is large when
    ``q`` misses mass that ``p`` has: the fit covers the target's mass (it overdisperses where
    the ELBO fit underdisperses), which makes ``q`` a good importance-sampling proposal. That is
    variational importance sampling: fit with ``ChiSquare``, then estimate ``log Z`` with
    :meth:`VIResult.log_evidence <veil.VIResult.log_evidence>`.

    Since ``grad E_q[w^2] = -E_q[w^2 grad log q]``, the gradient is
    ``grad CUBO = -1/2 E_q[w^2 grad log q] / E_q[w^2]``, estimated by self-normalised
    importance sampling: ``-1/2 sum_i s_i grad log q(z_i)`` with ``s = softmax(2 log w)``, the
    forward-chi^2 analogue of the reweighted wake-sleep update (consistent as ``k`` grows).
    Two alternatives were measured and rejected: differentiating the ``k``-draw estimate
    ``1/2 log mean_i w_i^2`` itself collapses ``q`` to a point (the estimate, unlike the CUBO,
    falls as ``q`` narrows, because the draws then never reach the tails where ``p/q``
    explodes); Dieng et al.'s unbiased gradient of ``E[w^2]`` was too heavy-tailed for Adam
    (fits stopped with means ~1 sd off). The reported loss is the ``k``-draw CUBO estimate.

    Start from an ELBO fit, ``veil.fit(target, elbo_result.q, objective=veil.ChiSquare())``:
    from a start much narrower than the target the second moment is infinite (``q``'s variance
    below half the target's in some direction) and its estimates mean little.

    Args:
        k: draws per step; default ``max(32, 2 dim)``. The gradient's self-normalised
            weights ``softmax(2 log w)`` must not collapse onto one draw: on German credit
            (25 dimensions) 16 draws let ``q`` widen step after step (sds 4.5x the ELBO fit's,
            its bound estimate 240 nats below log Z, evidence k-hat 20), while 32, 64 and 128
            kept the sds within 1% and gave k-hat 0.5 (docs/benchmarks/chi-square-route-to-evidence.md).
        estimator: :class:`~veil.DReG` (default: the path-wise rewrite of the score terms,
            exactly zero at an exact fit) or ``ScoreFunction(baseline=None)``.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> loss, aux = veil.ChiSquare(16)(
        ...     veil.MeanField(2), lambda z: -0.5 * jnp.sum(z**2), jax.random.key(0))
        >>> bool(aux.bound == loss)  # an upper bound, minimised
        True

    References:
        Dieng, Tran, Ranganath, Paisley & Blei (2017), Variational Inference via chi Upper
        Bound Minimization; Jerfel et al. (2021), Variational Refinement for Importance
        Sampling Using the Forward Kullback-Leibler Divergence (forward chi^2 VIS).
    """

    k: int | None = eqx.field(static=True, default=None)
    estimator: Estimator = eqx.field(default=DReG(), kw_only=True)

    def __check_init__(self):
        if self.k is not None:
            _check_count("k", self.k, "veil.ChiSquare(64, estimator=veil.DReG())")
        _check_wake_estimator("ChiSquare", self.estimator)

    def draws_for(self, dim: int) -> int:
        """Draws per step: ``k``, or by default ``max(32, 2 dim)``."""
        return self.k if self.k is not None else max(32, 2 * dim)

    def __call__(self, q, target, key):
        surrogate, draws = _tilted_score(
            q, log_density_of(target), key, self.draws_for(q.dim), 2.0, 0.5, self.estimator
        )
        cubo = 0.5 * log_mean_exp(2.0 * draws.log_weights)
        return cubo + surrogate, ObjectiveAux(cubo, draws.log_weights)


class ForwardKL(Objective):
    """Inclusive KL, ``KL(p || q)``, by self-normalised importance sampling from ``q``.

    ``grad KL(p || q) = -E_p[grad log q(z)] ~ -sum_i w~_i grad log q(z_i)`` with ``z_i ~ q`` and
    normalised weights ``w~_i = w_i / sum_j w_j``: the wake-phase update of reweighted
    wake-sleep for ``q``, and the multi-sample objective used to train proposals for latent
    reasoning traces. The loss is the self-normalised estimate of the cross-entropy
    ``-E_p[log q(z)] = KL(p || q) + H(p)`` (biased for small ``k``, consistent as ``k`` grows).
    Like ``ChiSquare``, it fits ``q`` to cover the target's mass.

    Args:
        k: draws per step.
        estimator: :class:`~veil.DReG` (default: the doubly reparameterised wake update,
            ``-sum_i (w~_i - w~_i^2) * path-gradient of log w_i``, for reparameterisable
            families) or ``ScoreFunction(baseline=None)`` (the classic update through
            ``log q`` only, for any family).

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> loss, aux = veil.ForwardKL(k=8)(
        ...     veil.MeanField(2), lambda z: -0.5 * jnp.sum(z**2), jax.random.key(0))
        >>> loss.shape
        ()

    References:
        Bornschein & Bengio (2015), Reweighted Wake-Sleep; Le, Kosiorek, Siddharth, Teh &
        Wood (2019), Revisiting Reweighted Wake-Sleep for Models with Stochastic Control Flow;
        Tucker, Lawson, Gu & Maddison (2019), Doubly Reparameterized Gradient Estimators for
        Monte Carlo Objectives.
    """

    k: int = eqx.field(static=True, default=8)
    estimator: Estimator = eqx.field(default=DReG(), kw_only=True)

    def __check_init__(self):
        _check_count("k", self.k, "veil.ForwardKL(8, estimator=veil.DReG())")
        _check_wake_estimator("ForwardKL", self.estimator)

    def __call__(self, q, target, key):
        surrogate, draws = _tilted_score(
            q, log_density_of(target), key, self.k, 1.0, 1.0, self.estimator
        )
        w = jax.nn.softmax(draws.log_weights)
        cross_entropy = -jnp.sum(w * draws.log_q)
        return cross_entropy + surrogate, ObjectiveAux(-cross_entropy, draws.log_weights)


class FunctionObjective(Objective):
    """A plain function ``fn(q, target, key) -> loss`` (or ``-> (loss, aux)``) as an objective.

    ``veil.fit`` wraps a function given as ``objective=`` in this class. Keep the same function
    object between fits: it is part of the compiled program's identity.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> def neg_elbo(q, target, key):
        ...     value, _ = veil.estimate(jnp.mean, q, target, key, 4, veil.STL())
        ...     return -value
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum((z - 1.0) ** 2), dim=2)
        >>> res = veil.fit(t, veil.MeanField(2), key=jax.random.key(0), objective=neg_elbo,
        ...                progress=False)
        >>> bool(jnp.allclose(res.q.mean, 1.0, atol=0.05))
        True
    """

    fn: Callable = eqx.field(static=True)

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(f"FunctionObjective needs a callable, got {self.fn!r}.")

    def __call__(self, q, target, key):
        out = self.fn(q, target, key)
        loss, aux = out if isinstance(out, tuple) else (out, None)
        if jnp.shape(loss) != ():
            raise ValueError(
                f"The objective function must return a scalar loss, got shape {jnp.shape(loss)}."
            )
        return loss, aux


def _terms(objective) -> tuple:
    return objective.terms if isinstance(objective, SumObjective) else (objective,)


def _weights(objective) -> tuple:
    return objective.weights if isinstance(objective, SumObjective) else (1.0,)


class SumObjective(Objective):
    """``sum_i weights[i] * terms[i]``: built by ``+`` and ``*`` on objectives.

    Each term draws with its own key (split from the step's key); ``aux`` is the tuple of the
    terms' auxiliary outputs.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> obj = veil.ELBO() + 0.5 * veil.IWAE(k=4)
        >>> obj.weights
        (1.0, 0.5)
    """

    terms: tuple
    weights: tuple = eqx.field(static=True)

    def __check_init__(self):
        if len(self.terms) != len(self.weights) or not self.terms:
            raise ValueError("SumObjective needs one weight per term and at least one term.")
        for t in self.terms:
            if not isinstance(t, Objective):
                raise TypeError(f"every term must be a veil objective, got {t!r}.")

    def check_family(self, q):
        for t in self.terms:
            t.check_family(q)

    def init_state(self, q):
        states = tuple(t.init_state(q) for t in self.terms)
        return None if all(s is None for s in states) else states

    def call_with_state(self, q, target, key, state):
        if state is None:
            return (*self(q, target, key), None)
        keys = jax.random.split(key, len(self.terms))
        outs = [t.call_with_state(q, target, k, s) for t, k, s in zip(self.terms, keys, state)]
        loss = sum(w * out[0] for w, out in zip(self.weights, outs))
        return loss, tuple(out[1] for out in outs), tuple(out[2] for out in outs)

    def __call__(self, q, target, key):
        keys = jax.random.split(key, len(self.terms))
        outs = [t(q, target, k) for t, k in zip(self.terms, keys)]
        loss = sum(w * out[0] for w, out in zip(self.weights, outs))
        return loss, tuple(out[1] for out in outs)


def _sample_reference(reference, key, n):
    if isinstance(reference, Family):
        return reference.sample(key, n)
    if isinstance(reference, jax.Array):  # fixed reference points
        return reference
    return reference.sample(key, (n,))  # a NumPyro distribution


class MMD(Objective):
    """Squared maximum mean discrepancy between ``q`` and a reference distribution.

    ``MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y)``, ``x, x' ~ q``, ``y, y' ~ reference``,
    estimated without bias from ``num_samples`` reparameterised draws of each (U-statistics).
    Zero exactly when the two distributions are equal (for a characteristic kernel such as the
    RBF). Used as a regulariser, as in InfoVAE and Wasserstein autoencoders:
    ``veil.ELBO() + 10.0 * veil.MMD(prior)`` pulls ``q`` (or, later, an aggregate posterior)
    toward ``prior``. It does not use the target.

    Args:
        reference: what ``q`` is compared with: a veil family, a NumPyro distribution with
            event shape ``(dim,)``, or an array ``[m, dim]`` of fixed points.
        kernel: a :mod:`veil.kernels` kernel; default :class:`~veil.kernels.RBF` with the
            median-heuristic bandwidth on the pooled draws of the step.
        num_samples: draws of ``q`` (and of the reference) per step, at least 2.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> ref = veil.MeanField(2, init_scale=1.0)
        >>> loss, aux = veil.MMD(ref, num_samples=64)(veil.MeanField(2), None, jax.random.key(0))
        >>> bool(loss > 0)
        True

    References:
        Gretton, Borgwardt, Rasch, Schölkopf & Smola (2012), A Kernel Two-Sample Test;
        Zhao, Song & Ermon (2019), InfoVAE: Information Maximizing Variational Autoencoders.
    """

    reference: object
    num_samples: int = eqx.field(static=True, default=64)
    kernel: Kernel = eqx.field(default=RBF(), kw_only=True)

    def __check_init__(self):
        _check_count("num_samples", self.num_samples, "veil.MMD(reference, 64, kernel=veil.kernels.RBF())")
        if self.num_samples < 2:
            raise ValueError("MMD needs num_samples >= 2 (the unbiased estimate pairs distinct draws).")
        if not isinstance(self.kernel, Kernel):
            raise TypeError(f"kernel must be a veil.kernels kernel such as RBF(), got {self.kernel!r}.")
        ok = isinstance(self.reference, (Family, jax.Array)) or hasattr(self.reference, "sample")
        if not ok:
            raise TypeError(
                "reference must be a veil family, a NumPyro distribution or an array of points, "
                f"got {type(self.reference).__name__}."
            )

    def check_family(self, q):
        if not q.reparameterized:
            raise ValueError(
                f"MMD differentiates through q's draws; {type(q).__name__} draws have no "
                "reparameterisation path."
            )

    def __call__(self, q, target, key):
        del target
        kq, kr = jax.random.split(key)
        x = q.sample(kq, self.num_samples)
        y = jax.lax.stop_gradient(_sample_reference(self.reference, kr, self.num_samples))
        if y.ndim != 2 or y.shape[1] != x.shape[1] or y.shape[0] < 2:
            raise ValueError(
                f"The reference gives points of shape {y.shape}; MMD needs [m >= 2, {x.shape[1]}]."
            )
        k = self.kernel.resolve(jax.lax.stop_gradient(jnp.concatenate([x, y])))
        n, m = x.shape[0], y.shape[0]
        kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
        mmd2 = (
            (jnp.sum(kxx) - jnp.trace(kxx)) / (n * (n - 1))
            + (jnp.sum(kyy) - jnp.trace(kyy)) / (m * (m - 1))
            - 2.0 * jnp.mean(kxy)
        )
        return mmd2, ObjectiveAux(jax.lax.stop_gradient(mmd2), jnp.zeros(0, x.dtype))


def is_plain_elbo(objective) -> bool:
    """Whether ``objective`` is the plain ELBO (no likelihood weight, no KL weight): the
    objective whose optimum variational Newton and the mean-drift check aim at."""
    return type(objective) is ELBO and objective.likelihood_weight == 1 and objective.beta == 1
