"""Positive-definite kernels on R^d, as small immutable values.

A kernel is called on two batches of points, ``kernel(x, y) -> K`` with ``x: [n, d]``,
``y: [m, d]`` and ``K: [n, m]``. Used by :class:`veil.MMD` (and by particle methods later).
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from veil._checks import check_positive

__all__ = ["Kernel", "RBF", "IMQ", "median_bandwidth"]


def _sq_dists(x, y):
    # |x|^2 + |y|^2 - 2 x.y, clipped at 0 against round-off: one matrix product, no [n, m, d]
    # intermediate.
    d2 = jnp.sum(x**2, -1)[:, None] + jnp.sum(y**2, -1)[None, :] - 2.0 * x @ y.T
    return jnp.maximum(d2, 0.0)


def median_bandwidth(x: Float[Array, "n d"], y: Float[Array, "m d"]) -> Float[Array, ""]:
    """The median heuristic: ``h`` with ``h^2`` the median squared distance between the points
    of ``x`` and ``y`` (stopped: the bandwidth is a choice, not a parameter to differentiate)."""
    return jax.lax.stop_gradient(jnp.sqrt(jnp.median(_sq_dists(x, y)) + 1e-12))


def _check_positive(name, value):
    if isinstance(value, jax.Array):  # resolved from data (the median heuristic)
        return
    check_positive(name, value, allow_none=True)


class Kernel(eqx.Module):
    """Abstract kernel ``k(x, y)`` evaluated on all pairs of two batches."""

    @abc.abstractmethod
    def __call__(self, x: Float[Array, "n d"], y: Float[Array, "m d"]) -> Float[Array, "n m"]:
        """The ``[n, m]`` matrix ``k(x_i, y_j)``."""

    def resolve(self, points: Float[Array, "n d"]) -> "Kernel":
        """The kernel with any data-dependent scale fixed from ``points`` (the median
        heuristic), so that several evaluations share one kernel."""
        return self


class RBF(Kernel):
    """Gaussian kernel ``exp(-|x - y|^2 / (2 h^2))``; ``bandwidth=None`` uses the median
    heuristic (:meth:`resolve` on pooled points, or the pair's own points if called directly).

    Examples:
        >>> import jax.numpy as jnp, veil
        >>> k = veil.kernels.RBF(1.0)(jnp.zeros((1, 2)), jnp.ones((1, 2)))
        >>> round(float(k[0, 0]), 4)  # exp(-|x - y|^2 / 2) with |x - y|^2 = 2
        0.3679
    """

    bandwidth: float | Array | None = None

    def __check_init__(self):
        _check_positive("bandwidth", self.bandwidth)

    def resolve(self, points):
        if self.bandwidth is not None:
            return self
        return RBF(median_bandwidth(points, points))

    def __call__(self, x, y):
        h = median_bandwidth(x, y) if self.bandwidth is None else self.bandwidth
        return jnp.exp(-_sq_dists(x, y) / (2.0 * h**2))


class IMQ(Kernel):
    """Inverse multiquadric kernel ``c / (c + |x - y|^2)``, whose heavy tails keep gradients
    alive between distant point clouds (the kernel of Wasserstein autoencoders' MMD).
    ``scale=None`` sets ``c`` to the median squared distance.
    """

    scale: float | Array | None = None

    def __check_init__(self):
        _check_positive("scale", self.scale)

    def resolve(self, points):
        if self.scale is not None:
            return self
        return IMQ(median_bandwidth(points, points) ** 2)

    def __call__(self, x, y):
        d2 = _sq_dists(x, y)
        c = jax.lax.stop_gradient(jnp.median(d2) + 1e-12) if self.scale is None else self.scale
        return c / (c + d2)
