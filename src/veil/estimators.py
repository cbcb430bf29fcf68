"""Gradient estimators: where gradients flow when a Monte-Carlo objective is differentiated.

Most objectives are a *reduction* ``f`` of the importance log weights of ``n`` draws,
``log w_i = log p(z_i) - log q(z_i)``, ``z_i ~ q``: the mean for the ELBO, the log-mean-exp for
the importance-weighted bound, and so on. An estimator turns ``(f, q, log p, key, n)`` into a
scalar whose *value* is ``f(log w)`` and whose *gradient* with respect to the family's
parameters is the estimator's estimate of ``grad E[f(log w)]``:

* :class:`Reparam` differentiates ``f(log w)`` through the draws, ``z = T_phi(eps)``;
* :class:`STL` drops the score term of each draw (unbiased only when ``f`` is linear: the ELBO);
* :class:`DReG` turns the score term into a second path-wise term, for any smooth ``f``;
* :class:`ScoreFunction` never differentiates through ``z`` (any family that can evaluate its
  log density), with a leave-one-out baseline.

The gradients an estimator builds are program transformations of ``f``, so a new objective
written as a reduction gets every estimator for free (see ``examples/``).
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from veil.family import Components, Family, RejectionSampled, stop_gradient

__all__ = [
    "Estimator",
    "Reparam",
    "STL",
    "DReG",
    "ScoreFunction",
    "Stratified",
    "Unscented",
    "RSVI",
    "Noise",
    "IID",
    "MovingAverage",
    "Sobol",
    "Draws",
    "Reduction",
]

# A reduction of the log weights of n draws to the scalar an objective maximises.
Reduction = Callable[[Float[Array, " n"]], Float[Array, ""]]


class Draws(NamedTuple):
    """Draws and their log densities (values only; no gradient flows through them)."""

    z: Float[Array, "n dim"]
    log_p: Float[Array, " n"]
    log_q: Float[Array, " n"]

    @property
    def log_weights(self) -> Float[Array, " n"]:
        """``log p(z) - log q(z)``: importance log weights of ``q`` against the target."""
        return self.log_p - self.log_q


def _values(z, log_p, log_q) -> Draws:
    return Draws(*(jax.lax.stop_gradient(x) for x in (z, log_p, log_q)))


def _grad_and_diag_hessian(f: Reduction, x: Float[Array, " n"]):
    """``f'(x)`` and the diagonal of ``f''(x)`` (``n`` forward-over-reverse products; ``n`` is
    the number of draws per step, small)."""
    g = jax.grad(f)
    h = jax.vmap(lambda e: jnp.vdot(e, jax.jvp(g, (x,), (e,))[1]))(jnp.eye(x.shape[0], dtype=x.dtype))
    return g(x), h


# ----------------------------------------------------------------------------- base noise
class Noise(eqx.Module):
    """Where the standard-normal base noise of path-wise estimators comes from."""

    @abc.abstractmethod
    def normal(self, key: PRNGKeyArray, n: int, dim: int) -> Float[Array, "n dim"]:
        """``n`` points whose every row is marginally ``N(0, I_dim)``."""


class IID(Noise):
    """Independent standard-normal draws (the default)."""

    def normal(self, key, n, dim):
        return jax.random.normal(key, (n, dim))


@functools.lru_cache(maxsize=64)
def _sobol_bits(n: int, dim: int) -> np.ndarray:
    """The first ``n`` points of the unscrambled Sobol sequence in ``dim`` dimensions, as
    32-bit integers (``point * 2^32``), from SciPy's generator (Joe-Kuo direction numbers)."""
    from scipy.stats import qmc  # imported here: scipy.stats costs ~0.3 s of `import veil`

    u = qmc.Sobol(dim, scramble=False).random(n)
    return np.asarray(np.floor(u * 2.0**32), dtype=np.uint32)


class Sobol(Noise):
    """Randomised quasi-Monte Carlo: a Sobol point set with a random digital shift.

    The ``n`` points (``n`` a power of two) of a Sobol net in ``dim`` dimensions are XOR-ed
    with one random 32-bit integer per dimension (a fresh one per step), then mapped through the
    normal quantile. The shift leaves the net's even spread intact and makes every point
    marginally uniform, so a mean over the points is unbiased and, for smooth integrands, has
    variance falling faster than ``1/n``. For the ELBO the estimate stays unbiased; for IWAE or
    Rényi the points are not independent, so the objective is the bound's value for
    stratified rather than i.i.d. draws (still a lower bound on ``log Z``).

    References:
        Buchholz, Wenzel & Mandt (2018), Quasi-Monte Carlo Variational Inference;
        Owen (2023), Practical Quasi-Monte Carlo Integration.
    """

    def normal(self, key, n, dim):
        if n & (n - 1):
            raise ValueError(
                f"Sobol points need a power-of-two count of draws per step, got {n}; use e.g. "
                f"{1 << max(n - 1, 1).bit_length()}."
            )
        bits = jnp.asarray(_sobol_bits(n, dim))
        shift = jax.random.bits(key, (dim,), jnp.uint32)
        # The top 24 bits fit a float32 exactly, so u stays strictly inside (0, 1).
        u = (((bits ^ shift) >> 8).astype(jnp.float32) + 0.5) / 2.0**24
        return jax.scipy.special.ndtri(u)


def _path_draws(noise: Noise, q: Family, key, n: int):
    """Draws ``z`` (differentiable in ``q``) and ``log q(z)`` from ``noise``."""
    if isinstance(noise, IID):
        return q.sample_and_log_prob(key, n)
    return q.transform_and_log_prob(noise.normal(key, n, q.noise_dim))


def _stopped_path_draws(noise: Noise, q: Family, log_density: Callable, key, n: int):
    """Draws ``z`` that carry the path gradient, ``log p(z)`` and ``log q(z)`` at stopped
    parameters (the STL / DReG form: no score term)."""
    if isinstance(noise, IID):
        z, log_q = q.sample_with_stopped_log_prob(key, n)
    else:
        z, log_q = q.transform_with_stopped_log_prob(noise.normal(key, n, q.noise_dim))
    return z, jax.vmap(log_density)(z), log_q


class Estimator(eqx.Module):
    """Abstract gradient estimator; concrete ones are small immutable values."""

    @abc.abstractmethod
    def estimate(
        self, f: Reduction, q: Family, log_density: Callable, key: PRNGKeyArray, n: int
    ) -> tuple[Float[Array, ""], Draws]:
        """``f(log w)`` of ``n`` draws, with this estimator's gradient, and the draws."""

    def check(self, objective: str, linear: bool) -> None:
        """Raise if this estimator is wrong for an objective (``linear``: ``f`` is linear in
        the log weights). Called when the objective is built, before any computation."""

    def check_family(self, q: Family) -> None:
        """Raise if this estimator cannot differentiate through ``q``'s draws. Called by
        ``veil.fit`` before any computation."""

    def init_state(self):
        """State carried between optimisation steps (``None``: stateless)."""
        return None

    def estimate_with_state(self, f, q, log_density, key, n, state):
        """:meth:`estimate` for a stateful estimator: ``(value, draws, new_state)``."""
        value, draws = self.estimate(f, q, log_density, key, n)
        return value, draws, state


def _require_path(estimator, q) -> None:
    if not q.reparameterized:
        hint = q.suggested_estimator
        raise ValueError(
            f"{type(estimator).__name__}() differentiates through the draws, but "
            f"{type(q).__name__} draws have no reparameterisation path. Use "
            f"{hint} (what veil.fit uses by default for such a family)."
        )


class Reparam(Estimator):
    """The reparameterisation ("path-wise") estimator.

    ``z = T_phi(eps)`` and ``log q_phi(z)`` both depend on ``phi``, so the gradient of
    ``E[f(log p(z) - log q_phi(z))]`` includes the score terms ``grad_phi log q_phi(z_i)``,
    zero in expectation but not per draw.

    References:
        Kingma & Welling (2014), Auto-Encoding Variational Bayes;
        Rezende, Mohamed & Wierstra (2014), Stochastic Backpropagation and Approximate
        Inference in Deep Generative Models.
    """

    noise: Noise = IID()

    def check_family(self, q):
        _require_path(self, q)

    def estimate(self, f, q, log_density, key, n):
        z, log_q = _path_draws(self.noise, q, key, n)
        log_p = jax.vmap(log_density)(z)
        return f(log_p - log_q), _values(z, log_p, log_q)


class STL(Estimator):
    """Sticking the landing: the path-wise gradient without the score term.

    ``log q`` is evaluated with stopped parameters, ``log q_{stop(phi)}(T_phi(eps))``, which
    removes the zero-mean score term ``grad_phi log q_phi(z)`` from each draw's gradient. For
    the ELBO the estimator stays unbiased, and when ``q`` equals the target its variance is
    exactly zero, because ``log p(z) - log q(z)`` is then constant in ``z``. For a reduction
    that is not linear in the log weights (IWAE, Rényi) the dropped term no longer has mean
    zero: use :class:`DReG` there, which is STL's unbiased generalisation.

    References:
        Roeder, Wu & Duvenaud (2017), Sticking the Landing: Simple, Lower-Variance Gradient
        Estimators for Variational Inference.
    """

    def check(self, objective, linear):
        if not linear:
            raise ValueError(
                f"veil.STL() is unbiased only for objectives linear in the log weights (the "
                f"ELBO); for {objective} it would be biased. Use veil.DReG() (its unbiased "
                "generalisation) or veil.Reparam()."
            )

    noise: Noise = IID()

    def check_family(self, q):
        _require_path(self, q)

    def estimate(self, f, q, log_density, key, n):
        z, log_p, log_q = _stopped_path_draws(self.noise, q, log_density, key, n)
        return f(log_p - log_q), _values(z, log_p, log_q)


class DReG(Estimator):
    """Doubly reparameterised gradients, for any smooth reduction ``f`` of the log weights.

    The score term of draw ``i``, ``-E[df/dlog w_i * grad_phi log q_phi(z_i)]``, is rewritten
    with the reparameterisation identity ``E_q[g(z) grad log q(z)] = E[grad_z g(z) dz/dphi]``
    (with ``g = df/dlog w_i``, a function of ``z_i`` through ``log w_i``). The gradient becomes
    purely path-wise,

        sum_i (df/dlog w_i - d^2f/dlog w_i^2) * d log w_i / dz_i * dz_i / dphi,

    with ``log w_i`` evaluated at stopped parameters as in STL. For the ELBO (``f`` the mean) the
    second derivative vanishes and DReG *is* STL; for IWAE (``f`` the log-mean-exp of ``k``
    weights) the coefficient is ``w~_i^2`` (normalised weights squared), the estimator of Tucker
    et al., whose signal-to-noise ratio grows with ``k`` where the plain estimator's decays.
    The derivatives of ``f`` are taken by JAX from the reduction itself, so any objective
    written as a reduction gets its doubly reparameterised estimator without new code.

    References:
        Tucker, Lawson, Gu & Maddison (2019), Doubly Reparameterized Gradient Estimators for
        Monte Carlo Objectives.
    """

    noise: Noise = IID()

    def check_family(self, q):
        _require_path(self, q)

    def estimate(self, f, q, log_density, key, n):
        z, log_p, log_q = _stopped_path_draws(self.noise, q, log_density, key, n)
        path = log_p - log_q  # gradients flow along the draws only
        lw = jax.lax.stop_gradient(path)
        g, h = _grad_and_diag_hessian(f, lw)
        coef = jax.lax.stop_gradient(g - h)
        return f(lw) + jnp.sum(coef * (path - lw)), _values(z, log_p, log_q)


class MovingAverage(eqx.Module):
    """A baseline for :class:`ScoreFunction`: the exponential moving average of the
    objective's past values, ``b_t = (1 - decay) sum_{s<t} decay^(t-1-s) f_s`` (bias-corrected
    for its zero start). It depends only on earlier steps' draws, so it keeps the estimator
    unbiased, and it works with a single draw per step (where leave-one-out cannot). It is
    state that ``veil.fit`` carries between steps.

    References:
        Williams (1992); Ranganath, Gerrish & Blei (2014), Black Box Variational Inference.
    """

    decay: float = eqx.field(static=True, default=0.9)

    def __check_init__(self):
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not (
            0 <= self.decay < 1
        ):
            raise ValueError(f"decay must lie in [0, 1), got {self.decay!r}.")


class Stratified(Estimator):
    """Stratified estimator for a :class:`veil.Mixture`: ``num_samples`` draws from *every*
    component, each component's average weighted by its mixture weight,

        sum_k w_k f(log w_k1, ..., log w_kn),   z_ki = T_k(eps_i) ~ q_k,

    with ``log w = log p(z) - log q(z)`` under the whole mixture ``q``. For the ELBO this is
    ``sum_k w_k E_{q_k}[log p - log q]``, the ELBO itself (an identity), so the estimator is
    unbiased; gradients reach the weights through ``w_k`` and the components through their own
    reparameterised draws, with no score function (Morningstar et al. 2021, "Automatic
    Differentiation Variational Inference with Mixtures"). ``inner`` says how a component's
    draws are differentiated: :class:`STL` (default; ``log q`` at stopped parameters, unbiased
    because ``E_q[grad log q] = 0`` for the mixture's parameters, weights included) or
    :class:`Reparam`. Only for objectives linear in the log weights (the ELBO); a step costs
    ``K`` times ``num_samples`` draws.
    """

    inner: Estimator = STL()

    def __check_init__(self):
        if not isinstance(self.inner, (STL, Reparam)) or not isinstance(self.inner.noise, IID):
            raise ValueError("Stratified(inner=...) takes veil.STL() or veil.Reparam() with i.i.d. noise.")

    def check(self, objective, linear):
        if not linear:
            raise ValueError(
                f"veil.Stratified() weights per-component averages, which equals the bound only "
                f"for objectives linear in the log weights (the ELBO), not {objective}."
            )

    def check_family(self, q):

        if not isinstance(q, Components):
            raise ValueError(f"veil.Stratified() needs a veil.Mixture, got {type(q).__name__}.")
        _require_path(self, q.components)

    def estimate(self, f, q, log_density, key, n):
        z = q.component_draws(key, n)  # [k, n, dim]
        flat = z.reshape(-1, q.dim)
        log_p = jax.vmap(log_density)(flat)
        log_q = (stop_gradient(q) if isinstance(self.inner, STL) else q).log_prob(flat)
        per_component = jax.vmap(f)((log_p - log_q).reshape(q.k, n))
        return jnp.dot(q.weights, per_component), _values(flat, log_p, log_q)


class ScoreFunction(Estimator):
    """The score-function (REINFORCE, likelihood-ratio) estimator, with a leave-one-out baseline.

    The draws are not differentiated (``z`` is stopped), so it works for any family that can
    evaluate ``log q`` — discrete or not reparameterisable. For ``n`` draws with reduction ``f``,

        grad E[f] = E[grad_phi f(log w) |_z  +  sum_i (f - b_i) grad_phi log q_phi(z_i)],

    where ``b_i`` does not depend on ``z_i``, so it leaves the estimate unbiased while removing
    most of its variance. With ``baseline="loo"`` (default, needs ``n >= 2``) ``b_i`` is ``f``
    with ``log w_i`` replaced by the mean of the other draws' log weights (the multi-sample
    baseline of VIMCO); ``baseline=MovingAverage(decay)`` uses the moving average of past
    steps' values (one draw per step suffices; state carried by ``veil.fit``);
    ``baseline=None`` uses none. Expect far more variance than the
    path-wise estimators: use it when they do not apply.

    References:
        Williams (1992), Simple Statistical Gradient-Following Algorithms for Connectionist
        Reinforcement Learning; Ranganath, Gerrish & Blei (2014), Black Box Variational
        Inference; Mnih & Rezende (2016), Variational Inference for Monte Carlo Objectives.
    """

    baseline: str | MovingAverage | None = eqx.field(static=True, default="loo")

    def __check_init__(self):
        if self.baseline not in ("loo", None) and not isinstance(self.baseline, MovingAverage):
            raise ValueError(
                f"baseline must be 'loo', veil.MovingAverage(decay) or None, got {self.baseline!r}."
            )

    def init_state(self):
        if isinstance(self.baseline, MovingAverage):
            return (jnp.zeros(()), jnp.zeros(()))  # moving average, weight of its history
        return None

    def estimate_with_state(self, f, q, log_density, key, n, state):
        if not isinstance(self.baseline, MovingAverage):
            return (*self.estimate(f, q, log_density, key, n), state)
        ema, weight = state
        b = jnp.where(weight > 0, ema / jnp.maximum(weight, 1e-12), 0.0)
        value, draws = self._estimate(f, q, log_density, key, n, lambda lw, value: b)
        d = self.baseline.decay
        new_state = (d * ema + (1 - d) * value, d * weight + (1 - d))
        return value, draws, jax.tree.map(jax.lax.stop_gradient, new_state)

    def estimate(self, f, q, log_density, key, n):
        if isinstance(self.baseline, MovingAverage):
            raise ValueError(
                "ScoreFunction(baseline=MovingAverage(...)) keeps state between steps, which only "
                "veil.fit carries; to evaluate one gradient alone use baseline='loo' or None."
            )
        if self.baseline == "loo":
            return self._estimate(f, q, log_density, key, n, lambda lw, value: _loo_baselines(f, lw))
        return self._estimate(f, q, log_density, key, n, lambda lw, value: jnp.zeros_like(lw))

    def _estimate(self, f, q, log_density, key, n, baseline_fn):
        if self.baseline == "loo" and n < 2:
            raise ValueError(
                "ScoreFunction(baseline='loo') needs at least 2 draws per step (num_samples or "
                "k >= 2); use more draws or baseline=None."
            )
        z = jax.lax.stop_gradient(q.sample(key, n))
        log_q = q.log_prob(z)  # gradients flow through the parameters only
        log_p = jax.vmap(log_density)(z)
        lw_path = log_p - log_q
        lw = jax.lax.stop_gradient(lw_path)
        value = f(lw)
        signal = jax.lax.stop_gradient(value - baseline_fn(lw, value))
        surrogate = f(lw_path) + jnp.sum(signal * log_q)
        return value + (surrogate - jax.lax.stop_gradient(surrogate)), _values(z, log_p, log_q)


class Unscented(Estimator):
    """Deterministic sigma points in place of random draws, for the ELBO of Gaussian families.

    With noise dimension ``m`` (the family's :attr:`noise_dim`), the ``2m + 1`` sigma points
    are ``eps = 0`` (weight ``kappa / (m + kappa)``) and ``eps = +-sqrt(m + kappa) e_j``
    (weight ``1 / (2 (m + kappa))`` each), mapped through the family's transform: they match
    ``q``'s mean and covariance exactly, and the weighted mean of ``log w`` over them is exact
    whenever ``log w`` is quadratic in ``z`` (a Gaussian target). Otherwise it is a
    deterministic, biased approximation with zero gradient variance: good for smooth,
    near-Gaussian targets, wrong for heavy tails or multimodality. ``num_samples`` of the
    objective is ignored; gradients flow path-wise with ``log q`` at stopped parameters (as in
    STL). The ELBO only: other reductions are not expectations of one draw.

    References:
        Julier & Uhlmann (1997), A New Extension of the Kalman Filter to Nonlinear Systems;
        Janjoš, Rosenbaum, Dolgov & Zöllner (2023), Unscented Autoencoder.
    """

    kappa: float | int = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        if isinstance(self.kappa, bool) or not isinstance(self.kappa, (int, float)) or not (
            math.isfinite(self.kappa) and self.kappa >= 0
        ):
            raise ValueError(f"kappa must be a finite number >= 0, got {self.kappa!r}.")

    def check(self, objective, linear):
        if not linear:
            raise ValueError(
                f"veil.Unscented() replaces an expectation by a weighted sum over sigma points, "
                f"which only the ELBO is; {objective} needs random draws (veil.DReG(), "
                "veil.Reparam(), or veil.Sobol() noise for quasi-Monte Carlo)."
            )

    def check_family(self, q):
        _require_path(self, q)

    def estimate(self, f, q, log_density, key, n):
        del f, key, n  # linear reduction (checked): replaced by the sigma-point weighted mean
        m = q.noise_dim
        c = math.sqrt(m + self.kappa)
        eye = jnp.eye(m)
        eps = jnp.concatenate([jnp.zeros((1, m)), c * eye, -c * eye])
        w = jnp.concatenate(
            [jnp.full(1, self.kappa / (m + self.kappa)), jnp.full(2 * m, 0.5 / (m + self.kappa))]
        )
        z, log_q = q.transform_with_stopped_log_prob(eps)
        log_p = jax.vmap(log_density)(z)
        return jnp.sum(w * (log_p - log_q)), _values(z, log_p, log_q)


def _loo_baselines(f, lw):
    """``b_i = f(log w with entry i replaced by the mean of the others)``: independent of
    draw ``i``, so ``sum_i (f - b_i) grad log density_i`` keeps a score term unbiased."""
    n = lw.shape[0]
    others = (jnp.sum(lw) - lw) / (n - 1)
    return jax.vmap(lambda i: f(lw.at[i].set(others[i])))(jnp.arange(n))


class RSVI(Estimator):
    """Reparameterisation through acceptance-rejection samplers (:class:`veil.Gamma`,
    :class:`veil.Beta`, :class:`veil.Dirichlet`, and :class:`veil.Composite` blocks of them).

    A rejection sampler draws proposal noise ``eps`` and keeps it with a probability that
    depends on the parameters; the kept ``eps`` has density ``pi(eps; theta)``, and
    ``z = h(eps, theta)``. Then

        grad E[f] = E_pi[grad_theta f(h(eps, theta))]  +  E_pi[f * grad_theta log pi(eps; theta)],

    a path-wise term and a score-like correction. For the Marsaglia-Tsang Gamma sampler with
    shape augmentation the correction is small and shrinks with the boost ``B``. The
    correction uses the leave-one-out baseline over the step's draws (``n >= 2``).

    Args:
        boost: shape augmentation ``B`` (Naesseth et al. use small integers; larger ``B``
            lowers the correction's variance at the cost of ``B`` uniforms per draw).
            ``B = 0`` is valid only while every shape stays >= 1.

    References:
        Naesseth, Ruiz, Linderman & Blei (2017), Reparameterization Gradients through
        Acceptance-Rejection Sampling Algorithms.
    """

    boost: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        if isinstance(self.boost, bool) or not isinstance(self.boost, int) or self.boost < 0:
            raise ValueError(f"boost must be an integer >= 0, got {self.boost!r}.")

    def check_family(self, q):
        _require_path(self, q)

    def estimate(self, f, q, log_density, key, n):
        if not isinstance(q, RejectionSampled):
            raise ValueError(
                f"veil.RSVI() needs a family drawn by acceptance-rejection (veil.Gamma, Beta, Dirichlet); "
                f"{type(q).__name__} is reparameterised directly: use veil.STL() or veil.Reparam()."
            )
        if n < 2:
            raise ValueError("veil.RSVI() needs at least 2 draws per step (its baseline).")
        z, log_pi = q.rsvi_draws(key, n, self.boost)
        log_q = q.log_prob(z)
        log_p = jax.vmap(log_density)(z)
        lw_path = log_p - log_q
        lw = jax.lax.stop_gradient(lw_path)
        value = f(lw)
        signal = jax.lax.stop_gradient(value - _loo_baselines(f, lw))
        surrogate = f(lw_path) + jnp.sum(signal * log_pi)
        return value + (surrogate - jax.lax.stop_gradient(surrogate)), _values(z, log_p, log_q)
