"""Normalizing flows as veil families, built on FlowJAX's bijections.

A :class:`Flow` is ``z = G(T(eps))``: standard-normal noise ``eps``, a bijection ``T`` (a stack
of flow layers) and a Gaussian family ``G`` (``MeanField`` or ``FullRank``) as the last, affine
layer. Its density is the change of variables

    log q(z) = log N(eps; 0, I) - log |det J_T(eps)| - log |det S_G|,

with ``S_G`` the Gaussian's scale. Why the Gaussian goes last (it is called the *base*
because the flow refines it): the layers then work on standardised values, where FlowJAX's
splines have their knots (``[-interval, interval]``) and where one initial scale suits every
target; the Gaussian carries the target's location and scale. Every layer starts at the
identity (FlowJAX's conditioner nets get a zero final layer; planar layers get the ``u`` that
FlowJAX's invertibility constraint maps to zero; radial layers start with ``beta = 0``), up to
FlowJAX's fixed permutations between layers, which map ``N(0, I)`` to itself; so a new flow
*is* its Gaussian as a distribution; hand it a fitted Gaussian
(``base=veil.fit(...).q`` or ``veil.pathfinder(...).q``) and the flow starts from that fit and
only has to learn what the Gaussian misses. Without a ``base``, a flow gets ``MeanField(dim)``
and ``veil.fit`` first fits that Gaussian alone (Gaussian defaults), then the flow over it:
over an unfitted base (sd 0.1 at the origin) coupling flows reached only KL 0.38 on Inference
Gym's banana and diverged on Minnesota radon, while over a fitted Gaussian they reached KL
0.01 and edged past FullRank (docs/benchmarks/normalizing-flows.md). A ``FullRank`` base fitted by you is
used as given::

    gauss = veil.fit(target, veil.FullRank(d), key=k1)
    res = veil.fit(target, veil.flows.coupling(d, key=k2, base=gauss.q), key=k3)

FlowJAX supplies the layers (affine coupling / RealNVP, masked and inverse autoregressive,
rational-quadratic splines, planar); radial flows (Rezende & Mohamed 2015), which FlowJAX
lacks, are written here as a FlowJAX bijection so they compose with its ``Chain``. Any FlowJAX
distribution can also be used directly as a family with :class:`FlowJAX`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import equinox as eqx
import flowjax.bijections as fjb
import flowjax.distributions as fjd
import flowjax.flows as fjf
import jax
import jax.numpy as jnp
import optax
import paramax
from jaxtyping import Array, PRNGKeyArray

from veil.diagnostics import StopRule
from veil.estimators import Reparam
from veil.family import Family, FitDefaults, MonteCarloMoments, Staged
from veil.objectives import ELBO
from veil.families.gaussian import FullRank, MeanField
from veil._checks import check_dim as _check_dim

__all__ = ["Flow", "FlowJAX", "Radial", "coupling", "autoregressive", "planar", "radial"]

# What veil.fit uses for flows and semi-implicit families (their "neural" defaults). On a 2-d
# banana (`python -m benchmarks.peers.flows --settings`, docs/benchmarks/normalizing-flows.md): with STL and Adam
# 0.05 a coupling flow ended at KL 6.5 and an autoregressive one diverged (STL also needs each
# draw's inverse: sequential for autoregressive layers, absent for tanh planar ones); with plain
# reparameterisation and 200-step windows the rule stopped (or hit the cap) at KL 0.12-0.59. 8
# draws, Adam 0.01 and 1000-step windows: KL 0.015 and 0.033. The drift limit stays at 2, where
# it was measured (3, the Gaussian default, was measured on full-data Gaussian fits only,
# section 33). One object: the compiled loop is keyed by the optimizer's identity.
NEURAL_DEFAULTS = FitDefaults(
    objective=ELBO(num_samples=8, estimator=Reparam()),
    optimizer=optax.adam(0.01),
    stop=StopRule(min_window=1000, max_drift=2.0),
)

_MOMENT_KEY = 20240229
_WATCH_POINTS = 64


def _std_normal_logpdf(eps):
    return -0.5 * jnp.sum(eps**2, axis=-1) - 0.5 * eps.shape[-1] * math.log(2 * math.pi)


class Flow(MonteCarloMoments, Staged):
    """Normalizing flow ``z = G(T(eps))``, ``eps ~ N(0, I)``: flow layers ``T`` (a FlowJAX
    bijection on ``R^dim``) followed by a Gaussian family ``G`` (see the module docstring).

    Build one with :func:`coupling`, :func:`autoregressive`, :func:`planar` or :func:`radial`,
    or pass any unconditional FlowJAX bijection of shape ``(dim,)``. Draws and their densities
    need only the forward pass; :meth:`log_prob` of a given ``z`` needs the inverse, which
    autoregressive layers in sampling order compute sequentially (``dim`` passes) and planar
    layers with ``tanh`` do not have (use ``negative_slope=``).

    Examples:
        >>> import jax, veil
        >>> q = veil.flows.coupling(2, key=jax.random.key(0), layers=2, width=8)
        >>> z, lq = q.sample_and_log_prob(jax.random.key(1), 3)
        >>> z.shape, lq.shape
        ((3, 2), (3,))
    """

    bijection: fjb.AbstractBijection
    base: Family
    dim: int = eqx.field(static=True)
    # True when the base is the default, unfitted MeanField: veil.fit then fits the base
    # alone first (see fit's docstring), because flows over an unfitted base failed (§8).
    fit_base_first: bool = eqx.field(static=True)

    def __init__(self, bijection: fjb.AbstractBijection, base: Family | None = None):
        if not isinstance(bijection, fjb.AbstractBijection):
            raise TypeError(f"bijection must be a FlowJAX bijection, got {type(bijection).__name__}.")
        if bijection.cond_shape is not None:
            raise ValueError("Conditional bijections are not families; pass an unconditional one.")
        if len(bijection.shape) != 1:
            raise ValueError(
                f"The bijection must act on vectors (shape (dim,)), got shape {bijection.shape}."
            )
        dim = bijection.shape[0]
        self.fit_base_first = base is None
        base = MeanField(dim) if base is None else base
        if not isinstance(base, (MeanField, FullRank)):
            raise TypeError(
                f"base must be a veil.MeanField or veil.FullRank (the flow's last, affine layer), "
                f"got {type(base).__name__}."
            )
        if base.dim != dim:
            raise ValueError(f"base has dim {base.dim} but the bijection acts on dim {dim}.")
        self.bijection = bijection
        self.base = base
        self.dim = dim

    def with_base(self, base: Family) -> "Flow":
        """The same layers over another base (``fit``'s second stage)."""
        return Flow(self.bijection, base)

    def fit_defaults(self, *, minibatched: bool) -> FitDefaults:
        del minibatched
        return NEURAL_DEFAULTS

    def _layers(self):
        return paramax.unwrap(self.bijection)

    def transform_and_log_prob(self, eps):
        u, log_det = jax.vmap(self._layers().transform_and_log_det)(eps)
        z, base_log_q = self.base.transform_and_log_prob(u)
        # base_log_q = log N(u) - log|S|; swap log N(u) for log N(eps) - log|det J_T|.
        return z, base_log_q - _std_normal_logpdf(u) + _std_normal_logpdf(eps) - log_det

    @property
    def noise_dim(self) -> int:
        return self.dim

    def sample_and_log_prob(self, key, n):
        return self.transform_and_log_prob(jax.random.normal(key, (n, self.dim)))

    def watched(self):
        """Where 64 fixed noise points land (``G(T(eps_i))``): the flow's weights are not
        identified, but its map from noise to draws settles when the fit does."""
        eps = jax.random.normal(jax.random.key(_MOMENT_KEY), (_WATCH_POINTS, self.dim))
        return self.transform_and_log_prob(eps)[0]

    def log_prob(self, z):
        flat = z.reshape(-1, self.dim)
        u = self.base.whiten(flat)
        eps, log_det_inv = jax.vmap(self._layers().inverse_and_log_det)(u)
        base_log_q = self.base.log_prob(flat)
        out = base_log_q - _std_normal_logpdf(u) + _std_normal_logpdf(eps) + log_det_inv
        return out.reshape(z.shape[:-1])


class FlowJAX(MonteCarloMoments, Family):
    """Any unconditional FlowJAX distribution on ``R^dim`` as a veil family.

    Its array leaves are the variational parameters (``paramax`` wrappers are unwrapped on
    use; ``NonTrainable`` leaves get zero gradients, so optax leaves them as they are).

    Examples:
        >>> import jax, flowjax.distributions as fjd, flowjax.flows as fjf, veil
        >>> d = fjf.masked_autoregressive_flow(
        ...     jax.random.key(0), base_dist=fjd.Normal(jax.numpy.zeros(2)), flow_layers=1, nn_width=4
        ... )
        >>> veil.FlowJAX(d).sample(jax.random.key(1), 5).shape
        (5, 2)
    """

    distribution: fjd.AbstractDistribution
    dim: int = eqx.field(static=True)

    def __init__(self, distribution: fjd.AbstractDistribution):
        if not isinstance(distribution, fjd.AbstractDistribution):
            raise TypeError(f"Expected a FlowJAX distribution, got {type(distribution).__name__}.")
        if distribution.cond_shape is not None or len(distribution.shape) != 1:
            raise ValueError(
                "Only unconditional FlowJAX distributions over vectors (shape (dim,)) are families; "
                f"got shape {distribution.shape} and condition shape {distribution.cond_shape}."
            )
        self.distribution = distribution
        self.dim = _check_dim(distribution.shape[0])

    def fit_defaults(self, *, minibatched: bool) -> FitDefaults:
        del minibatched
        return NEURAL_DEFAULTS

    def sample_and_log_prob(self, key, n):
        return paramax.unwrap(self.distribution).sample_and_log_prob(key, (n,))

    def log_prob(self, z):
        return paramax.unwrap(self.distribution).log_prob(z)


# ---------------------------------------------------------------------- radial layers
class Radial(fjb.AbstractBijection):
    """Radial flow layer (Rezende & Mohamed 2015, "Variational Inference with Normalizing
    Flows"), which FlowJAX lacks:

        f(x) = x + beta h(r) (x - x0),   r = |x - x0|,   h(r) = 1 / (alpha + r),

    ``alpha = softplus(a) > 0`` and ``beta = softplus(b) - alpha >= -alpha`` (the paper's
    condition for invertibility). ``log|det J| = (d - 1) log(1 + beta h) + log(1 + beta h +
    beta h'(r) r)``. The inverse is closed form: ``|f(x) - x0| = r (1 + beta / (alpha + r))``
    is a quadratic in ``r``. Starts at the identity (``beta = 0``).
    """

    shape: tuple[int, ...]
    cond_shape: ClassVar[None] = None
    center: Array
    raw_alpha: Array
    raw_beta: Array

    def __init__(self, dim: int, *, key: PRNGKeyArray | None = None, init_scale: float = 0.1):
        self.shape = (dim,)
        self.center = (
            jnp.zeros(dim) if key is None else init_scale * jax.random.normal(key, (dim,))
        )
        self.raw_alpha = jnp.asarray(0.0)
        self.raw_beta = jnp.asarray(0.0)  # softplus(b) = softplus(a): beta = 0

    def _alpha_beta(self):
        alpha = jax.nn.softplus(self.raw_alpha)
        return alpha, jax.nn.softplus(self.raw_beta) - alpha

    def transform_and_log_det(self, x, condition=None):
        alpha, beta = self._alpha_beta()
        diff = x - self.center
        r = jnp.sqrt(jnp.sum(diff**2))
        h = 1.0 / (alpha + r)
        y = x + beta * h * diff
        d = x.shape[-1]
        # 1 + beta h + beta h'(r) r = 1 + beta alpha / (alpha + r)^2
        log_det = (d - 1) * jnp.log1p(beta * h) + jnp.log1p(beta * alpha * h**2)
        return y, log_det

    def inverse_and_log_det(self, y, condition=None):
        alpha, beta = self._alpha_beta()
        diff_y = y - self.center
        ry = jnp.sqrt(jnp.sum(diff_y**2))
        # r^2 + (alpha + beta - ry) r - alpha ry = 0, positive root.
        b = alpha + beta - ry
        r = 0.5 * (-b + jnp.sqrt(b**2 + 4 * alpha * ry))
        x = self.center + diff_y / (1 + beta / (alpha + r))
        return x, -self.transform_and_log_det(x)[1]


# ---------------------------------------------------------------------- constructors
def _identity_start(bijection):
    """Zero the final layer of every conditioner MLP: FlowJAX's transformers are built so
    that zero conditioner output gives their initial (identity) parameters."""

    def zero_last(node):
        if not isinstance(node, eqx.nn.MLP):
            return node
        last = jax.tree.map(
            lambda x: jnp.zeros_like(x) if eqx.is_inexact_array(x) else x, node.layers[-1]
        )
        return eqx.tree_at(lambda m: m.layers[-1], node, last)

    return jax.tree.map(zero_last, bijection, is_leaf=lambda x: isinstance(x, eqx.nn.MLP))


# FlowJAX's Planar keeps u.w > -1 (invertibility) by using u_hat = u + (m(w.u) - w.u) w / |w|^2
# with m(a) = -1 + log(1 + softplus(a)); u_hat = 0 (the identity) when u = a0 w / |w|^2 with
# m(a0) = 0, i.e. softplus(a0) = e - 1. The tests check that a new planar flow is the identity.
_PLANAR_IDENTITY = math.log(math.expm1(math.e - 1))


def _planar_identity_start(bijection):
    def fix(node):
        if not isinstance(node, fjb.Planar) or node.params is None:
            return node
        dim = node.shape[0]
        # Unit-norm w (FlowJAX draws it ~0.01, where tanh(w.x) is linear over the whole
        # distribution and u must be ~1/|w| to act), then the u that makes u_hat = 0.
        w = node.params[..., :dim]
        w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
        u = _PLANAR_IDENTITY * w
        params = node.params.at[..., :dim].set(w).at[..., dim : 2 * dim].set(u)
        return eqx.tree_at(lambda b: b.params, node, params)

    return jax.tree.map(fix, bijection, is_leaf=lambda x: isinstance(x, fjb.Planar))


def _transformer(kind: str, knots: int, interval: float):
    if kind == "affine":
        return None  # FlowJAX's default: affine with a minimum scale
    if kind == "spline":
        return fjb.RationalQuadraticSpline(knots=knots, interval=interval)
    raise ValueError(f"transformer must be 'affine' or 'spline', got {kind!r}.")


def _check_layers(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _conditioner_flow(make, dim, key, base, layers, width, depth, transformer, knots, interval) -> Flow:
    """A FlowJAX flow whose layers are parameterised by conditioner networks (``make`` is
    ``coupling_flow`` or ``masked_autoregressive_flow``), in the sampling direction
    (``invert=False``: draws and their densities in one pass), started at the identity."""
    flow = make(
        key, base_dist=fjd.StandardNormal((_check_dim(dim),)),
        transformer=_transformer(transformer, knots, interval),
        flow_layers=_check_layers("layers", layers), nn_width=_check_layers("width", width),
        nn_depth=_check_layers("depth", depth), invert=False,
    )  # fmt: skip
    return Flow(_identity_start(flow.bijection), base)


def coupling(
    dim: int,
    *,
    key: PRNGKeyArray,
    base: Family | None = None,
    layers: int = 8,
    width: int = 50,
    depth: int = 1,
    transformer: str = "affine",
    knots: int = 8,
    interval: float = 4.0,
) -> Flow:
    """Coupling flow: affine coupling layers (RealNVP, Dinh et al. 2017) or, with
    ``transformer="spline"``, rational-quadratic spline coupling (Durkan et al. 2019), with
    permutations between layers. Density and sampling are both one pass.

    Args:
        dim: dimension (``>= 2``; a coupling layer splits the vector in two).
        key: PRNG key for the conditioner networks and permutations.
        base: the Gaussian last layer (default ``MeanField(dim)``).
        layers, width, depth: coupling layers, conditioner width and hidden layers.
        transformer: ``"affine"`` or ``"spline"``; ``knots`` and ``interval`` for splines
            (identity outside ``[-interval, interval]``, in standardised units).
    """
    if _check_dim(dim) < 2:
        raise ValueError("A coupling flow needs dim >= 2; use autoregressive, planar or radial.")
    return _conditioner_flow(
        fjf.coupling_flow, dim, key, base, layers, width, depth, transformer, knots, interval
    )


def autoregressive(
    dim: int,
    *,
    key: PRNGKeyArray,
    base: Family | None = None,
    layers: int = 8,
    width: int = 50,
    depth: int = 1,
    transformer: str = "affine",
    knots: int = 8,
    interval: float = 4.0,
) -> Flow:
    """Inverse autoregressive flow (Kingma et al. 2016): masked autoregressive layers
    (Papamakarios et al. 2017) in the direction that samples in one pass, which is what
    VI needs (draws and their densities); ``log_prob`` of other points inverts them
    sequentially. Affine or rational-quadratic spline transformers.

    Arguments as :func:`coupling`.
    """
    return _conditioner_flow(
        fjf.masked_autoregressive_flow, dim, key, base, layers, width, depth, transformer, knots, interval
    )


def planar(
    dim: int,
    *,
    key: PRNGKeyArray,
    base: Family | None = None,
    layers: int = 8,
    negative_slope: float | None = None,
) -> Flow:
    """Planar flow (Rezende & Mohamed 2015): ``layers`` of ``x + u tanh(w.x + b)``
    (FlowJAX's ``Planar``, with the paper's constraint on ``u``). With ``negative_slope`` the
    activation is a leaky ReLU and the layers have a closed-form inverse (so ``log_prob``
    works on any point); with ``tanh`` only draws and their densities are available."""
    dim = _check_dim(dim)
    flow = fjf.planar_flow(
        key, base_dist=fjd.StandardNormal((dim,)), flow_layers=_check_layers("layers", layers),
        invert=False, negative_slope=negative_slope,
    )  # fmt: skip
    return Flow(_planar_identity_start(flow.bijection), base)


def radial(dim: int, *, key: PRNGKeyArray, base: Family | None = None, layers: int = 8) -> Flow:
    """Radial flow (Rezende & Mohamed 2015): ``layers`` of :class:`Radial` with centres
    drawn around the origin (of the standardised space)."""
    dim = _check_dim(dim)
    keys = jax.random.split(key, _check_layers("layers", layers))
    return Flow(fjb.Chain([Radial(dim, key=k) for k in keys]), base)
