"""``veil.dadvi``: the ELBO on fixed draws, maximised by a quasi-Newton method.

ADVI follows a noisy gradient: each step draws fresh noise, and a stochastic optimizer
(Adam, here with outlier clipping) averages over steps. Deterministic ADVI (Giordano, Ingram
& Broderick 2024, "Black Box Variational Inference with a Deterministic Objective: Faster,
More Accurate, and Even More Black Box", JMLR) fixes the noise once, ``eps_1..eps_N``, and
maximises the sample-average ELBO

    L_N(phi) = (1/N) sum_n [log p(T_phi(eps_n)) - log q_phi(T_phi(eps_n))]

with a deterministic optimizer, here L-BFGS with a zoom line search (``optax.lbfgs``). It is
a sample-average approximation: its maximiser converges to the ELBO's as ``N`` grows, it has
a convergence test that means something (the objective stops falling), and it needs no step
size. The draws come in antithetic pairs (``eps`` and ``-eps``), so their mean is exactly zero:
on a Gaussian target a Gaussian family's mean is then exact for any ``N``.

Where it matters most here: a stochastic optimizer's iterate is not the ELBO's maximiser
when the gradient's noise is heavy-tailed and skewed. On Neal's funnel the rare draws in
``x0``'s upper tail carry the push toward the funnel's mouth, so Adam (and clipping more so)
settles toward the neck; with :class:`veil.HierarchicalGaussian`, ``dadvi`` recovers the
funnel's sds to a few percent where ``veil.fit`` with the same family is 20-50% short
(docs/benchmarks/dadvi-hierarchical-gaussian-funnel.md).

The fixed draws can be over-fitted: with few draws and many parameters ``L_N`` at its
maximiser is optimistic. The result checks the ELBO again on fresh draws and warns when the
two disagree by more than their noise; raise ``num_draws`` then.

Examples:
    >>> import jax, jax.numpy as jnp, veil
    >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum((z - 1.0) ** 2 / jnp.array([1.0, 4.0])), dim=2)
    >>> res = veil.dadvi(t, veil.MeanField(2), key=jax.random.key(0), num_draws=64)
    >>> bool(jnp.allclose(res.q.mean, 1.0, atol=1e-3)), res.stop_reason.startswith("converged")
    (True, True)
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from veil._checks import Int, Real
from veil.family import Family
from veil.loop import driver
from veil.geometry.lbfgs import LBFGSKernel
from veil.result import VIResult
from veil.target import Target, log_density_rows

__all__ = ["dadvi", "DADVIResult"]

# Iterations in a row whose loss falls by less than ``tol`` before the run counts as converged
# (a single small step can be a short line search, not the end).
_PATIENCE = 5
# Fresh draws behind the out-of-sample ELBO check.
_CHECK_DRAWS = 2000
# Smallest gap (nats) between the fixed draws' ELBO and the fresh draws' that is warned about:
# the fixed draws' maximum is always a little optimistic (0.008 nats on the funnel with 16,384
# draws, where the fit is right), and a gap that small changes no conclusion.
_OVERFIT_NATS = 0.05


@dataclasses.dataclass(eq=False, repr=False)
class DADVIResult(VIResult):
    """A :class:`veil.VIResult` from :func:`veil.dadvi`. ``trace`` is the sample-average loss
    (negative ELBO on the fixed draws) per L-BFGS iteration; ``num_steps`` the iterations.

    Extra attributes:
        num_draws: the fixed draws ``N``.
        num_grad_evals: gradient evaluations of ``log p`` (``N`` per evaluation of the
            objective, line-search evaluations included).
        elbo_fixed: the ELBO on the fixed draws at the result (``-final_loss``).
        elbo_fresh, elbo_fresh_se: the ELBO on 2000 fresh draws and its standard error.
    """

    num_draws: int = 0
    num_grad_evals: int = 0
    elbo_fixed: float = math.nan
    elbo_fresh: float = math.nan
    elbo_fresh_se: float = math.nan

    def __repr__(self) -> str:
        return (f"DADVIResult({type(self.q).__name__}(dim={self.q.dim}), {self.num_steps} iterations, "
                f"num_draws={self.num_draws}, stop_reason={self.stop_reason!r}, "
                f"elbo_fixed={self.elbo_fixed:.4g}, elbo_fresh={self.elbo_fresh:.4g} ± {self.elbo_fresh_se:.2g})")


def _fixed_draws(key, num_draws: int, noise_dim: int) -> jax.Array:
    """``num_draws`` standard-normal rows in antithetic pairs (``eps``, ``-eps``)."""
    half = jax.random.normal(key, (num_draws // 2, noise_dim))
    return jnp.concatenate([half, -half])


@eqx.filter_jit  # compiled once: the start check and the final score would otherwise run op by op
def _per_draw_elbo(params, static, target, eps):
    z, log_q = eqx.combine(params, static).transform_and_log_prob(eps)
    return log_density_rows(target, z) - log_q


def _sample_average_loss(params, static, target, eps):
    return -jnp.mean(_per_draw_elbo(params, static, target, eps))


class _SampleAverage(eqx.Module):
    """The sample-average loss on the fixed draws, as a function of the family's arrays."""

    static: Any
    target: Target
    eps: jax.Array

    def __call__(self, params):
        return _sample_average_loss(params, self.static, self.target, self.eps)


@eqx.filter_jit
def _fresh_elbo(target, q, key):
    z, log_q = q.sample_and_log_prob(key, _CHECK_DRAWS)
    return log_density_rows(target, z) - log_q


# Runtime type checking (the test suite's jaxtyping hook) would pre-empt the argument checks
# below with a generic message; `dadvi` validates its own arguments.
def dadvi(target: Target, q: Family, *, key: jax.Array, num_draws: Int = 1024, max_iters: Int = 1000,
          tol: Real = 1e-7) -> DADVIResult:
    """Fit ``q`` to ``target`` by maximising the ELBO on ``num_draws`` fixed draws with L-BFGS
    (deterministic ADVI, Giordano, Ingram & Broderick 2024).

    Args:
        target: a :class:`veil.Target` with a full-data log density (not minibatched).
        q: a family that is a transform of standard-normal noise (``MeanField``, ``FullRank``,
            ``LowRank``, :class:`HierarchicalGaussian`, flows), at its starting parameters.
        key: JAX PRNG key: the fixed draws, and the fresh draws of the checks.
        num_draws: ``N``, the fixed draws (even: they come in antithetic pairs). Each
            evaluation of the objective costs ``N`` gradients of ``log p``. The fit's error from
            the draws shrinks as ``1 / sqrt(N)``; quantities set in the tails need more (the
            funnel's sds: 16,384, docs/benchmarks/dadvi-hierarchical-gaussian-funnel.md).
        max_iters: most L-BFGS iterations.
        tol: the run has converged when the objective (nats) has not fallen below its best
            value so far by more than this in 5 iterations in a row. The default, 1e-7, is below float32's resolution of
            most objectives, so the run goes on until L-BFGS makes no visible progress: on the
            funnel the ELBO is so flat along the scale slopes that stopping at 1e-5 left the
            sds 5-9% off where 1e-7 got them within 1-2% (docs/benchmarks/dadvi-hierarchical-gaussian-funnel.md).

    Returns:
        A :class:`DADVIResult` (a :class:`veil.VIResult`: ``q``, ``draws``, ``khat``,
        ``summary``), with ``elbo_fixed`` and ``elbo_fresh``.

    Raises:
        TypeError: ``q`` is not a transform of standard-normal noise (a mixture, an
            empirical distribution), or an argument has the wrong type.
        ValueError: a minibatched target, ``num_draws`` not a positive even number, a
            ``q`` whose dimension is not the target's, or a non-finite objective at the start.
    """
    if not isinstance(target, Target):
        raise TypeError(f"target must be a veil.Target, got {type(target).__name__}.")
    if not isinstance(q, Family):
        raise TypeError(f"q must be a veil family such as veil.FullRank(dim), got {type(q).__name__}.")
    if target.is_minibatched:
        raise ValueError("dadvi needs the full-data log density; for a minibatched target use veil.fit.")
    if q.dim != target.dim:
        raise ValueError(f"q has dimension {q.dim} but the target has {target.dim}.")
    if isinstance(num_draws, bool) or not isinstance(num_draws, (int, np.integer)) or num_draws < 2 or num_draws % 2:
        raise ValueError(f"num_draws must be a positive even integer (the draws come in antithetic pairs), got {num_draws!r}.")
    if isinstance(max_iters, bool) or not isinstance(max_iters, (int, np.integer)) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}.")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a non-negative number, got {tol!r}.")
    try:
        noise_dim = q.noise_dim
    except NotImplementedError:
        raise TypeError(
            f"dadvi needs a family that is a transform of standard-normal noise; {type(q).__name__} "
            "is not. Use MeanField, FullRank, LowRank, HierarchicalGaussian or a flow, or veil.fit."
        ) from None
    start = time.perf_counter()
    draw_key, check_key, diag_key = jax.random.split(key, 3)
    eps = _fixed_draws(draw_key, int(num_draws), noise_dim)
    params, static = eqx.partition(q, eqx.is_inexact_array)
    first = float(_sample_average_loss(params, static, target, eps))
    if not math.isfinite(first):
        raise ValueError(
            "The ELBO on the fixed draws is not finite at q's start: the target's log density "
            "overflows or is undefined where q puts draws. Start q closer (init_loc=...) or with "
            "a smaller init_scale."
        )
    out = driver.run(LBFGSKernel(_SampleAverage(static, target, eps), float(tol), _PATIENCE),
                     jax.tree.map(lambda x: x[None], params),
                     key=draw_key, max_steps=int(max_iters), stop_rule=None, progress=False,
                     max_consecutive_skips=1, description="dadvi")
    iters, evals = int(out.num_steps[0]), int(out.kernel_state[3][0])
    status = {"max_steps": 1, "nonfinite": 2}.get(out.stop_reasons[0], 0)
    fitted = eqx.combine(jax.tree.map(lambda x: x[0], out.params), static)
    trace = np.asarray(out.traces[0], np.float64)
    # The fixed draws' ELBO at the result, and its noise (from the antithetic pairs' means).
    per_draw = np.asarray(_per_draw_elbo(eqx.filter(fitted, eqx.is_inexact_array), static, target, eps), np.float64)
    final = -float(per_draw.mean())
    pairs = 0.5 * (per_draw[: num_draws // 2] + per_draw[num_draws // 2:])
    fixed_se = float(pairs.std(ddof=1) / math.sqrt(pairs.size)) if pairs.size > 1 else 0.0
    reason = {0: f"converged: the objective fell below its best by less than {tol:g} in {_PATIENCE} iterations in a row",
              1: "max_iters", 2: "nonfinite"}[status]
    if status == 1:
        warnings.warn(f"dadvi ran {max_iters} iterations without converging; raise max_iters.", RuntimeWarning, stacklevel=2)
    elif status == 2:
        warnings.warn("dadvi stopped at a non-finite objective; q is the last finite iterate. Check the "
                      "target's log density where q puts draws.", RuntimeWarning, stacklevel=2)
    lw = np.asarray(_fresh_elbo(target, fitted, check_key), np.float64)
    ok = np.isfinite(lw)
    fresh = float(lw[ok].mean()) if ok.any() else math.nan
    fresh_se = float(lw[ok].std(ddof=1) / math.sqrt(ok.sum())) if ok.sum() > 1 else math.nan
    # On fresh draws the ELBO is unbiased; on the fixed draws it was maximised, so optimistic.
    # A gap beyond the two estimates' noise means the fit is tuned to its draws.
    gap = -final - fresh
    if math.isfinite(fresh) and gap > 3.0 * math.hypot(fresh_se, fixed_se) and gap > _OVERFIT_NATS:
        warnings.warn(
            f"dadvi's ELBO on its {num_draws} fixed draws ({-final:.4g}) is above the ELBO on fresh "
            f"draws ({fresh:.4g} ± {fresh_se:.2g}): the fit is tuned to its draws. Raise num_draws.",
            RuntimeWarning, stacklevel=2)
    return DADVIResult(
        target=target, q=fitted, trace=trace, num_steps=iters, stop_reason=reason,
        num_skipped=0, final_loss=final, wall_time=time.perf_counter() - start,
        restart_losses=np.asarray([final]), diagnostic_key=diag_key,
        num_draws=int(num_draws), num_grad_evals=int(evals) * int(num_draws),
        elbo_fixed=-final, elbo_fresh=fresh, elbo_fresh_se=fresh_se,
    )
