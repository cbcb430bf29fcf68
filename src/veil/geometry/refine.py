"""Finishing a stochastic FullRank fit by variational Newton, and checking it from
independent starts: what ``veil.fit(..., refine=True)`` adds to a FullRank ELBO fit.

:func:`refine` runs variational Newton (:mod:`veil.geometry.newton`) from the fitted Gaussian:
Adam stops short along ill-conditioned directions, Newton's steps do not. :func:`check_starts`
runs it again from dispersed narrow Gaussians: a much better optimum replaces ``q``, another
mode of comparable mass turns the verdict. Both record what they found on the result
(``res.refinement``, ``res.starts``).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from veil.families.gaussian import FullRank, gaussian_to_family
from veil.family import Family
from veil.geometry.newton import _checked, variational_newton
from veil.objectives import is_plain_elbo
from veil.result import Refinement, StartCheck, VIResult
from veil.target import Target

__all__ = ["refinable", "refine", "check_starts", "MODE_NATS"]

# A restart whose ELBO is within this many nats of the best one's sits on a mode holding at
# least e^-3 = 5% of the best mode's mass (each restart's ELBO approximates the log mass of
# the mode it fitted): not a local optimum to discard.
MODE_NATS = 3.0


_REFINE_MAX_DIM = 2000


def refinable(target: Target, q: Family, objective, stop, mesh) -> bool:
    """Whether Newton's refinement targets the same optimum as the fit: a FullRank Gaussian,
    the plain ELBO (no likelihood weight or beta), a full-data target on one device, and a
    run that was left to the stopping rule (``stop=None`` asks for exactly the last iterate)."""
    return (isinstance(q, FullRank) and is_plain_elbo(objective) and stop is not None and mesh is None
            and not target.is_minibatched and target.dim <= _REFINE_MAX_DIM)


# Independent starts: variational Newton from N(x0, 0.1^2 I), x0 ~ Uniform(-2, 2)^dim (the
# range of Stan's and Pathfinder's inits), each ending at a Gaussian with its ELBO, compared
# with the fit's from the same draws.
_START_PATHS = 4
_START_SCALE = 0.1


def check_starts(res: VIResult, key) -> None:
    """Where independent starts lead, against where the fit ended (in place, ``res.starts``).

    ``variational_newton`` runs from ``_START_PATHS`` narrow Gaussians at dispersed points;
    each ends at a Gaussian whose ELBO is estimated here from the same standard-normal draws
    as the fit's (``newton.CHECK_DRAWS``). One more than ``MODE_NATS`` above the fit means the
    fit settled in a poor local optimum: q becomes that Gaussian. One whose mean lies more
    than 3 sds from the (final) fit's in some coordinate with an ELBO within ``MODE_NATS`` of
    it sits on another mode of comparable mass, which q's own draws (and k-hat) cannot see.

    Why Newton and not Pathfinder's L-BFGS paths: the refinement has compiled Newton's
    programs for this target already, so the starts cost their gradients and no compilation;
    Pathfinder added 1.0 s of tracing per new target (eight schools) and found the same
    optima on all 31 posteriordb dev posteriors (docs/benchmarks/posteriordb.md)."""

    check_key = jax.random.fold_in(key, 1)
    fit_elbo = _checked(res.target, np.asarray(res.q.mean, np.float64), np.asarray(res.q.cov, np.float64), check_key)[1]
    starts = np.asarray(jax.random.uniform(key, (_START_PATHS, res.target.dim), minval=-2.0, maxval=2.0), np.float64)
    paths, evals, wall = [], 0, 0.0
    for i, x0 in enumerate(starts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a start that does not settle is simply compared as it ends
            try:
                nw = variational_newton(res.target, key=jax.random.fold_in(key, 10 + i),
                                        init=FullRank(res.target.dim, init_loc=x0, init_scale=_START_SCALE))
            except (ValueError, np.linalg.LinAlgError):  # not finite at this start
                continue
        evals, wall = evals + nw.num_grad_evals, wall + nw.wall
        loc, cov = np.asarray(nw.q.mean, np.float64), np.asarray(nw.q.cov, np.float64)
        if np.isfinite(loc).all() and np.isfinite(cov).all():
            paths.append((loc, cov, _checked(res.target, loc, cov, check_key)[1]))
    paths = [p for p in paths if np.isfinite(p[2])]
    if not paths or not np.isfinite(fit_elbo):
        return
    moved_from = None
    loc, cov, best = max(paths, key=lambda p: p[2])
    if best > fit_elbo + MODE_NATS:
        moved_from, fit_elbo = float(best - fit_elbo), best
        res.q = gaussian_to_family(FullRank(res.target.dim), jnp.asarray(loc, jnp.float32), jnp.asarray(cov, jnp.float32))
        res.final_loss = -float(best)
    mu, sd = np.asarray(res.q.mean, np.float64), np.asarray(res.q.stddev, np.float64)
    gaps = [(float(np.max(np.abs(p[0] - mu) / np.maximum(sd, np.sqrt(np.diagonal(p[1]))))), float(p[2] - fit_elbo))
            for p in paths]
    others = [(gap, nats) for gap, nats in gaps if gap > 3.0 and nats > -MODE_NATS]
    res.wall_time += wall
    res.starts = StartCheck(num_paths=_START_PATHS, grad_evals=int(evals),
                            best_nats_above=float(max(n for _, n in gaps)), moved_nats=moved_from,
                            other_mode=max(others) if others else None)



def refine(res: VIResult, key) -> None:
    """Variational Newton from ``res.q``; where it settled and did not lower the ELBO, its
    Gaussian replaces ``res.q``. Records what changed in ``res.refinement`` (in place)."""

    before = res.q
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # variational_newton's own advice is about using veil.fit
        try:
            nw = variational_newton(res.target, key=key, init=before)
        except (ValueError, np.linalg.LinAlgError):  # a start it cannot use: keep the fit
            return
    mu0, sd0 = np.asarray(before.mean, np.float64), np.asarray(before.stddev, np.float64)
    mu1, sd1 = np.asarray(nw.q.mean, np.float64), np.asarray(nw.q.stddev, np.float64)
    shift = np.abs(mu1 - mu0) / sd1
    ratio = np.abs(np.log(sd1 / sd0))
    finite = bool(np.isfinite(shift).all() and np.isfinite(ratio).all())
    applied = bool(nw.converged and finite)
    res.refinement = Refinement(
        applied=applied, iterations=nw.num_iters, grad_evals=int(nw.num_grad_evals),
        mean_shift=float(shift.max()) if finite else float("nan"), mean_shift_at=int(np.argmax(shift)) if finite else -1,
        sd_change=float(np.expm1(ratio.max())) if finite else float("nan"), wall_time=float(nw.wall),
    )
    res.wall_time += nw.wall
    if applied:
        res.q = nw.q
        res.final_loss = -float(nw.elbo)  # the header's ELBO is the refined q's
        if res.stop_reason == "max_steps":
            res.stop_reason = (f"converged: variational Newton from where the stochastic run hit "
                               f"max_steps={res.num_steps}")


