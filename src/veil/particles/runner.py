"""Running a particle method in veil's compiled driver: :func:`run`."""

from __future__ import annotations

import os

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from veil._checks import DEFAULT, Default, Int
from veil._checks import check_key as _check_key
from veil._checks import check_positive_int as _check_positive_int
from veil.loop import driver
from veil.loop.checkpoint import Checkpoint
from veil.loop.kernel import Kernel, StepInfo, all_finite, keep_if
from veil.diagnostics import StopRule
from veil.families.empirical import Empirical
from veil.target import Target
from veil.particles.base import ParticleMethod, _check_particle_count, _checked_init, _start
from veil.particles.kalman import EKI, InverseProblem
from veil.particles.result import ParticleResult
from veil.particles.svgd import CoinSVGD


# ------------------------------------------------------------------------------ the driver
class _ParticleKernel(Kernel):
    """A particle method as the loop runs it: the method's own move along its direction
    (``params`` are the particles ``[n, dim]``, the state the move's), the report traced."""

    method: ParticleMethod
    target: Target

    @property
    def batches(self):
        return self.target.batches

    def init(self, z):
        return self.method.init_move(z)

    def step(self, z, move_state, key, scale, batch):
        target = self.target if batch is None else self.target.on_batch(batch)
        report, phi = self.method.direction(target, z, key)
        ok = all_finite(report, phi)
        z, move_state = keep_if(ok, lambda a: self.method.move(*a, phi, scale), (z, move_state))
        return z, move_state, StepInfo(report, ok)

    def watched(self, z):
        """What the stopping rule watches: each coordinate's particle mean in units of its
        particle sd, and the log of that sd, in the target's coordinates (a mirrored method's
        constrained set, not its dual space). A drift of 0.01 in either is a move of the mean
        by 1% of an sd, or a 1% change of the sd (``drift_atol`` of the default rule)."""
        x = self.method.positions(z)
        sd = jnp.std(x, axis=0)
        return {"location": jnp.mean(x, axis=0) / sd, "log_scale": jnp.log(sd)}



# Particle methods are deterministic given their batches: no step-size decay (a coin method
# has no step to decay), and drift judged against a tolerance (1% of a particle sd, see
# _ParticleKernel.watched) rather than against noise. A window of 150 steps, not the noisy
# ELBO's 200, makes the stage judged at 300 steps (StopRule.min_stage; the driver's chunks
# end there and every 300 steps after), so a run can stop at step 300 rather than 400 or 800:
# measured on 12 rows of benchmarks/peers/particles.py (docs/benchmarks/coin-svgd-uncapped-bets.md and
# docs/benchmarks/fullrank-solves-time-to-accuracy.md), every
# stop was within the time-to-accuracy goal; a window of 100 (stages judged at 250) stopped
# four rows later, at 500-750 steps, where 150 stops them at 300.
_DEFAULT_STOP = StopRule(min_window=150, min_decays=0, max_decays=0, drift_atol=0.01, max_drift=2.0)


def run(
    target: Target | InverseProblem,
    method: ParticleMethod | None = None,
    *,
    key: jax.Array,
    n_particles: Int = 100,
    max_steps: Int | None = None,
    init: ArrayLike | None = None,
    progress: bool = True,
    stop: StopRule | None | Default = DEFAULT,
    checkpoint: str | os.PathLike | Checkpoint | None = None,
) -> "ParticleResult":
    """Move ``n_particles`` particles with ``method`` (default :class:`CoinSVGD`, which has
    no step size) in veil's compiled driver, and return them as a :class:`ParticleResult`.

    Args:
        target: a :class:`veil.Target` (a minibatched one gives each step a batch's scores),
            or an :class:`InverseProblem` (its posterior).
        method: a :class:`ParticleMethod`.
        key: a JAX PRNG key.
        n_particles: how many particles (at least 2).
        max_steps: cap on the steps (default ``method.default_max_steps``: 5,000; for
            :class:`EKI` its ``num_steps``, which is also the only value it accepts).
        init: starting particles ``[n_particles, dim]`` in unconstrained space; default
            standard-normal draws there.
        progress: show a progress bar.
        stop: a :class:`veil.StopRule`, or ``None`` to run ``max_steps`` steps (the only
            choice for :class:`EKI` and :class:`ALDI`, whose particles may not be averaged).
            The default is ``StopRule(min_window=150, min_decays=0, max_decays=0, drift_atol=0.01,
            max_drift=2.0)``: the trace is the mean
            ``-log p`` of 16 particles drawn at random each step; the run stops once it has settled and, over the last window, no
            coordinate's particle mean has moved by more than 1% of its particle sd nor its
            sd changed by more than 1%; each particle is averaged over that window.
        checkpoint: a path or :class:`veil.loop.checkpoint.Checkpoint`, as for :func:`veil.fit`.

    Raises:
        ValueError / TypeError: bad arguments, or a log density or gradient that is not
            finite at a starting particle, before any compilation of the loop.

    A call costs 2-3 ms besides its steps (start checks, the driver, the result;
    docs/benchmarks/particle-run-fixed-cost-gpu.md): for runs of a few milliseconds, or many small
    ones inside your own program,
    ``state = method.init(key, target, n, init=x0)`` and ``method.step`` in your own jitted
    loop skip it.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=3)
        >>> res = veil.particles.run(t, key=jax.random.key(0), n_particles=50, progress=False)
        >>> res.draws()["z"].shape   # the particles themselves
        (50, 3)
    """

    if isinstance(target, InverseProblem):
        target = target.target
    if not isinstance(target, Target):
        raise TypeError(
            f"target must be a veil.Target, got {type(target).__name__}; build one with "
            "veil.Target.from_logdensity(fn, dim) or veil.Target.from_numpyro(model, ...)."
        )
    method = CoinSVGD() if method is None else method
    if not isinstance(method, ParticleMethod):
        raise TypeError(f"method must be a veil.particles method such as CoinSVGD(), got {method!r}.")
    _check_key(key)
    fixed = isinstance(method, EKI)
    if fixed and max_steps is not None and max_steps != method.num_steps:
        raise ValueError(
            f"EKI runs exactly num_steps={method.num_steps} tempered steps (their temperatures "
            f"sum to one), so max_steps={max_steps} would stop short of, or past, the "
            "posterior; set EKI(problem, num_steps=...) instead."
        )
    max_steps = _check_positive_int("max_steps", method.default_max_steps if max_steps is None else max_steps)
    if stop is DEFAULT:
        stop = _DEFAULT_STOP if method.averageable else None
    if stop is not None and not isinstance(stop, StopRule):
        raise TypeError(f"stop must be a veil.StopRule or None, got {stop!r}.")
    if stop is not None and not method.averageable:
        raise ValueError(
            f"{type(method).__name__}'s particles are draws of a stochastic process: the stopping "
            "rule's window average would shrink their spread. Run a fixed number of steps "
            "(stop=None, max_steps=...)."
        )
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint(checkpoint)
    _check_particle_count(n_particles)
    host_init = None if init is None else _checked_init(method, target, n_particles, init)
    # (a device array goes in as it is: the host copy was for the checks)
    x0, run_key, diag_key, counts, drawn = _start(
        method, target, key, int(n_particles), init if isinstance(init, jax.Array) else host_init)
    counts, drawn = jax.device_get((counts, drawn))  # one device read
    if init is None:
        method.check_init(drawn)
    bad_value, bad_grad = map(int, counts)
    if bad_value or bad_grad:
        raise ValueError(
            f"At {bad_value} starting particle(s) the log density is not finite and at {bad_grad} "
            "its gradient is not: every particle must start where the target is defined and "
            "differentiable. Pass init=... (unconstrained points), or fix the model there."
        )
    fingerprint = None
    if checkpoint is not None:
        fingerprint = {"method": repr(method), "n_particles": int(n_particles), "stop": repr(stop),
                       "key": np.asarray(jax.random.key_data(key)).tolist(), "target": target.kind}
    out = driver.run(
        _ParticleKernel(method, target), x0, key=run_key, max_steps=max_steps,
        stop_rule=stop, progress=progress, description=type(method).__name__,
        checkpoint=checkpoint, fingerprint=fingerprint,
    )
    coords = jnp.squeeze(out.params, 0)  # (indexing costs a gather's dispatch: 0.2 ms)
    if out.stop_reasons[0] == "nonfinite":
        warnings.warn(
            f"The run stopped early: the particles' log density or its gradient was not finite "
            f"for {out.skipped[0]} steps (100 in a row at the end); the particles are those of "
            "the last finite step. Some particle reached a region where the target is undefined "
            "or overflows: check the model there, or start the particles elsewhere (init=...).",
            RuntimeWarning,
            stacklevel=2,
        )
    return ParticleResult.from_run(out, target, Empirical(method.positions(coords)), diag_key,
                                   method=method, coordinates=coords)
