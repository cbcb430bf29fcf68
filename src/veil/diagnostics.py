"""Diagnostics: the stopping rule and Pareto-smoothed importance sampling (PSIS) k-hat.

Everything here runs on the host, between compiled chunks or after a fit.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

__all__ = ["StopRule", "Decision", "psis_khat", "khat_verdict"]


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

    The run proceeds in *stages* at a fixed step size. A stage is *stationary* when, over the
    window made of its last half (at least ``min_window`` steps), the mean loss of the first
    half of the window exceeds that of the second half by no more than ``z`` standard errors
    (batch means over ``num_batches`` batches) or ``atol``. The loss at a stationary stage is
    inflated by the optimizer's own noise, which shrinks with the step size, so the rule then
    compares the stage's mean loss with the previous stage's:

    * if lowering the step size did not lower the mean loss by more than ``z`` combined
      standard errors (or ``atol`` nats), and the step size has been lowered at least
      ``min_decays`` times, the fit has *converged*;
    * else the step size is multiplied by ``decay`` and a new stage starts, at most
      ``max_decays`` times (then the fit stops as converged at the smallest step size).

    The returned parameters are the average of the iterates over the final window (Polyak-
    Ruppert averaging), which removes most of the remaining optimizer noise. The rule follows
    the structure of Welandawe et al. (2022), "Robust, Automated, and Accurate Black-box
    Variational Inference", with a loss-based test in place of their iterate R-hat.

    Args:
        min_window: fewest steps a stationarity test looks at.
        num_batches: batches for the batch-means standard errors (even).
        decay: step-size factor between stages.
        min_decays: fewest step-size reductions before the rule may stop (a noisy
            comparison between two stages alone can miss a real gain).
        max_decays: most step-size reductions before stopping.
        atol: changes of the mean loss smaller than this (nats) count as no change.
        z: standard errors a change must exceed to count.
    """

    min_window: int = 200
    num_batches: int = 10
    decay: float = 0.25
    min_decays: int = 2
    max_decays: int = 4
    atol: float = 1e-3
    z: float = 2.0

    def __post_init__(self):
        if self.min_window < 20 or self.num_batches < 4 or self.num_batches % 2:
            raise ValueError("StopRule needs min_window >= 20 and an even num_batches >= 4.")
        if not 0 < self.decay < 1:
            raise ValueError(f"decay must lie in (0, 1), got {self.decay}.")
        if not 0 <= self.min_decays <= self.max_decays:
            raise ValueError("StopRule needs 0 <= min_decays <= max_decays.")

    def start(self) -> "_Tracker":
        """A fresh host-side tracker for one run."""
        return _Tracker(self)


@dataclass
class _Tracker:
    rule: StopRule
    stage: list = field(default_factory=list)
    stage_len: int = 0
    previous: tuple[float, float] | None = None
    decays: int = 0
    last: tuple[float, int] = (math.nan, 0)

    def current_window(self) -> int:
        return max(min(self.rule.min_window, self.stage_len), self.stage_len // 2)

    def window_mean(self) -> float:
        x = self._window()
        return float(np.mean(x)) if x.size else math.nan

    def _window(self) -> np.ndarray:
        x = np.concatenate(self.stage)[-self.current_window():] if self.stage else np.zeros(0)
        return x[np.isfinite(x)]

    def update(self, losses: np.ndarray) -> Decision:
        r = self.rule
        self.stage.append(np.asarray(losses, dtype=np.float64))
        self.stage_len += len(losses)
        if self.stage_len < 2 * r.min_window:
            return Decision("continue")
        x = self._window()
        if x.size < r.min_window // 2:  # mostly skipped steps: nothing to judge yet
            return Decision("continue")
        drop, se_drop, mean, se_mean = _split_half(x, r.num_batches)
        if drop > max(r.z * se_drop, r.atol):
            return Decision("continue")
        window = self.current_window()
        if self.previous is not None and self.decays >= r.min_decays:
            prev_mean, prev_se = self.previous
            gain = prev_mean - mean
            if gain <= max(r.z * math.hypot(prev_se, se_mean), r.atol):
                return Decision(
                    "stop",
                    reason="converged: the loss stopped improving when the step size was lowered",
                    window=window,
                    final_loss=mean,
                )
        if self.decays >= r.max_decays:
            return Decision(
                "stop",
                reason="converged at the smallest step size",
                window=window,
                final_loss=mean,
            )
        self.decays += 1
        self.previous = (mean, se_mean)
        self.stage, self.stage_len = [], 0
        return Decision("decay", factor=r.decay)


# ----------------------------------------------------------------------------- PSIS k-hat
def psis_khat(log_weights) -> float:
    """Pareto k-hat of importance log weights ``log p(z) - log q(z)``, ``z ~ q``.

    Uses ArviZ's Pareto-smoothed importance sampling (``arviz.psislw``). k-hat estimates the
    shape of the upper tail of the importance ratios: below 0.5 the ratios have finite
    variance and ``q`` covers the target well; above 0.7 importance sampling (and so ``q`` as
    a stand-in for the target) is unreliable.

    References:
        Vehtari, Simpson, Gelman, Yao & Gabry (2024), Pareto Smoothed Importance Sampling;
        Yao, Vehtari, Simpson & Gelman (2018), Yes, but Did It Work?: Evaluating Variational
        Inference.
    """
    lw = np.asarray(log_weights, dtype=np.float64).ravel()
    if not np.isfinite(lw).all():
        raise ValueError("log weights hold non-finite values; k-hat is undefined.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's import banner and its small-sample notes
        import arviz as az

        _, khat = az.psislw(lw)
    return float(khat)


def khat_verdict(khat: float) -> str:
    """Plain-words verdict for a k-hat value (thresholds of Vehtari et al.)."""
    if not math.isfinite(khat):
        return "unknown: k-hat could not be computed (non-finite log weights)"
    if khat < 0.5:
        return "good: q covers the target well (k-hat < 0.5)"
    if khat < 0.7:
        return "fair: usable for means and sds, tails may be off (0.5 <= k-hat < 0.7)"
    return (
        "unreliable: q misses mass the target has (k-hat >= 0.7); do not trust these "
        "estimates, try a richer family (FullRank, a flow) or reparameterise the model"
    )
