"""The Laplace approximation: the Gaussian at the target's mode with the inverse of the negative
Hessian there as its covariance, the cheap baseline PyMC and NumPyro users reach for.

The mode is found by L-BFGS on ``-log p`` in veil's loop (:class:`veil.geometry.lbfgs.LBFGSKernel`),
the Hessian taken by autodiff at it (float64 on the host for the inverse). The result is a
:class:`veil.VIResult` whose ``q`` is a ``FullRank``, so k-hat, the reweighting check, the
summary, draws and ArviZ work as for a fit: k-hat says how far the Gaussian at the mode is from
the target where it puts mass (a skewed or heavy-tailed posterior reads "bad").
"""

from __future__ import annotations

import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from veil._checks import Int, Real
from veil._checks import check_key as _check_key
from veil._checks import check_positive_int as _check_positive_int
from veil.families.gaussian import FullRank, gaussian_to_family
from veil.geometry.lbfgs import LBFGSKernel
from veil.loop import driver
from veil.result import VIResult
from veil.target import Target

__all__ = ["laplace"]


class _NegLogDensity(eqx.Module):
    target: Target

    def __call__(self, z):
        return -self.target.log_density(z)


@jax.jit
def _hessian(target, z):
    return jax.hessian(target.log_density)(z)


def laplace(target: Target, *, key: jax.Array, init=None, max_iters: Int = 1000, tol: Real = 1e-7) -> VIResult:
    """``N(mode, (-H)^{-1})``: the Laplace approximation of ``target`` at its mode.

    Args:
        target: a :class:`veil.Target` with a full-data log density.
        key: JAX PRNG key (the result's diagnostics draw with it).
        init: where L-BFGS starts (shape ``(dim,)``, unconstrained); default the origin.
        max_iters: most L-BFGS iterations.
        tol: the search has converged when ``-log p`` has not fallen below its best by more than
            this in 5 iterations in a row.

    Returns:
        A :class:`veil.VIResult` (``q`` a ``FullRank``): ``khat``, ``summary()``, ``draws``,
        ``to_arviz`` as for any fit; ``trace`` is ``-log p`` per iteration.

    Raises:
        ValueError: a minibatched target, a non-finite log density at the start, or an end point
            that is not a strict local maximum (a Hessian eigenvalue that is not negative: a flat
            direction or a saddle), said with the number of such directions.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum((z - 1.0) ** 2 / 4.0), dim=2)
        >>> res = veil.laplace(t, key=jax.random.key(0))
        >>> [round(float(v), 3) for v in res.q.mean], [round(float(v), 3) for v in res.q.stddev]
        ([1.0, 1.0], [2.0, 2.0])
    """
    if not isinstance(target, Target):
        raise TypeError(f"target must be a veil.Target, got {type(target).__name__}.")
    if target.is_minibatched:
        raise ValueError("laplace needs the full-data log density; for a minibatched target use veil.fit.")
    _check_key(key)
    max_iters = _check_positive_int("max_iters", max_iters)
    if not (isinstance(tol, (int, float, np.floating)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a non-negative number, got {tol!r}.")
    x0 = jnp.zeros(target.dim) if init is None else jnp.asarray(init, jnp.result_type(float))
    if x0.shape != (target.dim,):
        raise ValueError(f"init must have shape ({target.dim},), got {x0.shape}.")
    if not bool(jnp.isfinite(target.log_density(x0))):
        raise ValueError("The log density is not finite at the start: give init= where the model is defined.")
    start = time.perf_counter()
    run_key, diag_key = jax.random.split(key)
    out = driver.run(LBFGSKernel(_NegLogDensity(target), float(tol)), x0[None], key=run_key, max_steps=max_iters,
                     stop_rule=None, progress=False, max_consecutive_skips=1, description="laplace")
    mode = out.params[0]
    precision = -np.asarray(_hessian(target, mode), np.float64)
    precision = 0.5 * (precision + precision.T)
    eig = np.linalg.eigvalsh(precision)
    if not (np.all(np.isfinite(eig)) and eig.min() > 0):
        bad = int(np.sum(~(eig > 0)))
        raise ValueError(
            f"The end point is not a strict local maximum of the log density: {bad} direction(s) of the "
            f"Hessian are flat or curve upwards (smallest eigenvalue of -H: {eig.min() + 0.0:.3g}). "
            "The target is improper there, or has no mode (a funnel's neck): the Laplace "
            "approximation does not exist; use veil.fit."
        )
    cov = np.linalg.inv(precision)
    q = gaussian_to_family(FullRank(target.dim), jnp.asarray(mode), jnp.asarray(0.5 * (cov + cov.T), mode.dtype))
    return VIResult.from_run(out, target, q, diag_key, wall_time=time.perf_counter() - start)
