"""``veil.fit``: wires a target, a family, an objective and an optimizer into the driver."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
import math
import os
import re
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from veil._checks import DEFAULT, Default, Int
from veil._checks import check_key as _check_key
from veil._checks import check_positive_int as _check_positive_int
from veil.diagnostics import StopRule
from veil.estimators import ScoreFunction
from veil.family import Family, FitDefaults, Gaussian, Staged
from veil.geometry.refine import MODE_NATS, check_starts, refinable
from veil.geometry.refine import refine as refine_fit
from veil.local import Amortized, LocalResult, PerDatum, Structured, fit_local
from veil.loop import driver
from veil.loop.checkpoint import Checkpoint, _hash_array, digest
from veil.loop.kernel import GradientKernel, Loss
from veil.objectives import ELBO, ChiSquare, FunctionObjective, Objective, is_plain_elbo
from veil.optim import clip_outliers, whitened_factor, whitened_location
from veil.result import VIResult, _log_weights, log_evidence_from_weights
from veil.target import Target, log_density_rows
from veil.target.core import _row_sharding
from veil.target.health import Assessment, assess_run

__all__ = ["fit", "default_optimizer", "DEFAULT_STEP_SIZE"]

DEFAULT_STEP_SIZE = 0.05
# One object, created once: optax transformations are closures, and the compiled loop is keyed
# by the optimizer's identity, so a fresh `optax.adam(...)` per call would recompile.
_ADAM_OPTIMIZER = optax.chain(clip_outliers(), optax.adam(DEFAULT_STEP_SIZE))
_DEFAULT_OPTIMIZER = whitened_factor(whitened_location(_ADAM_OPTIMIZER, DEFAULT_STEP_SIZE), 0.1)
_DEFAULT_OBJECTIVE = ELBO()
# For families whose draws have no reparameterisation path (e.g. VonMises).
_DEFAULT_SCORE_OBJECTIVE = ELBO(num_samples=8, estimator=ScoreFunction())
_DEFAULT_STOP = StopRule()
# Minibatched targets: each step's loss is a batch's, so the loss is dominated by batch noise
# and "a smaller step no longer lowers the loss" shows after one halving, while the iterates
# still jitter by more than a tall dataset's posterior width. At least 4 halvings (up to 8):
# on 1e5-row logistic regression the mean error fell from 0.87-0.95 to 0.13-0.24 posterior sd
# for 2x the steps (docs/benchmarks/minibatch-vi-scale.md).
_MINIBATCH_STOP = StopRule(min_decays=4, max_decays=8, max_drift=2.0)


def default_optimizer() -> optax.GradientTransformation:
    """Adam with step size 0.05 behind outlier clipping, plus a Gaussian family's location
    step and a FullRank factor's step in ``q``'s whitened coordinates: the optimizer
    ``veil.fit`` uses when given none,
    ``veil.optim.whitened_factor(veil.optim.whitened_location(optax.chain(veil.optim.clip_outliers(),
    optax.adam(0.05)), 0.05), 0.1)``.

    Why this choice: Adam's per-coordinate normalisation makes a step move each parameter by
    about the step size whatever the scale of the log density, so one value serves targets
    whose posterior scales differ by orders of magnitude; with log-scale parameters a step
    changes a scale by about 5%. 0.05 is large enough to cross unconstrained space in a few
    hundred steps; the stopping rule then halves it (at most twice) once the loss stops
    improving, and averages the final iterates, so the large initial step does not cost
    final accuracy. Each gradient coordinate is first clipped at 5 times its running root
    mean square (:func:`veil.optim.clip_outliers`): one draw deep in the tail of an early,
    wide ``q`` can give a gradient thousands of times the usual size, and Adam's second
    moment then needs ~10,000 steps to forget it, during which the fit crawls (stochastic
    volatility, docs/benchmarks/gradient-outliers-clipping.md: 2 of 7 seeds ran to the step cap without it, none
    with it). Ordinary gradient noise passes untouched. For MeanField, FullRank and LowRank
    the location also takes a step of 0.05 of ``q``'s standard deviations along ``A A^T g``
    (``A`` the family's scale, :func:`veil.optim.whitened_location`): Adam moves each
    coordinate on its own, and where a posterior's coordinates move together (hierarchical
    models) the location then crawls along the correlated directions; with the whitened step
    radon's fits took 2,800-4,400 steps instead of 2,800-13,200, EightSchools' 10x fewer
    (docs/benchmarks/whitened-location-step.md). A FullRank factor of at most 128 dimensions also takes, every
    ``1 + dim // 16`` steps, a step ``L -> L (I + M)`` in whitened coordinates
    (:func:`veil.optim.whitened_factor`): after the location, the covariance is what a
    fit's final stage waited for; with it the ill-conditioned 100-d Gaussian converged in
    3,200-3,600 steps instead of running to the 20,000-step cap, Brownian motion took a
    third of the steps and radon's fits reached a 0.6 nats higher ELBO
    (docs/benchmarks/whitened-factor-step.md). Other families get the clipped Adam step alone.
    """
    return _DEFAULT_OPTIMIZER


class _VILoss(Loss):
    """The loss ``veil.fit`` hands the loop (in a :class:`GradientKernel`): an objective
    applied to a target.

    The driver optimises ``params``, the floating-point arrays of the family; ``rest`` holds
    everything else (integer permutations, masks, activation functions of a flow's layers),
    which ``eqx.combine`` puts back before the family is used.
    """

    target: Target
    objective: Objective
    rest: Family

    def init_state(self, params):
        """The objective's own state (``None`` for most objectives)."""
        return self.objective.init_state(eqx.combine(params, self.rest))

    def watched(self, params):
        """What the stopping rule's drift test watches: the family's choice."""
        return eqx.combine(params, self.rest).watched()

    @property
    def batches(self):
        """The batch source of a minibatched target (``None`` otherwise): the driver draws
        each step's rows from it and passes them as ``batch``."""
        return self.target.batches

    def __call__(self, params, key, state=None, batch=None):
        q = eqx.combine(params, self.rest)
        # On a batch, the objective sees log_prior + (N/B) log_lik of the batch's rows.
        target = self.target if batch is None else self.target.on_batch(batch)
        if state is None:
            return self.objective(q, target, key)[0], None
        loss, _, new_state = self.objective.call_with_state(q, target, key, state)
        return loss, new_state


class _ParamsLoss(Loss):
    """A fit's loss with the model's parameters learned beside ``q``: ``params`` is ``{"q": the
    family's arrays, "theta": the target's parameters, unconstrained}``, and each step's
    objective sees the target at its current parameters. The ELBO bounds the log marginal
    likelihood below, so maximising it in both is variational EM (type-II maximum likelihood
    where ``q`` can hold the exact posterior)."""

    inner: _VILoss

    def init_state(self, params):
        return self.inner.init_state(params["q"])

    def watched(self, params):
        return {"q": self.inner.watched(params["q"]), "theta": params["theta"]}

    @property
    def batches(self):
        return self.inner.batches

    def __call__(self, params, key, state=None, batch=None):
        inner = eqx.tree_at(lambda loss: loss.target, self.inner, self.inner.target.with_params(params["theta"]))
        return inner(params["q"], key, state, batch)


@eqx.filter_jit
def _start(target: Target, q: Family, key: jax.Array, num_restarts: int):
    """Everything a fit needs before its loop, in one compiled call: the log density and its
    gradient at the start (checked on the host), the restarts' starting points (the
    floating-point arrays of ``q``) and keys."""
    value, grad = jax.value_and_grad(target.log_density)(q.mean)
    bad_grad = jnp.sum(~jnp.isfinite(grad))
    init_key, run_key, pick_key, diag_key = jax.random.split(key, 4)
    params = _restart_params(eqx.filter(q, eqx.is_inexact_array), num_restarts, init_key)
    return (value, bad_grad), params, run_key, pick_key, diag_key


@eqx.filter_jit
def _restart_bounds(target: Target, params, rest, key, n: int):
    """ELBO of each restart from ``n`` fresh draws (plain Monte Carlo, no gradients)."""

    def one(p, k):
        z, log_q = eqx.combine(p, rest).sample_and_log_prob(k, n)
        return jnp.mean(log_density_rows(target, z) - log_q)

    keys = jax.random.split(key, jax.tree.leaves(params)[0].shape[0])
    return jax.vmap(one)(params, keys)


@eqx.filter_jit
def _select(stacked, index):
    return jax.tree.map(lambda x: x[index], stacked)


def fit(
    target: Target,
    q: Family | Structured | PerDatum | Amortized,
    *,
    key: jax.Array,
    objective: Objective | Callable | None = None,
    optimizer: optax.GradientTransformation | None = None,
    max_steps: Int = 20_000,
    num_restarts: Int = 1,
    progress: bool = True,
    stop: StopRule | None | Default = DEFAULT,
    mesh: Mesh | None = None,
    checkpoint: str | os.PathLike | Checkpoint | None = None,
    refine: bool = True,
) -> VIResult | LocalResult:
    """Fit the family ``q`` to ``target`` by stochastic optimisation, all steps compiled.

    The loop runs in compiled chunks (see :mod:`veil.loop.driver`) and stops by itself with the
    noise-robust rule of :class:`~veil.diagnostics.StopRule`: step-size decay in stages,
    stop when lowering the step no longer lowers the loss, then iterate averaging.

    Args:
        target: a :class:`~veil.Target`.
        q: the family and its starting point, e.g. ``veil.FullRank(target.dim)``.
        key: a JAX PRNG key (``jax.random.key(seed)``); required, never defaulted.
        objective: the loss; default ``veil.ELBO()`` (4 draws per step, STL gradients); for
            a flow (``veil.Flow``, ``veil.FlowJAX``) or a ``veil.SemiImplicit``
            ``ELBO(num_samples=8, estimator=Reparam())`` (for the latter, the SIVI bound); for a family without
            reparameterised draws (``VonMises``)
            the ELBO with the score-function estimator (8 draws, leave-one-out baseline), with
            a warning. Any :class:`~veil.Objective`, or a plain function
            ``(q, target, key) -> loss``. For a ``veil.Mixture``: ``ELBO(estimator=
            veil.Stratified())`` (4 draws from every component; a mixture of flows takes the
            flow settings with ``Stratified(inner=Reparam())``).
        optimizer: an optax transformation; default :func:`default_optimizer` (Adam, 0.05, behind
            outlier clipping),
            for a flow Adam with step 0.01. Reuse the same object between fits: a new one
            recompiles the loop.
        max_steps: cap on optimisation steps.
        num_restarts: ``k`` fits from jittered starts run together (vmapped); the one with
            the highest ELBO (512 fresh draws each) is kept. Restart 0 starts at ``q``, the
            others at ``q`` with its mean (a flow: its base's mean) moved by Uniform(-2, 2) noise per
            coordinate.
        progress: show a progress bar (step, loss, steps/s), updated once per chunk.
        stop: a :class:`~veil.diagnostics.StopRule` (default ``StopRule()``, for a flow
            ``StopRule(min_window=1000, max_drift=2.0)``: flows improve slowly and need longer windows to
            show it; for a minibatched target ``StopRule(min_decays=4, max_decays=8, max_drift=2.0)``:
            batch noise hides the gain of a smaller step), or ``None`` to run exactly
            ``max_steps`` steps and keep the last iterate.
        mesh: a ``jax.sharding.Mesh`` to spread the work over its devices. A minibatched
            target's rows are sharded over them and each step's batch is split between them
            (:meth:`Target.shard`: the batch size must be a multiple of the device count);
            for a full-data target the restarts are sharded instead (``num_restarts`` a
            multiple of the device count). Parameters are replicated. The same key gives
            the same fit as on one device, up to the order of floating-point sums.
        checkpoint: a path (or a :class:`veil.loop.checkpoint.Checkpoint` for the save interval):
            the fit saves its whole state there at chunk boundaries (every 60 s by default,
            and at the end) and, if the file exists when the fit starts, resumes from it,
            continuing exactly as the uninterrupted fit would. A checkpoint written by a
            different fit (target, family, objective, stop rule, restarts, key) or a damaged
            file raises ``ValueError`` before any step.
        refine: for a ``FullRank`` fitted by the ELBO with a stopping rule to a full-data
            target of up to 2,000 dimensions, finish with :func:`veil.variational_newton`
            from the fitted Gaussian (gradients only, ``2 dim`` of them per iteration): Adam
            with iterate averaging creeps along a posterior's long, ill-conditioned
            directions and stops short there, Newton's steps use the curvature and land on
            the same optimum (on posteriordb's regressions with correlated predictors the
            stochastic run stopped 0.13 sd short of the mean, or ran out of steps 43 sd off;
            docs/benchmarks/posteriordb.md). The refined Gaussian replaces ``q`` only where it
            settled and its ELBO, estimated from the same draws, is at least the fit's;
            :attr:`VIResult.refinement` says what it changed. The same fits are then checked
            against four independent starts (Newton from dispersed points,
            :attr:`VIResult.starts`): a better optimum replaces ``q``, another mode of
            comparable mass turns the verdict. ``False`` skips both and keeps the stochastic
            optimiser's ``q`` as it is.

    A model with local latents (latent sites in a NumPyro model's subsampled plate) takes a
    local guide as ``q``: ``veil.Structured(global_family, veil.PerDatum(family))``,
    ``veil.Amortized(encoder, family, data=x)`` (alone for a model without global latents) or a
    ``veil.Guide`` program; ``objective`` may then be ``None`` (the one-draw ELBO) or
    ``veil.IWAE(k)`` (per row, a model without global latents), and the result is a
    :class:`veil.LocalResult` (see :mod:`veil.local`).

    A flow (or ``SemiImplicit``) built without a ``base`` (``veil.flows.coupling(d, key=k)``) is fitted in two
    stages: its ``MeanField`` base alone with the Gaussian defaults, then the whole flow over
    it; the result's trace and step count are the flow stage's (``res.base_result`` is the
    Gaussian stage's result), its wall time covers both.

    Returns:
        A :class:`~veil.VIResult`.

    Raises:
        ValueError / TypeError: bad arguments, or a log density (or its gradient) that is not
            finite at the starting point; raised before any compilation of the loop.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum((z - 1.0) ** 2), dim=2)
        >>> res = veil.fit(t, veil.MeanField(2), key=jax.random.key(0), progress=False)
        >>> bool(jnp.allclose(res.q.mean, 1.0, atol=0.05))
        True
    """
    if not isinstance(target, Target):
        raise TypeError(
            f"target must be a veil.Target, got {type(target).__name__}; build one with "
            "veil.Target.from_logdensity(fn, dim) or veil.Target.from_numpyro(model, ...)."
        )
    if target.has_local:  # local latents: a global family and a local guide (veil.local)
        asked = [name for name, given in (("num_restarts", num_restarts != 1), ("mesh", mesh is not None)) if given]
        if asked:
            raise NotImplementedError(
                f"A model with local latents is fitted on one device with one restart for now: drop {', '.join(asked)}.")
        if stop is DEFAULT:
            stop = _MINIBATCH_STOP
        return fit_local(target, q, key=key, optimizer=_DEFAULT_OPTIMIZER if optimizer is None else optimizer,
                         max_steps=_check_positive_int("max_steps", max_steps), stop=stop, progress=progress,
                         checkpoint=_as_checkpoint(checkpoint), objective=objective)
    if isinstance(q, (Structured, PerDatum, Amortized)):
        raise ValueError(
            f"{type(q).__name__} is a guide for local latents, and this model has none (no latent site inside "
            "a subsampled plate): fit a family over its dim, e.g. veil.FullRank(target.dim).")
    if not isinstance(q, Family):
        raise TypeError(f"q must be a veil family such as veil.FullRank(dim), got {type(q).__name__}.")
    q.check_fittable()
    if q.dim != target.dim:
        raise ValueError(
            f"The family has dim={q.dim} but the target has dim={target.dim}; "
            f"build it as e.g. veil.FullRank(target.dim)."
        )
    _check_key(key)
    max_steps = _check_positive_int("max_steps", max_steps)
    num_restarts = _check_positive_int("num_restarts", num_restarts)
    learn = target.has_params  # a model's parameters, learned beside q
    if learn and (num_restarts > 1 or mesh is not None):
        raise NotImplementedError(
            f"The model has parameters ({', '.join(s.name for s in target.param_sites) or 'params='}), which veil.fit "
            "learns on one device with one restart for now: drop num_restarts or mesh, or give the parameters "
            "priors to infer them as latents."
        )
    # What the family declares for itself (flows, semi-implicit families, mixtures), then the
    # engine's defaults for what it leaves out.
    declared = q.fit_defaults(minibatched=target.is_minibatched) or FitDefaults()
    objective = declared.objective if objective is None else objective
    if objective is None and not q.reparameterized:
        warnings.warn(
            f"{type(q).__name__} draws are not reparameterised, so veil uses the score-function "
            "estimator (ELBO, 8 draws, leave-one-out baseline): expect noisier steps than with "
            "path-wise gradients. Pass objective=veil.ELBO(estimator=veil.ScoreFunction(...)) "
            "to choose it yourself and silence this.",
            UserWarning,
            stacklevel=2,
        )
        objective = _DEFAULT_SCORE_OBJECTIVE
    if objective is None:
        objective = _DEFAULT_OBJECTIVE
    if callable(objective) and not isinstance(objective, (Objective, eqx.Module)):
        objective = FunctionObjective(objective)  # a plain function (q, target, key) -> loss
    if not isinstance(objective, Objective):
        raise TypeError(
            f"objective must be a veil objective such as veil.ELBO() or a function "
            f"(q, target, key) -> loss, got {objective!r}."
        )
    objective.check_family(q)
    if optimizer is None:
        optimizer = _DEFAULT_OPTIMIZER if declared.optimizer is None else declared.optimizer
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}.")
    if stop is DEFAULT:
        stop = declared.stop if declared.stop is not None else _MINIBATCH_STOP if target.is_minibatched else _DEFAULT_STOP
    if stop is not None and not isinstance(stop, StopRule):
        raise TypeError(f"stop must be a veil.StopRule or None, got {stop!r}.")

    checkpoint = _as_checkpoint(checkpoint)
    restart_sharding = None
    if mesh is not None:
        restart_sharding = _place_on_mesh(target, mesh, num_restarts)
        if restart_sharding is None:
            target = target.shard(mesh)
    base_res = None
    if isinstance(q, Staged) and q.fit_base_first:
        # The Gaussian stage: fit the default base alone, then the flow over it
        # (docs/benchmarks/normalizing-flows.md: over the unfitted base the layers must stretch sd
        # 0.1 to the target's
        # scale, and failed to).
        key, base_key = jax.random.split(key)
        base_ckpt = None if checkpoint is None else Checkpoint(checkpoint.path[:-4] + ".base", checkpoint.every)
        base_res = fit(target, q.base, key=base_key, max_steps=max_steps, progress=progress, checkpoint=base_ckpt)
        q = q.with_base(base_res.q)  # fit_base_first stays True but is not looked at again
        target = base_res.target  # with the parameters the Gaussian stage learned
    checks, params, run_key, pick_key, diag_key = _start(target, q, key, num_restarts)
    _check_start(q, *jax.device_get(checks), target)
    if restart_sharding is not None:
        params = jax.device_put(params, restart_sharding)
    rest = eqx.filter(q, eqx.is_inexact_array, inverse=True)
    loss = _VILoss(target, objective, rest)
    if learn:
        loss = _ParamsLoss(loss)
        params = {"q": params, "theta": jax.tree.map(lambda x: x[None], target.params)}
    out = driver.run(
        GradientKernel(loss, optimizer),
        params,
        key=run_key,
        max_steps=max_steps,
        stop_rule=stop,
        progress=progress,
        checkpoint=checkpoint,
        fingerprint=None if checkpoint is None else _fingerprint(target, q, objective, optimizer, stop, num_restarts, key),
    )
    best, other_modes = 0, ""
    if num_restarts > 1:
        bounds = np.asarray(_restart_bounds(target, out.params, rest, pick_key, 512))
        best = int(np.nanargmax(np.where(np.isfinite(bounds), bounds, -np.inf)))
        other_modes = _other_modes(out.params, rest, bounds, best)
    best_q = eqx.combine(_select(out.params["q"] if learn else out.params, best), rest)
    if learn:  # the result's target holds the learned parameters (res.params)
        target = target.with_params(_select(out.params["theta"], best))
    if out.stop_reasons[best] == "nonfinite":
        warnings.warn(
            "The fit stopped early: the loss or its gradient was not finite for "
            f"{out.skipped[best]} steps (100 in a row at the end). The target's log density "
            "overflows or is undefined where q puts mass: check the model, bound its "
            "parameters, or start closer (init_loc=...) with a smaller init_scale.",
            RuntimeWarning,
            stacklevel=2,
        )
    res = VIResult.from_run(
        out, target, best_q, diag_key, restart=best,
        wall_time=out.wall_time + (base_res.wall_time if base_res is not None else 0.0), base_result=base_res,
    )
    if res.stop_reason != "nonfinite":
        # Skipped steps and parameters out of the finite range: a run that "converged" on the
        # defined part of a target, or ran away along an improper one, is not a fit.
        found = assess_run(target, best_q, res.trace, res.num_skipped, res.num_steps, diag_key)
        if found.reason is None and isinstance(objective, ChiSquare):
            found = _check_upper_bound(target, q, best_q, jax.random.fold_in(diag_key, 8))
        if found.reason is not None:
            res.stop_reason, res.problem = found.reason, found.message
            warnings.warn(found.message, RuntimeWarning, stacklevel=2)
    if other_modes:
        res.other_modes = other_modes
        warnings.warn(other_modes, RuntimeWarning, stacklevel=2)
    res.checks_mean = is_plain_elbo(objective) and isinstance(best_q, Gaussian) and not target.is_minibatched
    if (refine and refinable(target, best_q, objective, stop, mesh)
            and (res.converged or res.stop_reason == "max_steps")):
        refine_fit(res, jax.random.fold_in(diag_key, 9))
        check_starts(res, jax.random.fold_in(diag_key, 10))
    return res




def _other_modes(params, rest, bounds: np.ndarray, best: int) -> str:
    """A sentence when a restart other than ``best`` ended at another place (its mean more
    than 3 of either fit's sds from the best one's in some coordinate) with an ELBO within
    ``MODE_NATS`` of the best: the target has several modes and ``q`` holds one. ``""``
    otherwise, and for families without a mean and sd."""
    try:
        members = eqx.combine(params, rest)
        means = np.asarray(eqx.filter_vmap(lambda m: m.mean)(members), np.float64)
        sds = np.asarray(eqx.filter_vmap(lambda m: m.stddev)(members), np.float64)
    except Exception:  # noqa: BLE001 - a family with no closed-form mean or sd: nothing to compare
        return ""
    far = []
    for j in range(len(bounds)):
        if j == best or not np.isfinite(bounds[j]) or bounds[j] < bounds[best] - MODE_NATS:
            continue
        gap = np.abs(means[j] - means[best]) / np.maximum(sds[j], sds[best])
        if np.isfinite(gap).all() and gap.max() > 3.0:
            far.append((j, float(bounds[best] - bounds[j]), float(gap.max())))
    if not far:
        return ""
    j, nats, gap = max(far, key=lambda f: f[2])
    return (
        f"{len(far)} of {len(bounds) - 1} other restarts ended at another mode (restart {j}: "
        f"{gap:.1f} sds away, its ELBO {nats:.2f} nats below the best, so that mode holds about "
        f"{100 * math.exp(-nats):.0f}% of the best one's mass). The target has several modes and "
        "q holds one; k-hat cannot see the others from q's draws. Fit a mixture "
        "(veil.Mixture.around(res.q, k, key=...)) or veil.particles.repulsive_ensemble."
    )


def _check_upper_bound(target: Target, start: Family, fitted: Family, key, n: int = 4000):
    """A chi-square fit broke down when its upper bound's estimate from ``n`` fresh draws,
    ``1/2 log mean w^2``, lies below the start's ELBO (a lower bound on log Z): no valid
    estimate can, so the fitted ``q`` has spread where the target has no mass and its own
    draws no longer see the target (German credit with 16 draws a step: the bound fell 240
    nats below log Z while the stopping rule saw a settled loss)."""

    k1, k2 = jax.random.split(key)
    lw_start = np.asarray(_log_weights(target, start, k1, n), np.float64)
    lw_fit = np.asarray(_log_weights(target, fitted, k2, n), np.float64)
    if not np.isfinite(lw_start).all():
        return Assessment(None, "")
    if not np.isfinite(lw_fit).all():  # stochastic volatility: 3% of the fitted q's draws
        share = float(np.mean(~np.isfinite(lw_fit)))
        return Assessment("diverged", (
            f"The chi-square fit broke down: the log density is not finite at {share:.1%} of the "
            f"fitted q's draws, which its start ({n} draws) never met: q spread its mass where "
            "the target has none or overflows. Refit with more draws per step (veil.ChiSquare(k) "
            "with a larger k), or use the start as the importance-sampling proposal."
        ))
    elbo = lw_start.mean()
    elbo_se = lw_start.std(ddof=1) / math.sqrt(n)
    cubo = 0.5 * log_evidence_from_weights(2.0 * lw_fit)[0]  # 1/2 log mean w^2, in float64
    if cubo >= elbo - 3.0 * elbo_se:
        return Assessment(None, "")
    return Assessment("diverged", (
        f"The chi-square fit broke down: its upper bound on log Z, estimated from {n} fresh draws "
        f"of the fitted q ({cubo:.2f}), lies below the lower bound its start gave (ELBO "
        f"{elbo:.2f}), which no valid q can do. q spread its mass where the target has none, "
        "and the importance weights of each step's draws were too few to see it. Refit with "
        "more draws per step (veil.ChiSquare(k) with a larger k), or use the start as the "
        "importance-sampling proposal."
    ))


def _as_checkpoint(checkpoint) -> Checkpoint | None:
    if checkpoint is None or isinstance(checkpoint, Checkpoint):
        return checkpoint
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path or a veil.loop.checkpoint.Checkpoint, got {checkpoint!r}.")
    return Checkpoint(checkpoint)


def _fingerprint(target: Target, q: Family, objective, optimizer, stop, num_restarts: int, key) -> dict:
    """What a checkpoint must match to be resumed by this fit (JSON-able): everything that
    decides the fit. The target, family, objective and optimizer are hashed by what they
    compute (:func:`veil.loop.checkpoint.digest`: the traced program, closed-over constants, data
    and starting values), not by name, so a changed model, data set, step size or starting
    point is told apart from the same fit run again in a new process."""

    def clean(x) -> str:
        return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(x))

    z0 = jnp.zeros((target.dim,))
    params = eqx.filter(q, eqx.is_inexact_array)
    rest = eqx.filter(q, eqx.is_inexact_array, inverse=True)
    probe_key = jax.random.key(0)
    target_hash = digest(lambda t, z: t.log_density(z), target, z0)
    if target.store is not None:  # rows on disk: by file, size and modification time

        h = hashlib.sha256(target_hash.encode())
        for leaf in jax.tree.leaves(target.store.data):
            _hash_array(h, leaf)
        target_hash = h.hexdigest()[:16]
    if target.kind == "stan":  # the log density is a host callback: its program text says nothing
        target_hash += f"+stan{target.source.fingerprint}"
    fn = target.fn if target.model is None else target.model  # a NumPyro target's model
    fn = getattr(fn, "__qualname__", clean(fn))
    return {
        "target": f"{target.kind} dim={target.dim} N={target.num_data} B={target.batch_size} fn={fn} #{target_hash}",
        "family": f"{type(q).__name__} dim={q.dim} #"
                  + digest(lambda p, k: eqx.combine(p, rest).sample_and_log_prob(k, 2), params, probe_key),
        "objective": _objective_fingerprint(objective, params, rest, probe_key, clean),
        "optimizer": digest(lambda p: optimizer.update(p, optimizer.init(p), p), params),
        "stop": clean(stop),
        "restarts": num_restarts,
        "key": np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key).tolist(),
    }


def _standard_normal(z):
    return -0.5 * jnp.sum(z**2)


def _objective_fingerprint(objective, params, rest, key, clean) -> str:
    """The objective's text and the program it makes on a stand-in target (a standard normal,
    so that a change of target shows as the target's difference alone); the text alone for
    an objective that needs more of its target (a likelihood apart from the prior)."""

    try:
        h = digest(lambda p, k: objective(eqx.combine(p, rest), _standard_normal, k)[0], params, key)
    except Exception:  # noqa: BLE001 - it needs a real target; its text still counts
        return clean(objective)
    return f"{clean(objective)} #{h}"


def _place_on_mesh(target: Target, mesh, num_restarts: int):
    """Where ``fit(..., mesh=mesh)`` puts the work: ``None`` when the target's rows are to be
    sharded (a minibatched target), else the sharding of the restart axis, after checking
    that the restarts split evenly."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if target.is_minibatched:
        return None
    if num_restarts % mesh.size:
        raise ValueError(
            f"A full-data target spreads its restarts over the mesh, but num_restarts="
            f"{num_restarts} does not split evenly over {mesh.size} devices: use a multiple of "
            f"{mesh.size}, or a minibatched target (veil.Target.minibatched) to split the data."
        )
    return _row_sharding(mesh)  # the restart axis split like a target's rows


def _check_start(q: Family, value, bad_grad, target: Target | None = None) -> None:
    """Fail fast, before compiling the loop, if the start point is unusable."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(
            f"The log density is {value} at the starting point (q's mean, "
            f"{np.array2string(np.asarray(q.mean), threshold=6)}). veil needs a finite log density "
            "where the fit starts: start elsewhere with the family's init_loc=..., or fix the "
            "model where it is undefined (log of zero, division by zero, out-of-support values)."
            + _closure_hint(target)
        )
    if bad_grad:
        raise ValueError(
            f"The gradient of the log density has {int(bad_grad)} non-finite component(s) at the "
            "starting point (q's mean). Start elsewhere with the family's init_loc=..., or make "
            "the log density differentiable there."
        )


def _closure_hint(target: Target | None) -> str:
    """For a plain log density whose closed-over arrays hold NaN or inf: a sentence saying so
    (the data, not the start, are then the likely cause); else ``""``."""
    if target is None or target.kind != "logdensity":
        return ""
    try:
        # The target's arrays (hoisted data, parameters) and whatever its function closes over
        # are all constants of its log density's program.
        consts = list(jax.make_jaxpr(target.log_density)(jnp.zeros(target.dim)).consts)
    except Exception:  # noqa: BLE001 - the hint is a courtesy; the error above stands
        return ""
    bad = [(np.shape(c), int(np.size(c) - np.isfinite(np.asarray(c)).sum())) for c in consts
           if np.issubdtype(np.asarray(c).dtype, np.inexact) and not np.isfinite(np.asarray(c)).all()]
    if not bad:
        return ""
    shape, count = bad[0]
    return (f" The function closes over an array of shape {shape} holding {count} non-finite "
            "value(s) (NaN or inf): the data may be the cause. Drop or impute those entries.")


def _restart_params(q: Family, k: int, key: jax.Array):
    """``k`` copies of ``q`` stacked on a leading axis; copies after the first get their mean
    moved by Uniform(-2, 2) noise (the init radius of Stan and NumPyro in unconstrained
    space), so restarts explore different basins. The location is ``q.loc``, or for a flow
    its base Gaussian's; a family with neither restarts from ``q`` itself (its restarts then
    differ only in their random draws)."""
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (k,) + x.shape) if eqx.is_array(x) else x, q)
    if k == 1:
        return stacked
    where = q.location_field()
    if where is None:
        return stacked
    jitter = jax.random.uniform(key, (k, q.dim), minval=-2.0, maxval=2.0).at[0].set(0.0)
    return eqx.tree_at(where, stacked, replace_fn=lambda loc: loc + jitter)
