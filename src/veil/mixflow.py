"""Building a MixFlow and choosing its step size (Xu, Chen & Campbell 2023, "MixFlows:
principled variational inference via mixed flows").

The family itself, its map and its density are :class:`veil.families.MixFlow` (module
``veil.families.mixflows``, where the method is described); this module holds the algorithm
around it: fit a Gaussian reference with :func:`veil.fit` when none is given, pick the step size
on a grid by the ELBO, and report the result with k-hat, round-trip error and summaries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
import functools
import math
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from veil._checks import check_key as _check_key
from veil._checks import check_positive_int as _check_positive_int
from veil.diagnostics import format_khat, khat_ok, khat_verdict, psis_khat
from veil.families.gaussian import MeanField
from veil.families.mixflows import MixFlow
from veil.fit import fit
from veil.geometry.pathfinder import PathfinderResult
from veil.result import Result, VIResult, _warn_nonfinite
from veil.target import Target

__all__ = ["MixFlowResult", "mixflow"]

_KHAT_DRAWS = 2000
_SUMMARY_DRAWS = 4000
DEFAULT_STEP_SIZES = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


@eqx.filter_jit
def _draws_with_weights(q: MixFlow, key, n: int):
    x, log_q = q.sample_and_log_prob(key, n)
    return jax.vmap(q.target.to_constrained)(x), jax.vmap(q.target.log_density)(x) - log_q


@eqx.filter_jit
def _constrained_draws(q: MixFlow, key, n: int):
    return jax.vmap(q.target.to_constrained)(q.sample(key, n))


# ---------------------------------------------------------------------- tuning and result
@dataclasses.dataclass(eq=False)
class MixFlowResult(Result):
    """The outcome of :func:`mixflow`.

    Attributes:
        target: the target.
        q: the tuned :class:`MixFlow` (a veil family: draws, extended densities, objectives).
        step_sizes: the step sizes tried.
        elbos, elbo_ses: the ELBO estimate and its standard error at each.
        best: index of the chosen step size (largest ELBO estimate).
        reference_result: the ``VIResult`` of the reference fit when :func:`mixflow` fitted
            it (``None`` when a reference was given).
        wall_time: seconds for the step-size search (compilation included).
        diagnostic_key: the key the lazily computed diagnostics draw with.
    """

    target: Any
    q: MixFlow
    step_sizes: np.ndarray
    elbos: np.ndarray
    elbo_ses: np.ndarray
    best: int
    reference_result: Any
    wall_time: float
    diagnostic_key: jax.Array = dataclasses.field(repr=False)

    def __repr__(self) -> str:
        return (
            f"MixFlowResult(dim={self.q.dim}, num_maps={self.q.num_maps}, "
            f"num_leapfrog={self.q.num_leapfrog}, step_size={self.step_size:.3g}, "
            f"ELBO {self.elbo:.3f} ± {self.elbo_se:.3f})"
        )

    @property
    def step_size(self) -> float:
        return float(self.step_sizes[self.best])

    @property
    def elbo(self) -> float:
        """ELBO estimate at the chosen step size (extended space)."""
        return float(self.elbos[self.best])

    @property
    def elbo_se(self) -> float:
        return float(self.elbo_ses[self.best])

    @property
    def num_grad_evals_per_draw(self) -> int:
        """Gradient evaluations for one draw with its density."""
        return 2 * (self.q.num_maps - 1) * self.q.num_leapfrog + 1

    @functools.cached_property
    def _log_weights(self) -> np.ndarray:
        _, lw = _draws_with_weights(self.q, self.diagnostic_key, _KHAT_DRAWS)
        return np.asarray(lw, np.float64)

    @functools.cached_property
    def khat(self) -> float:
        """PSIS k-hat of the MixFlow against the (extended) target from 2000 draws."""
        lw = self._log_weights
        return psis_khat(lw) if np.isfinite(lw).all() else math.nan

    @property
    def num_nonfinite(self) -> int:
        """How many of the 2000 diagnostic draws had a non-finite log weight."""
        return int((~np.isfinite(self._log_weights)).sum())

    @functools.cached_property
    def roundtrip_error(self) -> float:
        """Median over 16 reference draws of :meth:`MixFlow.roundtrip_error`."""
        return float(np.median(self.q.roundtrip_error(jax.random.fold_in(self.diagnostic_key, 3))))

    def draws(self, n: int, *, key: jax.Array) -> dict[str, jax.Array]:
        """``n`` i.i.d. constrained draws from the MixFlow.

        Examples:
            >>> import jax, jax.numpy as jnp, veil
            >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)
            >>> mf = veil.mixflow(t, veil.MeanField(2, init_scale=1.0), key=jax.random.key(0),
            ...                   num_maps=10, num_leapfrog=5, num_elbo_draws=8)
            >>> mf.draws(100, key=jax.random.key(1))["z"].shape
            (100, 2)
        """


        _check_key(key)
        draws = _constrained_draws(self.q, key, _check_positive_int("n", n))
        _warn_nonfinite(draws)  # a trajectory can leave the finite region at a large step
        return draws

    _subject = "these draws"
    _arviz_note = "independent draws of the MixFlow"

    def _summary_header(self) -> str:
        return (
            f"veil MixFlow: dim {self.q.dim}, {self.q.num_maps} maps x {self.q.num_leapfrog} "
            f"leapfrog steps of {self.step_size:.3g}, ELBO {self.elbo:.2f} ± {self.elbo_se:.2f}"
        )

    def verdict(self) -> tuple[list[str], bool]:
        """The k-hat on the extended space, the step-size search and the round-trip error in
        plain words, and a yes/no."""
        khat = self.khat
        ok = khat_ok(khat)
        grid = ", ".join(f"{s:g}: {e:.2f}" for s, e in zip(self.step_sizes, self.elbos))
        lines = [
            f"PSIS k-hat on the extended space = {format_khat(khat)}: {khat_verdict(khat)}",
            f"Step size chosen by ELBO over {grid}.",
        ]
        if self.step_sizes.size > 1 and self.step_size in (self.step_sizes.min(), self.step_sizes.max()):
            lines.append("The chosen step size is at the edge of the grid: widen step_sizes=.")
        err = self.roundtrip_error
        lines.append(
            f"Round-trip error of the numerical inverse: {err:.2g} (median, reference sds)"
            + ("" if err < 0.1 else ": the density is computed off the true backward path; "
               "use fewer maps or jax_enable_x64.")
        )
        if self.num_nonfinite:
            ok = False
            lines.append(f"{self.num_nonfinite} of {_KHAT_DRAWS} draws had non-finite log weights.")
        lines.append("Verdict: OK to use." if ok else f"Verdict: do NOT trust {self._subject} as they stand.")
        return lines, ok

    def _plot_title(self) -> str:
        return f"MixFlow, step size {self.step_size:.3g}; k-hat {format_khat(self.khat)}"


def _as_reference(reference):

    if isinstance(reference, (VIResult, PathfinderResult)):
        return reference.q
    return reference


def mixflow(
    target,
    reference=None,
    *,
    key: PRNGKeyArray,
    num_maps: int = 100,
    num_leapfrog: int = 50,
    step_size: float | None = None,
    step_sizes: Sequence[float] = DEFAULT_STEP_SIZES,
    num_elbo_draws: int = 32,
) -> MixFlowResult:
    """Build a MixFlow over ``target`` and choose its step size by the ELBO.

    Args:
        target: a :class:`veil.Target`.
        reference: a fitted ``MeanField`` or ``FullRank`` (or the ``VIResult`` /
            ``PathfinderResult`` holding one); default: ``veil.fit(target, MeanField(dim))``
            with the default settings (the paper's reference is a mean-field Gaussian).
        key: a JAX PRNG key.
        num_maps: ``N``, map applications averaged (see the module docstring on choosing it).
        num_leapfrog: leapfrog steps per map. Longer trajectories between refreshments mixed
            better in our runs (Inference Gym banana: sd ratios 0.87-0.94 with 50 steps,
            0.40-0.64 with 10, both at 100 maps; docs/benchmarks/mixflows.md), at 5x the cost.
        step_size: use this step size (no search); default: the grid ``step_sizes``.
        step_sizes: step sizes tried, in reference standard deviations; the one with the
            largest ELBO estimate (same random reference draws for all) is kept.
        num_elbo_draws: reference trajectories per ELBO estimate.

    Returns:
        :class:`MixFlowResult` (``.q`` is the :class:`MixFlow`).

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)
        >>> mf = veil.mixflow(t, veil.MeanField(2, init_scale=1.0), key=jax.random.key(0),
        ...                   num_maps=10, num_leapfrog=5, num_elbo_draws=8)
        >>> mf.q.num_maps
        10
    """
    _check_key(key)
    if not isinstance(target, Target):
        raise TypeError(
            f"target must be a veil.Target, got {type(target).__name__}; build one with "
            "veil.Target.from_logdensity(fn, dim) or veil.Target.from_numpyro(model, ...)."
        )
    num_maps = _check_positive_int("num_maps", num_maps)
    num_leapfrog = _check_positive_int("num_leapfrog", num_leapfrog)
    num_elbo_draws = _check_positive_int("num_elbo_draws", num_elbo_draws)
    if num_elbo_draws < 2:
        raise ValueError("num_elbo_draws must be at least 2 (the ELBO's standard error needs two).")
    grid = [step_size] if step_size is not None else list(step_sizes)
    if not grid:
        raise ValueError("step_sizes is empty; give at least one step size.")
    for s in grid:
        if isinstance(s, bool) or not isinstance(s, (int, float, np.floating)) or not (
            math.isfinite(s) and s > 0
        ):
            raise ValueError(f"step sizes must be positive finite numbers, got {s!r}.")
    ref_key, elbo_key, diag_key = jax.random.split(key, 3)
    reference_result = None
    if reference is None:
        reference_result = fit(target, MeanField(target.dim), key=ref_key, progress=False)
        reference = reference_result.q
    reference = _as_reference(reference)
    flows = [
        MixFlow(target, reference, step_size=float(s), num_leapfrog=num_leapfrog, num_maps=num_maps)
        for s in grid
    ]
    value, grad = jax.value_and_grad(target.log_density)(reference.mean)
    if not (bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))):
        raise ValueError(
            "The log density or its gradient is not finite at the reference's mean; the map "
            "cannot start there. Fit the reference first (veil.fit) and check the model."
        )
    start = time.perf_counter()
    estimates = [f.elbo(elbo_key, num_elbo_draws) for f in flows]  # common random numbers
    wall = time.perf_counter() - start
    elbos = np.array([e[0] for e in estimates])
    ses = np.array([e[1] for e in estimates])
    if not np.isfinite(elbos).any():
        raise RuntimeError(
            "Every step size gave a non-finite ELBO estimate: the trajectories left the region "
            "where the log density is finite. Try smaller step_sizes or fewer num_leapfrog."
        )
    best = int(np.nanargmax(np.where(np.isfinite(elbos), elbos, -np.inf)))
    return MixFlowResult(
        target, flows[best], np.asarray(grid, float), elbos, ses, best, reference_result, wall, diag_key
    )
