"""Gaussian VI along the Bures-Wasserstein geometry: forward-backward Gaussian VI (FB-GVI).

Diao, Balasubramanian, Chewi & Salim (2023), "Forward-backward Gaussian variational inference
via JKO in the Bures-Wasserstein space". For a target ``p ∝ exp(-V)`` the KL divergence from a
Gaussian ``q = N(m, S)`` splits into the potential energy ``E_q V`` (smooth) and the negative
entropy (not smooth, but with a closed-form proximal step in the Wasserstein metric). One
iteration with step ``h``:

1. forward, a gradient step on ``E_q V``, with ``X ~ q`` (Monte Carlo):
   ``m' = m - h E[grad V(X)]``, ``S' = (I - h E[hess V(X)]) S (I - h E[hess V(X)])``;
2. backward, the JKO step on the entropy:
   ``m'' = m'``, ``S'' = (S' + 2hI + (S' (S' + 4hI))^{1/2}) / 2``.

The backward step maps each eigenvalue ``l >= 0`` of ``S'`` to ``(l + 2h + sqrt(l (l + 4h))) / 2
>= h``, so every iterate is positive definite by construction. For a Gaussian target the exact
posterior is a fixed point (for any ``h`` below ``2 / L``); for a log-concave one the paper
proves convergence rates, where stochastic gradient descent on the ELBO has none as sharp.

veil runs it in the same compiled driver as :func:`veil.fit` (stopping rule, iterate
averaging, non-finite steps skipped, minibatched targets): the driver's loss hands over the
negative ELBO estimate as its value and ``-(move)`` as its gradient, applied unchanged.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp

from veil._checks import DEFAULT, Default, Int, Real
from veil._checks import check_key as _check_key
from veil._checks import check_positive_int as _check_positive_int
from veil.loop import driver
from veil.loop.kernel import Kernel, StepInfo, all_finite, keep_if
from veil.diagnostics import StopRule
from veil.families.gaussian import FullRank
from veil.result import VIResult
from veil.target import Target
from veil.families.gaussian import gaussian_to_family

__all__ = ["fbgvi", "fbgvi_step"]

# With antithetic draws the iterates move deterministically on a quadratic potential, so the
# drift test has no noise to judge them by and any trend is "significant": the rule never
# fired on a 50-d Gaussian in 20,000 steps (docs/benchmarks/fbgvi-against-adam.md). It watches the mean in
# units of the sd and the log sd (``_FBGVIKernel.watched``), and a coordinate whose half-window
# means differ by less than 0.01 of those (1% of an sd) counts as settled.
_DEFAULT_STOP = StopRule(drift_atol=0.01, max_drift=2.0)  # 2: as measured in section 21


def fbgvi_step(target: Target, loc, cov, key, step_size, num_samples: int = 2):
    """One FB-GVI iteration from ``N(loc, cov)``: ``(new_loc, new_cov, loss)``, with ``loss``
    the negative ELBO estimate of ``N(loc, cov)`` from the same draws.

    The expectations use ``num_samples`` draws in antithetic pairs ``loc ± L eps`` (an odd
    count adds one plain draw): unbiased, and for a quadratic ``V`` the pair's mean gradient is
    ``grad V(loc)`` exactly, so on a Gaussian target the mean converges without noise (one
    plain draw left it jittering by ``O(h)``, 0.08 posterior sd in a 5-d test).

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2) / 4.0, dim=2)  # sd 2
        >>> loc, cov = jnp.zeros(2), jnp.eye(2)
        >>> step = jax.jit(veil.geometry.fbgvi.fbgvi_step, static_argnums=(0, 4))
        >>> for i in range(200):
        ...     loc, cov, _ = step(t, loc, cov, jax.random.key(i), 0.5)
        >>> [round(float(v), 3) for v in jnp.diagonal(cov)]
        [4.0, 4.0]
    """
    d = loc.shape[0]
    cov = 0.5 * (cov + cov.T)
    chol = jnp.linalg.cholesky(cov)
    eps = jax.random.normal(key, ((num_samples + 1) // 2, d))
    eps = jnp.concatenate([eps, -eps[: num_samples // 2]])
    x = loc + eps @ chol.T
    log_p, grad = jax.vmap(jax.value_and_grad(target.log_density))(x)
    hess = jax.vmap(jax.hessian(target.log_density))(x)
    # E grad V and E hess V, V = -log p.
    g = -jnp.mean(grad, axis=0)
    a = -jnp.mean(hess, axis=0)
    a = 0.5 * (a + a.T)
    m = jnp.eye(d) - step_size * a
    half = m @ cov @ m.T
    lam, vec = jnp.linalg.eigh(0.5 * (half + half.T))
    lam = jnp.maximum(lam, 0.0)
    new_lam = 0.5 * (lam + 2.0 * step_size + jnp.sqrt(lam * (lam + 4.0 * step_size)))
    new_cov = (vec * new_lam) @ vec.T
    entropy = 0.5 * (d * math.log(2.0 * math.pi * math.e) + 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol))))
    return loc - step_size * g, new_cov, -jnp.mean(log_p) - entropy


class _FBGVIKernel(Kernel):
    """FB-GVI as the loop runs it: each step is :func:`fbgvi_step` (its move scaled by the
    stopping rule's factor), the traced value its negative ELBO estimate."""

    target: Target
    step_size: float
    num_samples: int

    @property
    def batches(self):
        return self.target.batches

    def init(self, params):
        return ()  # the iteration carries nothing but the Gaussian itself

    def watched(self, params):
        """What the stopping rule watches: each coordinate's mean in units of its sd, and the
        log sd (a drift of 0.01 is 1% of an sd in either)."""
        sd = jnp.sqrt(jnp.diagonal(params["cov"]))
        return {"location": params["loc"] / sd, "log_scale": jnp.log(sd)}

    def step(self, params, state, key, scale, batch):
        target = self.target if batch is None else self.target.on_batch(batch)
        loc, cov, loss = fbgvi_step(target, params["loc"], params["cov"], key, self.step_size, self.num_samples)
        move = {"loc": loc - params["loc"], "cov": cov - params["cov"]}
        ok = all_finite(loss, move)
        params = keep_if(ok, lambda p: jax.tree.map(lambda x, m: x + scale * m, p, move), params)
        return params, state, StepInfo(loss, ok)



@eqx.filter_jit
def _start(target: Target, loc):
    value, grad = jax.value_and_grad(target.log_density)(loc)
    hess = jax.hessian(target.log_density)(loc)
    top = jnp.linalg.eigvalsh(-0.5 * (hess + hess.T))[-1]
    return value, jnp.sum(~jnp.isfinite(grad)) + jnp.sum(~jnp.isfinite(hess)), top


def fbgvi(
    target: Target,
    *,
    key: jax.Array,
    init: FullRank | None = None,
    step_size: Real | None = None,
    num_samples: Int = 2,
    max_steps: Int = 20_000,
    progress: bool = True,
    stop: StopRule | None | Default = DEFAULT,
) -> VIResult:
    """Fit a full-rank Gaussian by stochastic forward-backward Gaussian VI (see the module
    docstring), in veil's compiled driver.

    Args:
        target: a :class:`veil.Target` whose log density is twice differentiable (the forward
            step uses its Hessian, by automatic differentiation: ``dim`` gradient passes per
            draw, so keep ``dim`` in the hundreds at most).
        key: a JAX PRNG key.
        init: the starting Gaussian, a :class:`veil.FullRank` (default ``FullRank(dim)``:
            mean 0, sd 0.1).
        step_size: ``h``; default ``0.5 / L`` with ``L`` the largest eigenvalue of ``-hess log
            p`` at the starting mean (the method needs ``h < 2 / L``; a target whose
            curvature grows away from the start may need a smaller one).
        num_samples: draws per step for the expectations of the gradient and Hessian, in
            antithetic pairs (see :func:`fbgvi_step`).
        max_steps: cap on the steps.
        progress: show a progress bar.
        stop: a :class:`veil.StopRule` (default ``StopRule(drift_atol=0.01, max_drift=2.0)``: as for
            :func:`veil.fit`, its step-size decay damps each move, ``x + s (FB(x) - x)``, which
            keeps the fixed point and shrinks the noise; it watches each mean in units of its
            sd and the log sd, and a drift under 1% of an sd counts as settled, since on a
            Gaussian target the iterates move without noise) or ``None`` for ``max_steps``
            steps.

    Returns:
        A :class:`veil.VIResult` whose ``q`` is a :class:`veil.FullRank` (k-hat, summary,
        draws, ArviZ export as for any fit); its trace is the negative ELBO estimate.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum((z - 1.0) ** 2), dim=2)
        >>> res = veil.fbgvi(t, key=jax.random.key(0), progress=False)
        >>> bool(jnp.allclose(res.q.mean, 1.0, atol=0.05)), bool(jnp.allclose(res.q.cov, jnp.eye(2), atol=0.02))
        (True, True)
    """

    if not isinstance(target, Target):
        raise TypeError(f"target must be a veil.Target, got {type(target).__name__}.")
    _check_key(key)
    max_steps = _check_positive_int("max_steps", max_steps)
    num_samples = _check_positive_int("num_samples", num_samples)
    q = FullRank(target.dim) if init is None else init
    if not isinstance(q, FullRank) or q.dim != target.dim:
        raise TypeError(f"init must be a veil.FullRank({target.dim}), got {init!r}.")
    if stop is DEFAULT:
        stop = _DEFAULT_STOP
    if stop is not None and not isinstance(stop, StopRule):
        raise TypeError(f"stop must be a veil.StopRule or None, got {stop!r}.")
    value, bad, top = map(float, jax.device_get(_start(target, q.mean)))
    if not math.isfinite(value) or bad:
        raise ValueError(
            "The log density, its gradient or its Hessian is not finite at the starting mean; "
            "start elsewhere (init=veil.FullRank(dim, init_loc=...)) or fix the model there."
        )
    if step_size is None:
        if not top > 0:
            raise ValueError(
                f"The target is not strictly log-concave at the starting mean (largest curvature "
                f"{top:.3g}), so no default step size follows from it: pass step_size=..."
            )
        step_size = 0.5 / top
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be a positive number, got {step_size!r}.")
    run_key, diag_key = jax.random.split(key)
    params = {"loc": q.mean[None], "cov": q.cov[None]}
    out = driver.run(
        _FBGVIKernel(target, float(step_size), num_samples), params, key=run_key,
        max_steps=max_steps, stop_rule=stop, progress=progress, description="FB-GVI",
    )
    fitted = gaussian_to_family(FullRank(target.dim), out.params["loc"][0], out.params["cov"][0])
    return VIResult.from_run(out, target, fitted, diag_key)
