"""What a particle run returns: :class:`ParticleResult`."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Float

from veil.diagnostics import kernel_stein_discrepancy
from veil.result import NotApplicable, VIResult, _flat_columns, _warn_nonfinite
from veil.particles.base import _constrained, _log_density_and_scores
from veil.particles.kalman import EKI


# ------------------------------------------------------------------------------ the result
@dataclasses.dataclass(eq=False, repr=False)
class ParticleResult(VIResult):
    """What :func:`run` returns: a :class:`veil.VIResult` whose ``q`` is the particles'
    :class:`veil.families.Empirical` distribution.

    ``draws()`` gives the particles themselves (constrained); ``draws(n, key=...)`` picks
    ``n`` of them with replacement. There is no density, so there is no k-hat or ELBO; the
    verdict reports the kernel Stein discrepancy (:attr:`ksd`) and the stopping reason. The
    trace is the mean ``-log p`` of 16 particles drawn at random each step (of all of them
    for gradient-free methods).
    """

    method: Any = None
    coordinates: Any = None  # the particles in the method's coordinates (see ParticleMethod)

    def __repr__(self) -> str:
        return (
            f"ParticleResult({type(self.method).__name__}, {self.q.num_particles} particles, "
            f"{self.num_steps} steps, stop_reason={self.stop_reason!r}, num_skipped={self.num_skipped})"
        )

    @property
    def particles(self) -> Float[Array, "n dim"]:
        """The particles in the target's coordinates (its unconstrained space; a mirrored
        method's constrained set)."""
        return self.q.particles

    @property
    def khat(self) -> float:
        """Does not apply: particles have no density (raises :class:`veil.result.NotApplicable`).
        See :attr:`ksd`."""
        raise NotApplicable(
            "k-hat does not apply to particles: they have no density to weigh against the target's. "
            "Their distance from the target is res.ksd (kernel Stein discrepancy)."
        )

    @property
    def elbo(self) -> float:
        """Does not apply: particles have no density (raises :class:`veil.result.NotApplicable`)."""
        raise NotApplicable("The ELBO does not apply to particles: they have no density, so no entropy term.")

    _psis = None  # no importance weights without a density

    def log_evidence(self, *, key, n=10_000, batch=10_000):
        raise NotApplicable(
            "Particles have no density, so they cannot be an importance-sampling proposal; fit "
            "a parametric family (veil.fit) to estimate the evidence."
        )

    @functools.cached_property
    def ksd(self) -> float:
        """Kernel Stein discrepancy of the particles from the target (IMQ kernel, see
        :func:`veil.diagnostics.kernel_stein_discrepancy`): zero only if they are
        distributed as the target; it needs no draws from it. With a minibatched target it
        uses the full data. For a mirrored method it is that of the dual particles from the
        dual density, the space where they move."""
        if not self.method.uses_gradients:
            raise NotApplicable(
                f"The kernel Stein discrepancy needs the target's gradient, which "
                f"{type(self.method).__name__} (gradient-free) does not use."
            )
        z = self.coordinates
        return float(kernel_stein_discrepancy(z, _log_density_and_scores(self.method, self.target, z)[1]))

    def draws(self, n: int | None = None, *, key: jax.Array | None = None) -> dict[str, jax.Array]:
        """The particles mapped to constrained space (``n=None``), or ``n`` of them picked
        uniformly with replacement with ``key``: a dict ``name -> [n, ...]``."""
        if n is None:
            x = self.particles
        else:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"n must be a positive integer or None, got {n!r}.")
            if key is None:
                raise TypeError("draws(n, key=...) needs a key to pick the particles; draws() gives them all.")
            x = self.q.sample(key, int(n))
        out = _constrained(self.target, x)
        _warn_nonfinite(out)
        return out

    def to_arviz(self, n: int | None = None, *, key: jax.Array | None = None):
        """An ``arviz.InferenceData``: the particles (or ``n`` picked, as in :meth:`draws`) as
        one chain in ``posterior``, each one's ``lp`` (log target) in ``sample_stats``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import arviz as az
        draws = self.draws(n, key=key)
        x = self.particles if n is None else self.q.sample(key, int(n))
        log_p = np.asarray(_log_density(self.target, x))
        return az.from_dict(posterior={k: np.asarray(v)[None] for k, v in draws.items()},
                            sample_stats={"lp": log_p[None]})

    def verdict(self) -> tuple[list[str], bool]:
        lines, ok = [], True
        if self.method.uses_gradients:
            lines.append(
                f"{self.q.num_particles} particles; kernel Stein discrepancy {self.ksd:.3g} (0 only at "
                "the target; compare runs, lower is closer). No k-hat: particles have no density."
            )
        else:
            lines.append(
                f"{self.q.num_particles} particles of a gradient-free method: no kernel Stein "
                "discrepancy (it needs the target's gradient) and no k-hat (no density)."
            )
        stop = self.stop_reason
        if isinstance(self.method, EKI) and stop == "max_steps":
            lines.append(
                f"Ran EKI's {self.num_steps} tempered steps, prior to posterior: exact for a linear "
                "forward model as the ensemble grows, a Gaussian-type approximation otherwise."
            )
            stop = "fixed"
        elif not self.method.averageable and stop == "max_steps":
            ok = False
            lines.append(
                f"Ran a fixed {self.num_steps} steps of {type(self.method).__name__}: its particles are "
                "draws of a Markov chain, and nothing here checks that the ensemble has reached "
                "equilibrium; compare with a longer run before trusting them."
            )
            stop = "fixed"
        return self._run_lines(lines, ok, self._subject, stop)

    _subject = "these particles"

    def _summary_draws(self):
        return jax.device_get(_constrained(self.target, self.particles))

    def _summary_header(self):
        return (
            f"veil particles: {type(self.method).__name__}, {self.q.num_particles} particles "
            f"(dim={self.q.dim}), {self.num_steps} steps, {self.wall_time:.2f} s"
        )

    def _nonfinite_line(self, bad):
        return f"{bad} particles hold non-finite values (the table leaves them out)."

    def _plot_draws(self):
        return _flat_columns(self._summary_draws())

    _loss_label = "mean −log p of the particles (16 at random for gradient methods)"

    def _plot_quality(self) -> str:
        return f"KSD {self.ksd:.3g}" if self.method.uses_gradients else "gradient-free: no KSD"


@eqx.filter_jit
def _log_density(target, x):
    return jax.vmap(target.log_density)(x)
