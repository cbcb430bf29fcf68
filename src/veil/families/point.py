"""``Delta``: a point estimate, and ``MAP``: the objective that fits it (maximum a posteriori,
or maximum likelihood under a flat prior).

A point mass has no spread, so its "ELBO" is the log density at the point (the entropy of a
point mass is a constant, dropped): fitting it is optimisation, not inference. It is the
cheapest baseline there is, the one PyMC users reach for as ``pm.find_MAP``, NumPyro users as
``AutoDelta`` and Stan users as ``optimize``, and veil's result for it says plainly that it
carries no uncertainty.

Where the point is measured matters. The classical MAP maximises the posterior density of the
constrained values, ``log p(x, theta)``: that is what ``find_MAP``, ``AutoDelta`` and Stan's
``optimize`` (``jacobian=False``, its default) return, and ``veil.MAP()``'s default. The mode of
the density veil fits, on the unconstrained space, includes the change-of-variables term
``log |det J|``: ``veil.MAP(jacobian=True)``, the same as ``veil.ELBO()`` with a ``Delta``. It
differs where a transform bends space: for a scale ``sigma = exp(u)`` the classical MAP can sit
at ``sigma -> 0`` (a hierarchical model's funnel), the unconstrained mode never does.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from veil._checks import check_dim
from veil.family import Family, FitDefaults
from veil.objectives import Objective, ObjectiveAux

__all__ = ["Delta", "MAP"]


class Delta(Family):
    """``q(z) = delta(z - loc)``: a point estimate at ``loc`` (unconstrained space).

    Every draw is ``loc``, and ``log q`` is 0 there (``-inf`` elsewhere). ``veil.fit`` fits it
    with :class:`MAP` by default: the classical maximum a posteriori point, or maximum
    likelihood for a model with a flat prior (a ``from_logdensity`` log likelihood). The result
    has no k-hat (a point mass has no density to weigh the target against); its verdict says
    the fit is a point estimate and whether the optimiser converged.

    Args:
        dim: dimension of the unconstrained space.
        loc: the starting point (default zeros).

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum((z - 2.0) ** 2), dim=2)
        >>> res = veil.fit(t, veil.Delta(2), key=jax.random.key(0), progress=False)
        >>> bool(jnp.allclose(res.q.loc, 2.0, atol=1e-2))
        True
    """

    loc: Float[Array, " dim"]
    dim: int = eqx.field(static=True)

    def __init__(self, dim: int, loc=None):
        self.dim = check_dim(dim)
        if loc is None:
            loc = jnp.zeros(self.dim)
        loc = jnp.asarray(loc, dtype=jnp.result_type(float))
        if loc.shape != (self.dim,):
            raise ValueError(f"loc must have shape ({self.dim},), got {loc.shape}.")
        self.loc = loc

    def fit_defaults(self, *, minibatched: bool) -> FitDefaults:
        del minibatched
        return FitDefaults(objective=_DEFAULT_MAP)

    def location_field(self):
        return lambda m: m.loc

    def sample_and_log_prob(self, key: PRNGKeyArray, n: int):
        del key
        return jnp.broadcast_to(self.loc, (n, self.dim)), jnp.zeros(n, self.loc.dtype)

    def log_prob(self, z):
        # A point mass: log q is 0 at the point and -inf elsewhere (NumPyro's Delta does the
        # same); the estimators only ever ask at the point.
        at = jnp.all(z == jax.lax.stop_gradient(self.loc), axis=-1)
        return jnp.where(at, 0.0, -jnp.inf)

    @property
    def mean(self):
        return self.loc

    @property
    def cov(self):
        return jnp.zeros((self.dim, self.dim), self.loc.dtype)


class MAP(Objective):
    """The negative log density at a :class:`Delta`'s point: maximum a posteriori.

    ``jacobian=False`` (the default): ``log p(x, theta)`` at the constrained values, without
    the change-of-variables term: the classical MAP of ``pm.find_MAP``, NumPyro's
    ``AutoDelta`` and Stan's ``optimize``. ``jacobian=True``: the mode of the density on the
    unconstrained space veil fits (the term included), which is where a Laplace approximation
    on that space is centred. A target without transforms (``from_logdensity``) has no such
    term, and both agree. ``jacobian=False`` needs a target that knows its transforms: a NumPyro
    or PyMC model, or a plain log density.

    Examples:
        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, veil
        >>> def model():
        ...     s = numpyro.sample("s", dist.Gamma(3.0, 2.0))
        >>> t = veil.Target.from_numpyro(model)
        >>> res = veil.fit(t, veil.Delta(1), key=jax.random.key(0), progress=False)
        >>> round(float(res.draws(1, key=jax.random.key(1))["s"][0]), 2)  # the Gamma's mode (3-1)/2
        1.0
    """

    jacobian: bool = eqx.field(static=True, default=False)

    def check_family(self, q: Family) -> None:
        if not isinstance(q, Delta):
            raise TypeError(
                f"veil.MAP() fits a point estimate (veil.Delta), not {type(q).__name__}: for a "
                "distribution use veil.ELBO(), for a Gaussian at the mode veil.laplace(target, key=...)."
            )

    def __call__(self, q, target, key):
        del key
        if self.jacobian:
            log_p = target.log_density(q.loc)
        else:
            log_joint = getattr(target, "log_joint", None)
            if log_joint is None:  # a plain function: no transforms, nothing to leave out
                log_joint = target
            log_p = log_joint(q.loc)
        return -log_p, ObjectiveAux(log_p, log_p[None])


_DEFAULT_MAP = MAP()
