"""Diagnostics: the stopping rule, Pareto-smoothed importance sampling (PSIS) k-hat, and the
variance of gradient estimators.

The stopping rule and k-hat run on the host, between compiled chunks or after a fit.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import equinox as eqx
import jax
import jax.numpy as jnp

PROBE_BATCH = 25  # steps per probe row; the driver's batch length (kept equal by a test)

__all__ = [
    "StopRule", "Decision", "psis_khat", "khat_verdict", "khat_ok", "format_khat", "psis_moment_shift", "psis_weights",
    "moment_shift", "MomentShift", "gradient_variance", "GradientVariance",
    "kernel_stein_discrepancy",
]


class Decision(NamedTuple):
    """What the stopping rule tells the driver after a chunk."""

    action: str  # "continue", "decay" (multiply the step size by ``factor``) or "stop"
    factor: float = 1.0
    reason: str = ""
    window: int = 0  # steps in the final averaging window (for "stop")
    final_loss: float = math.nan


def _split_half(x: np.ndarray, num_batches: int) -> tuple[float, float, float, float]:
    """Drop of the mean between the two halves of ``x``, its standard error, and the mean of
    ``x`` with its standard error, all from batch means (robust to autocorrelation up to the
    batch length)."""
    b = np.array([c.mean() for c in np.array_split(x, num_batches)])
    h = num_batches // 2
    first, second = b[:h], b[h:]
    drop = first.mean() - second.mean()
    se_drop = math.sqrt(first.var(ddof=1) / len(first) + second.var(ddof=1) / len(second))
    # The window mean's error uses deviations from each half's own mean, so a trend that the
    # split-half test let through does not inflate it.
    resid = np.concatenate([first - first.mean(), second - second.mean()])
    se_mean = math.sqrt(np.sum(resid**2) / (num_batches - 2) / num_batches)
    return float(drop), se_drop, float(b.mean()), se_mean


@dataclass(frozen=True)
class StopRule:
    """Noise-robust stopping with step-size decay and iterate averaging.

    The run proceeds in *stages* at a fixed step size, each judged once it holds
    :attr:`min_stage` steps (``veil.fit`` ends its chunks there and every ``min_stage``
    steps after). A stage is *stationary* when, over the
    window made of its last half (at least ``min_window`` steps), the mean loss of the first
    half of the window exceeds that of the second half by no more than ``z`` standard errors
    (batch means over ``num_batches`` batches) or ``atol``. The loss of a stationary stage is
    inflated by the optimizer's own noise, which shrinks with the step size, so the rule then
    compares the stage's mean loss with the previous stage's:

    1. while lowering the step size still lowers the mean loss by more than ``z`` combined
       standard errors (and ``atol`` nats), or fewer than ``min_decays`` reductions were made,
       the step size is multiplied by ``decay`` and a new stage starts;
    2. otherwise (or after ``max_decays`` reductions) the current step size is the last one,
       and the run stops as soon as the iterates have stopped drifting: for each watched
       parameter coordinate, the squared t statistic of the difference between the window's
       two halves (batch means); the median over each parameter's coordinates, and so the
       largest of these medians, must not exceed ``max_drift`` (about 0.5 for independent
       batch means; the default 3 leaves room for the autocorrelation that small steps give them). The
       loss alone can look flat in an ill-conditioned problem while parameters still travel
       along flat directions; this test catches that.

    Few, mild decays (by default at most two halvings) and a long averaging window are
    deliberate: the iterates' noise variance grows with the step size but their
    autocorrelation time shrinks with it, so the error of a window average depends mostly on
    the window's length, while a small step slows the approach to the optimum by the same
    factor it lowers the noise. Measured on Inference Gym targets (BENCHMARKS.md): four
    decays by 4x ended radon, item response and stochastic volatility at the 20,000-step
    cap; two halvings converge in 2-11k steps with the same or a higher ELBO.

    If neither happens before ``max_steps`` the run ends with ``stop_reason="max_steps"`` and
    the result says it is not converged. The returned parameters are the average of the
    iterates over the final window (Polyak-Ruppert averaging), which removes most of the
    optimizer noise left at the last step size. The rule follows the structure of Welandawe
    et al. (2022), "Robust, Automated, and Accurate Black-box Variational Inference"
    (stationarity detection, step-size decay, iterate averaging), with loss-based and
    split-half drift tests in place of their iterate R-hat and KL estimate.

    Args:
        min_window: fewest steps a stationarity test looks at (measured: 100 with earlier
            checks let EightSchools "converge" after 500 steps, 2 nats short of the ELBO).
        num_batches: batches for the batch-means standard errors (even).
        decay: step-size factor between stages.
        min_decays: fewest step-size reductions before the rule may stop (a noisy
            comparison between two stages alone can miss a real gain).
        max_decays: most step-size reductions.
        atol: changes of the mean loss smaller than this (nats) count as no change.
        z: standard errors a change must exceed to count.
        max_drift: largest median squared split-half t statistic of a parameter that
            counts as settled. Without drift and with independent batch means a squared t
            is F(1, num_batches - 2) distributed (median about 0.5); at a small final step
            the iterates' batch means are autocorrelated, which inflates it, so the limit
            sits well above 0.5, while a still-converging ill-conditioned Gaussian sits near
            12. Measured (docs/benchmarks/stopping-rule-drift-limit.md): 3 against the earlier 2 took 11-13%
            fewer steps on radon and the ill-conditioned Gaussian (FullRank, 11 seeds) and up
            to 22% on stochastic volatility. Radon, stochastic volatility and item response
            were as accurate; the ill-conditioned Gaussian's mean stopped a little less
            converged (median error 0.019 posterior sd against 0.009, 0.006 nats of ELBO).
            MeanField on the ill-conditioned Gaussian stopped at 800-2,800 steps where 2
            ran on to the 20,000-step cap at the same ELBO. 1.0 made German credit run 1.6x
            longer for the same accuracy; 4 let the ill-conditioned Gaussian stop with three
            times the largest mean error.
        drift_atol: a watched coordinate whose two half-window means differ by at most this
            counts as settled whatever its t statistic. 0 for stochastic fits; a
            deterministic method (particles) has no noise to measure drift against, so any
            trend, however small, is "significant", and it needs a tolerance in the units of
            what it watches instead.
        decay_max_drift: if set, a step-size reduction also waits for the iterates to settle:
            the drift statistic (as for stopping) must not exceed this, else the stage goes on
            at its larger step, which travels faster along a flat direction. ``None`` (the
            default): reductions look at the loss only. Measured (docs/benchmarks/where-a-step-goes.md):
            4 halved radon's steps (median 8,000 -> 4,000 over 7 seeds) but cost 1.1-1.2x on
            stochastic volatility and item response and 2.3x on the banana, so it is not the
            default.
    """

    min_window: int = 200
    num_batches: int = 10
    decay: float = 0.5
    min_decays: int = 1
    max_decays: int = 2
    atol: float = 1e-3
    z: float = 2.0
    max_drift: float = 3.0
    drift_atol: float = 0.0
    decay_max_drift: float | None = None

    def __post_init__(self):
        if self.min_window < 20 or self.num_batches < 4 or self.num_batches % 2:
            raise ValueError("StopRule needs min_window >= 20 and an even num_batches >= 4.")
        if self.decay_max_drift is not None and not self.decay_max_drift > 0:
            raise ValueError(f"decay_max_drift must be None or positive, got {self.decay_max_drift!r}.")
        if not 0 < self.decay < 1:
            raise ValueError(f"decay must lie in (0, 1), got {self.decay}.")
        if not 0 <= self.min_decays <= self.max_decays:
            raise ValueError("StopRule needs 0 <= min_decays <= max_decays.")

    @property
    def min_stage(self) -> int:
        """Fewest steps of a stage before it is judged: two windows, and at least
        ``num_batches`` probe batches for the drift test's batch means."""
        return max(2 * self.min_window, self.num_batches * PROBE_BATCH)

    def start(self, groups=None) -> "_Tracker":
        """A fresh host-side tracker for one run; ``groups`` labels the watched coordinates
        with the parameter each belongs to (one group if ``None``)."""
        return _Tracker(self, groups=None if groups is None else np.asarray(groups))


def _drift_statistic(rows: np.ndarray, num_batches: int, groups: np.ndarray | None = None,
                     atol: float = 0.0) -> float:
    """Largest, over groups of coordinates, of the median squared split-half t statistic.

    ``rows`` are consecutive means of the iterates (time x coordinates); ``groups`` labels
    each coordinate with its parameter (one group if ``None``). For each coordinate the
    difference between the means of the window's two halves is divided by its batch-means
    standard error. With no drift a squared t is F(1, nb-2) distributed, median about 0.5,
    while parameters still travelling across the window give large values. Within a group the
    median (not the mean) keeps a few slowly mixing coordinates, whose batch means are
    autocorrelated, from holding the run forever; across groups the maximum keeps a small
    parameter that still travels as a whole (the location vector along a flat direction)
    from being outvoted by a large one that has settled (the entries of a d x d factor).
    Coordinates that never move (zero variance) are left out; those whose halves differ by
    at most ``atol`` count as settled (statistic 0).
    """
    b = np.stack([g.mean(0) for g in np.array_split(rows, num_batches)])
    h = num_batches // 2
    diff = b[:h].mean(0) - b[h:].mean(0)
    var = b[:h].var(0, ddof=1) / h + b[h:].var(0, ddof=1) / h
    groups = np.zeros(rows.shape[1], np.int64) if groups is None else np.asarray(groups)
    keep = var > 1e-30
    t2 = np.where(keep, diff**2 / np.where(keep, var, 1.0), np.nan)
    t2 = np.where(keep & (np.abs(diff) <= atol), 0.0, t2)
    stats = [np.median(t2[(groups == g) & keep]) for g in np.unique(groups[keep])]
    return float(max(stats)) if stats else 0.0


def _tail(chunks: list[np.ndarray], n: int) -> np.ndarray:
    """The last ``n`` rows of a list of arrays, concatenating only the chunks needed (a long
    stage holds many chunks; the tests look at its last half)."""
    kept, count = [], 0
    for c in reversed(chunks):
        if count >= n:
            break
        kept.append(c)
        count += len(c)
    return np.concatenate(kept[::-1])[-n:] if kept else np.zeros(0)


@dataclass
class _Tracker:
    rule: StopRule
    groups: np.ndarray | None = None
    stage: list = field(default_factory=list)
    probes: list = field(default_factory=list)
    stage_len: int = 0
    previous: tuple[float, float] | None = None
    decays: int = 0
    final_stage: bool = False
    last_drift: float = math.nan

    def current_window(self) -> int:
        return max(min(self.rule.min_window, self.stage_len), self.stage_len // 2)

    def window_mean(self) -> float:
        x = self._window()
        return float(np.mean(x)) if x.size else math.nan

    def _window(self) -> np.ndarray:
        x = _tail(self.stage, self.current_window())
        return x[np.isfinite(x)]

    def update(self, losses: np.ndarray, probe_means: np.ndarray) -> Decision:
        r = self.rule
        self.stage.append(np.asarray(losses, dtype=np.float64))
        self.probes.append(np.asarray(probe_means, dtype=np.float64))
        self.stage_len += len(losses)
        if self.stage_len < r.min_stage:
            return Decision("continue")
        x = self._window()
        if x.size < r.min_window // 2:  # mostly skipped steps: nothing to judge yet
            return Decision("continue")
        drop, se_drop, mean, se_mean = _split_half(x, r.num_batches)
        if drop > max(r.z * se_drop, r.atol):
            return Decision("continue")  # the loss still falls visibly at this step size
        if not self.final_stage and self.previous is not None and self.decays >= r.min_decays:
            prev_mean, prev_se = self.previous
            # A smaller step no longer buys a lower loss: this is the last step size.
            self.final_stage = prev_mean - mean <= max(r.z * math.hypot(prev_se, se_mean), r.atol)
        if self.decays >= r.max_decays:
            self.final_stage = True
        if self.final_stage:
            # Stop only once the iterates themselves have settled: in an ill-conditioned
            # problem the loss can look flat while parameters still travel along flat
            # directions, and stopping then would be stopping early.
            self.last_drift = self._drift()
            if self.last_drift > r.max_drift:
                return Decision("continue")
            return Decision(
                "stop",
                reason="converged: the loss stopped improving when the step size was lowered "
                "and the parameters stopped drifting" if self.decays else
                "converged: the loss settled and the parameters stopped drifting",
                window=self.current_window(),
                final_loss=mean,
            )
        if r.decay_max_drift is not None:
            self.last_drift = self._drift()
            if self.last_drift > r.decay_max_drift:  # still travelling: keep the larger step
                return Decision("continue")
        self.decays += 1
        self.previous = (mean, se_mean)
        self.stage, self.probes, self.stage_len = [], [], 0
        return Decision("decay", factor=r.decay)

    def _drift(self) -> float:
        """The drift statistic of the current window's iterates (:func:`_drift_statistic`)."""
        r = self.rule
        rows = _tail(self.probes, max(r.num_batches, -(-self.current_window() // PROBE_BATCH)))
        return _drift_statistic(rows, r.num_batches, self.groups, r.drift_atol) if rows.shape[1] else 0.0


# ----------------------------------------------------------------------------- PSIS k-hat
# Log weights whose largest and smallest differ by at most this many nats are an exact fit: every
# importance ratio lies within 0.1% of every other, so no importance-sampling estimate can move
# by more than that from plain draws of q, whatever a Pareto fit of such a tail would say.
EXACT_SPREAD = 1e-3


def psis_khat(log_weights) -> float:
    """Pareto k-hat of importance log weights ``log p(z) - log q(z)``, ``z ~ q``.

    Uses ArviZ's Pareto-smoothed importance sampling (``arviz.psislw``). k-hat estimates the
    shape of the upper tail of the importance ratios: below 0.5 the ratios have finite
    variance and ``q`` covers the target well; above 0.7 importance sampling (and so ``q`` as
    a stand-in for the target) is unreliable.

    Two extremes are handled before and after the Pareto fit, where it would answer ``inf``
    for a tail that is in fact short:

    * log weights within :data:`EXACT_SPREAD` nats of each other (an exact fit: the ratio
      ``p / q`` is constant up to rounding) return ``-inf``, "no tail at all";
    * log weights that take few distinct values at the top (float32 rounding of a near-exact
      fit of a log density in the hundreds or thousands of nats: many draws tie at the Pareto
      fit's cut-off, leaving it fewer than 5 tail values, and ArviZ answers ``inf``) are
      dithered by uniform noise of one rounding step (the smallest gap between distinct
      values, a fixed seed) and fitted again: rounding to a grid bounds the tail, it cannot
      make it heavy.

    Examples:
        >>> import numpy as np
        >>> psis_khat(np.full(1000, -3.0))      # exact fit: constant log weights
        -inf
        >>> bool(psis_khat(np.random.default_rng(0).standard_normal(1000)) < 0.5)
        True

    References:
        Vehtari, Simpson, Gelman, Yao & Gabry (2024), Pareto Smoothed Importance Sampling;
        Yao, Vehtari, Simpson & Gelman (2018), Yes, but Did It Work?: Evaluating Variational
        Inference.
    """
    lw = np.asarray(log_weights, dtype=np.float64).ravel()
    if not np.isfinite(lw).all():
        raise ValueError("log weights hold non-finite values; k-hat is undefined.")
    if lw.size < 2 or np.ptp(lw) <= EXACT_SPREAD:
        return -math.inf
    khat = _arviz_khat(lw)
    if khat == math.inf:  # ties at the cut-off (see above): dither by one rounding step
        step = np.diff(np.unique(lw)).min()
        khat = _arviz_khat(lw + np.random.default_rng(0).uniform(-step / 2, step / 2, lw.size))
    return khat


def _arviz_khat(lw: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's import banner and its small-sample notes
        import arviz as az

        _, khat = az.psislw(lw.copy())
    return float(khat)


# A reweighted mean this many of q's sds from q's own, or a reweighted sd this factor from q's,
# marks q as off in that coordinate (and the shift must exceed 4 of its standard errors).
MEAN_SHIFT = 0.2
SD_FACTOR = 1.25


class MomentShift(NamedTuple):
    """What Pareto-smoothed importance reweighting does to ``q``'s moments (per coordinate)."""

    mean_shift: np.ndarray  # (reweighted mean - q's mean) / q's sd
    sd_ratio: np.ndarray  # reweighted sd / q's sd
    ess: float  # effective sample size of the smoothed weights
    off: bool  # whether some coordinate moved by more than the limits (and its noise)

    def describe(self, names: list[str]) -> str:
        j = int(np.argmax(np.abs(self.mean_shift)))
        i = int(np.argmax(np.abs(np.log(self.sd_ratio))))
        return (
            "Importance reweighting of q's draws (reliable at this k-hat) moves q's moments: "
            f"the mean of {names[j]} by {self.mean_shift[j]:+.2f} of q's sds, the sd of "
            f"{names[i]} by a factor {self.sd_ratio[i]:.2f} (ESS {self.ess:.0f}): q is off there. "
            "The summary's psis columns and res.resampled_draws correct for it as far as q "
            "covers the target; or fit a richer family (a flow; veil.HierarchicalGaussian for a "
            "hierarchy's scales)."
        )


def psis_weights(log_weights) -> np.ndarray:
    """Pareto-smoothed importance weights (ArviZ's ``psislw``), normalised to sum to one.

    Examples:
        >>> import numpy as np
        >>> w = psis_weights(np.log(np.random.default_rng(0).pareto(3.0, 1000) + 1.0))
        >>> bool(abs(w.sum() - 1.0) < 1e-12 and w.min() > 0)
        True
    """
    lw = np.asarray(log_weights, np.float64).ravel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's import banner and small-sample notes
        import arviz as az

        smoothed, _ = az.psislw(lw - lw.max())
    w = np.exp(smoothed - smoothed.max())
    return w / w.sum()


def psis_moment_shift(z, log_weights) -> MomentShift:
    """Moments of ``q``'s draws ``z`` (``[n, d]``) against the same draws reweighted by their
    Pareto-smoothed importance weights (ArviZ's ``psislw``).

    Where k-hat is below 0.7 the reweighted mean and sd estimate the target's (Vehtari et
    al. 2024), so their distance from ``q``'s own says how far ``q`` is off in each
    coordinate, a question k-hat alone does not answer: a Gaussian fit of a banana or a
    Student-t can have k-hat 0.4-0.7 ("fair") with sds 20-40% off (docs/benchmarks/verdict-banks.md).
    An exact fit has constant weights and no shift at all. ``off`` is true when some
    coordinate's mean moves by more than ``MEAN_SHIFT`` of q's sds or its sd by more than a
    factor ``SD_FACTOR``, and by more than 4 standard errors (``1 / sqrt(ESS)`` for the mean,
    ``1 / sqrt(2 ESS)`` for the log sd; 4, not 2, because every coordinate is tested).

    Examples:
        >>> import numpy as np
        >>> z = np.random.default_rng(0).standard_normal((2000, 1))
        >>> shift = psis_moment_shift(z, -0.5 * (z[:, 0] - 1.0) ** 2 + 0.5 * z[:, 0] ** 2)  # p = N(1, 1)
        >>> bool(shift.off and abs(shift.mean_shift[0] - 1.0) < 0.15)
        True
    """
    return moment_shift(z, psis_weights(log_weights))


def moment_shift(z, w) -> MomentShift:
    """:func:`psis_moment_shift` for weights already smoothed and normalised
    (:func:`psis_weights`), so a caller that keeps them does not smooth them twice."""
    z = np.asarray(z, np.float64)
    w = np.asarray(w, np.float64)
    ess = float(1.0 / np.sum(w**2))
    m_q, sd_q = z.mean(0), z.std(0, ddof=1)
    m_w = w @ z
    sd_w = np.sqrt(np.maximum(w @ (z - m_w) ** 2, 0.0) * len(w) / max(len(w) - 1, 1))
    mean_shift = (m_w - m_q) / sd_q
    sd_ratio = sd_w / sd_q
    mean_off = np.abs(mean_shift) > max(MEAN_SHIFT, 4.0 / math.sqrt(ess))
    sd_off = np.abs(np.log(sd_ratio)) > max(math.log(SD_FACTOR), 4.0 / math.sqrt(2.0 * ess))
    return MomentShift(mean_shift, sd_ratio, ess, bool(mean_off.any() or sd_off.any()))


def format_khat(khat: float) -> str:
    """k-hat for a report: two decimals, or ``"exact"`` for constant log weights (``-inf``).

    Examples:
        >>> format_khat(float("-inf")), format_khat(0.4321)
        ('exact', '0.43')
    """
    return "exact" if khat == -math.inf else f"{khat:.2f}"


def khat_ok(khat: float) -> bool:
    """Whether a k-hat lets a fit be trusted: below 0.7 (``-inf``, an exact fit, included;
    ``nan``, not computable, excluded)."""
    return bool(khat < 0.7)


def khat_verdict(khat: float, family: str | None = None) -> str:
    """Plain-words verdict for a k-hat value (thresholds of Vehtari et al.); ``family``, the
    fitted family's class name, picks a remedy it does not already use."""
    if khat == -math.inf:
        return (
            "the log weights are constant (within 0.001 nats): q matches the target up to "
            "its normalising constant where it puts mass"
        )
    if not math.isfinite(khat):
        return "unknown: k-hat could not be computed (non-finite log weights)"
    if khat < 0.5:
        return "good: q covers the target well (k-hat < 0.5)"
    if khat < 0.7:
        return "fair: usable for means and sds, tails may be off (0.5 <= k-hat < 0.7)"
    return (
        "unreliable: q misses mass the target has (k-hat >= 0.7); do not trust these "
        f"estimates, {_remedy(family)}"
    )


def _remedy(family: str | None) -> str:
    if family in ("MeanField", "LowRank", "Gamma", "Beta", "VonMises", "Dirichlet"):
        return "try a richer family (FullRank, a flow) or reparameterise the model"
    if family in ("FullRank", "HierarchicalGaussian"):
        return ("try a flow over this fit (veil.flows.coupling(d, key=..., base=res.q)), a "
                "mass-covering objective (veil.ChiSquare()), or reparameterise the model "
                "(non-centred hierarchies)")
    if family is None:
        return "try a richer family (FullRank, a flow) or reparameterise the model"
    return ("try a mass-covering objective (veil.ChiSquare()), a larger flow or mixture, or "
            "reparameterise the model")


# ----------------------------------------------------------------------------- gradient variance
def kernel_stein_discrepancy(x, scores, c: float = 1.0, beta: float = -0.5):
    """Kernel Stein discrepancy of the points ``x`` from the density whose scores
    ``grad log p`` at them are ``scores`` (Gorham & Mackey 2017, "Measuring Sample Quality
    with Kernels"), with their inverse multiquadric kernel ``k(x, y) = (c^2 + |x - y|^2)^beta``,
    ``-1 < beta < 0``, for which the discrepancy goes to zero only if the points converge
    to ``p``.

    ``KSD^2 = (1/n^2) sum_ij k_p(x_i, x_j)`` (the V-statistic) with the Stein kernel
    ``k_p(x, y) = s(x).s(y) k + s(x).grad_y k + s(y).grad_x k + tr(grad_x grad_y k)``. With
    ``r = x - y`` and ``u = c^2 + |r|^2``: ``grad_x k = 2 beta u^(beta-1) r = -grad_y k`` and
    ``tr(grad_x grad_y k) = -2 beta [d u^(beta-1) + 2 (beta-1) u^(beta-2) |r|^2]``. It needs
    only the scores, not draws from ``p`` or its normalising constant. Returns ``KSD`` (the
    square root), in the units of the scores.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.random.normal(jax.random.key(0), (500, 2))
        >>> near = kernel_stein_discrepancy(x, -x)          # N(0, I): scores -x
        >>> far = kernel_stein_discrepancy(x, -(x - 1.0))   # N(1, I)
        >>> bool(near < 0.1 < far)
        True
    """
    n, d = x.shape
    r2 = jnp.maximum(jnp.sum(x**2, -1)[:, None] + jnp.sum(x**2, -1)[None, :] - 2.0 * x @ x.T, 0.0)
    u = c**2 + r2
    k = u**beta
    k1 = 2.0 * beta * u ** (beta - 1.0)  # grad_x k = k1 * (x - y)
    sx = jnp.sum(scores * x, axis=1)  # s_i . x_i
    s_dot_x = scores @ x.T  # [i, j] = s_i . x_j
    ss = scores @ scores.T
    # s_i . grad_y k(x_i, x_j) = -k1 (s_i . x_i - s_i . x_j); s_j . grad_x k = k1 (s_j . x_i - s_j . x_j)
    cross = -k1 * (sx[:, None] - s_dot_x) + k1 * (s_dot_x.T - sx[None, :])
    trace = -2.0 * beta * (d * u ** (beta - 1.0) + 2.0 * (beta - 1.0) * u ** (beta - 2.0) * r2)
    return jnp.sqrt(jnp.maximum(jnp.sum(ss * k + cross + trace), 0.0)) / n


class GradientVariance(NamedTuple):
    """Per-parameter mean and variance of a gradient estimator over independent keys."""

    mean: object  # pytree like q: the mean gradient of the loss
    variance: object  # pytree like q: per-entry variance of one gradient estimate
    total: float  # sum of all per-entry variances (trace of the covariance)
    mean_sq_norm: float  # squared norm of the mean gradient
    n: int

    @property
    def snr(self) -> float:
        """``|mean|^2 / total``: the gradient's signal-to-noise ratio (squared)."""
        return self.mean_sq_norm / self.total if self.total > 0 else math.inf


def _gradient_samples(objective, q, target, keys):
    def one(key):
        return eqx.filter_grad(lambda q: objective(q, target, key)[0])(q)

    return jax.vmap(one)(keys)


def gradient_variance(objective, q, target, key, n: int = 1000) -> GradientVariance:
    """Variance of ``objective``'s gradient estimator at ``q``, from ``n`` independent keys.

    One gradient of the loss per key (each with the objective's own draws per step); the
    per-entry variance over keys is the variance a single optimisation step sees. Compare
    estimators on your own model, e.g. ``gradient_variance(veil.ELBO(estimator=veil.STL()),
    q, target, key)`` against ``veil.Reparam()``.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> from veil.diagnostics import gradient_variance
        >>> log_p = lambda z: -0.5 * jnp.sum(z**2)
        >>> exact = veil.MeanField(3, init_scale=1.0)  # q equals the target
        >>> gv = gradient_variance(veil.ELBO(estimator=veil.STL()), exact, log_p, jax.random.key(0), 200)
        >>> gv.total < 1e-10  # STL: zero variance at an exact fit
        True
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2 (a variance needs two samples), got {n!r}.")
    grads = eqx.filter_jit(_gradient_samples)(objective, q, target, jax.random.split(key, n))
    grads = eqx.filter(grads, eqx.is_array)
    mean = jax.tree.map(lambda g: jnp.mean(g, 0), grads)
    var = jax.tree.map(lambda g: jnp.var(g, 0, ddof=1), grads)
    total = float(sum(jnp.sum(v) for v in jax.tree.leaves(var)))
    sq = float(sum(jnp.sum(m**2) for m in jax.tree.leaves(mean)))
    return GradientVariance(mean, var, total, sq, n)
