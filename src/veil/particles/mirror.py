"""Mirror maps for constrained particle methods (:class:`veil.particles.MirroredSVGD`).

A mirror map is the gradient of a strictly convex function ``psi`` on a constraint set
``Theta``: it sends a point ``theta`` of the set to a dual point ``eta = grad psi(theta)`` in
all of ``R^d``, and ``grad psi*`` sends it back. Particles move freely in the dual space and
never leave the set (Shi, Liu & Mackey 2022, "Sampling with Mirrored Stein Operators").

Each map gives ``primal(eta)``, ``dual(theta)``, the log determinant of the Jacobian
``d theta / d eta = hess psi(theta)^{-1}`` (for the dual density
``p_H(eta) = p(theta) |det d theta / d eta|``), ``hess_inv_vp(theta, v)`` (that Jacobian times
``v``), ``hess_vp(theta, v)`` (its inverse, ``hess psi(theta) v``, which Stein variational
mirror descent's kernel needs) and ``kernel_pairs(k, theta)``: ``sum_i k_ij hess psi(theta_i)^{-1} theta_j`` for every
``j`` in closed form, which the mirrored repulsion needs and which would otherwise be an
``[n, n, d]`` array.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = ["MirrorMap", "Simplex", "Positive", "Box"]


class MirrorMap(eqx.Module):
    """Abstract mirror map (see the module docstring)."""

    @abc.abstractmethod
    def primal(self, eta: Float[Array, "... d"]) -> Float[Array, "... d"]:
        """``theta = grad psi*(eta)``."""

    @abc.abstractmethod
    def dual(self, theta: Float[Array, "... d"]) -> Float[Array, "... d"]:
        """``eta = grad psi(theta)``."""

    @abc.abstractmethod
    def log_det_jacobian(self, eta: Float[Array, " d"]) -> Float[Array, ""]:
        """``log |det d theta / d eta|`` at one dual point."""

    @abc.abstractmethod
    def hess_inv_vp(self, theta: Float[Array, "n d"], v: Float[Array, "n d"]) -> Float[Array, "n d"]:
        """``hess psi(theta_i)^{-1} v_i`` for each row."""

    @abc.abstractmethod
    def hess_vp(self, theta: Float[Array, "n d"], v: Float[Array, "n d"]) -> Float[Array, "n d"]:
        """``hess psi(theta_i) v_i`` for each row."""

    @abc.abstractmethod
    def kernel_pairs(self, k: Float[Array, "n n"], theta: Float[Array, "n d"]) -> Float[Array, "n d"]:
        """Row ``j``: ``sum_i k_ij hess psi(theta_i)^{-1} theta_j`` (``k`` symmetric)."""

    @abc.abstractmethod
    def outside(self, theta: np.ndarray) -> np.ndarray:
        """Mask of the rows of ``theta`` not strictly inside the set."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """The set, in words, for error messages."""


class _Diagonal(MirrorMap):
    """A mirror map acting coordinate by coordinate: ``hess psi^{-1} = diag(m(theta))``."""

    @abc.abstractmethod
    def _m(self, theta):
        """The diagonal of ``hess psi(theta)^{-1}``."""

    def hess_inv_vp(self, theta, v):
        return self._m(theta) * v

    def hess_vp(self, theta, v):
        return v / self._m(theta)

    def kernel_pairs(self, k, theta):
        return theta * (k @ self._m(theta))


class Positive(_Diagonal):
    """The positive orthant with ``psi(theta) = sum theta log theta - theta``: ``eta = log
    theta``, ``hess psi^{-1} = diag(theta)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> Positive().primal(jnp.zeros(2)).tolist()
        [1.0, 1.0]
    """

    def primal(self, eta):
        return jnp.exp(eta)

    def dual(self, theta):
        return jnp.log(theta)

    def log_det_jacobian(self, eta):
        return jnp.sum(eta)

    def _m(self, theta):
        return theta

    def outside(self, theta):
        return ~(np.asarray(theta) > 0).all(axis=-1)

    @property
    def description(self):
        return "the positive orthant (every coordinate > 0)"


class Box(_Diagonal):
    """The box ``(low, high)^d`` with ``psi(theta) = sum (theta - low) log(theta - low) +
    (high - theta) log(high - theta)``: ``theta = low + (high - low) sigmoid(eta)``,
    ``hess psi^{-1} = diag((theta - low)(high - theta) / (high - low))``.

    Examples:
        >>> import jax.numpy as jnp
        >>> Box(-1.0, 3.0).primal(jnp.zeros(1)).tolist()
        [1.0]
    """

    low: float = 0.0
    high: float = 1.0

    def __check_init__(self):
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"Box needs finite low < high, got low={self.low!r}, high={self.high!r}.")

    def primal(self, eta):
        return self.low + (self.high - self.low) * jax.nn.sigmoid(eta)

    def dual(self, theta):
        return jnp.log(theta - self.low) - jnp.log(self.high - theta)

    def log_det_jacobian(self, eta):
        # log[(high - low) sigmoid(eta) sigmoid(-eta)], stable for large |eta|.
        return jnp.sum(jnp.log(self.high - self.low) + jax.nn.log_sigmoid(eta) + jax.nn.log_sigmoid(-eta))

    def _m(self, theta):
        return (theta - self.low) * (self.high - theta) / (self.high - self.low)

    def outside(self, theta):
        theta = np.asarray(theta)
        return ~((theta > self.low) & (theta < self.high)).all(axis=-1)

    @property
    def description(self):
        return f"the box ({self.low}, {self.high}) in every coordinate"


class Simplex(MirrorMap):
    """The probability simplex, by its first ``d`` coordinates ``theta_1..theta_d`` (the last,
    ``theta_{d+1} = 1 - sum theta``, is implied), with the entropic map ``psi(theta) =
    sum_{k <= d+1} theta_k log theta_k``: ``eta_k = log(theta_k / theta_{d+1})``, ``theta =
    softmax([eta, 0])_{1..d}``, ``hess psi = diag(1 / theta) + 1 1^T / theta_{d+1}`` and
    ``hess psi^{-1} = diag(theta) - theta theta^T``, whose determinant is
    ``prod_{k <= d+1} theta_k``.

    Examples:
        >>> import jax.numpy as jnp
        >>> [round(float(t), 4) for t in Simplex().primal(jnp.zeros(2))]   # the centre
        [0.3333, 0.3333]
    """

    def primal(self, eta):
        full = jax.nn.softmax(jnp.concatenate([eta, jnp.zeros(eta.shape[:-1] + (1,), eta.dtype)], -1), -1)
        return full[..., :-1]

    def dual(self, theta):
        return jnp.log(theta) - jnp.log1p(-jnp.sum(theta, axis=-1, keepdims=True))

    def log_det_jacobian(self, eta):
        return jnp.sum(jax.nn.log_softmax(jnp.concatenate([eta, jnp.zeros((1,), eta.dtype)])))

    def hess_inv_vp(self, theta, v):
        return theta * v - theta * jnp.sum(theta * v, axis=-1, keepdims=True)

    def hess_vp(self, theta, v):
        # hess psi = diag(1 / theta) + 1 1^T / theta_{d+1}
        last = 1.0 - jnp.sum(theta, axis=-1, keepdims=True)
        return v / theta + jnp.sum(v, axis=-1, keepdims=True) / last

    def kernel_pairs(self, k, theta):
        # sum_i k_ij (theta_i * theta_j - theta_i (theta_i . theta_j))
        return theta * (k @ theta) - (k * (theta @ theta.T)) @ theta

    def outside(self, theta):
        theta = np.asarray(theta)
        return ~((theta > 0).all(axis=-1) & (theta.sum(axis=-1) < 1))

    @property
    def description(self):
        return "the open simplex (every coordinate > 0, their sum < 1)"
