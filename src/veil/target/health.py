"""Health checks of a target and of a finished run: what makes a fit wrong without a word.

Before a fit, :func:`check_log_density` evaluates a plain log density (and its gradient) at a
few points with JAX's index checks on: reading ``z[2]`` from a vector of length 2 is an error
(JAX would clamp the index and fit the wrong posterior in silence), and a coordinate that
never changes the log density is a warning (``dim`` larger than the function reads, or a
target that is flat, so improper, along it).

After a fit, :func:`assess_run` looks at what the run left: steps skipped because the loss or
its gradient was not finite (a log density undefined where ``q`` puts mass), and parameters
that left the finite range (an improper target: the coordinates ran away). Either turns the
run's ``stop_reason`` from ``"converged..."`` into ``"undefined"`` or ``"diverged"``, with a
warning that names the cause and the coordinates.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

__all__ = ["check_log_density", "assess_run", "coordinate_names", "Assessment",
           "MAX_SKIPPED_SHARE", "MAX_FINAL_SKIPPED_SHARE"]

# Points at which a plain log density is checked: uniform on [-2, 2]^d (the init radius of
# Stan and NumPyro in unconstrained space), a fixed seed.
_CHECK_POINTS = 8
# A run that skipped more than this share of all its steps, or of its final tenth (where the
# iterates that make the result were averaged), did not fit the target as written: its
# gradient steps ignored every draw that met the undefined region, so q was pulled by the
# defined part alone. A few skipped steps early on (a wide start overflowing in the tails) are
# harmless and stay under both.
MAX_SKIPPED_SHARE = 0.10
MAX_FINAL_SKIPPED_SHARE = 0.01
_CAUSE_DRAWS = 4000


def coordinate_names(target) -> list[str]:
    """Names of the unconstrained coordinates: ``z[0]``, ... for a plain log density,
    ``site`` or ``site[i]`` (unconstrained) for a NumPyro model."""
    names = []
    for site in target.sites:
        if site.unconstrained_shape == () or (site.size == 1 and target.kind in ("numpyro", "stan")):
            names.append(site.name)
            continue
        for idx in np.ndindex(site.unconstrained_shape):
            names.append(f"{site.name}[{','.join(map(str, idx))}]")
    return names[: target.dim] + [f"z[{j}]" for j in range(len(names), target.dim)]


def _list(names: list[str], idx, most: int = 6) -> str:
    idx = [int(i) for i in idx]
    shown = ", ".join(names[i] for i in idx[:most])
    return shown + (f" and {len(idx) - most} more" if len(idx) > most else "")


# ---------------------------------------------------------------------------- before a fit
def check_log_density(fn, consts, dim: int, what: str = "The log density") -> None:
    """Evaluate ``fn`` (a hoisted function when ``consts`` is not ``None``) and its gradient
    at ``_CHECK_POINTS`` points with index checks: an out-of-range read raises ``ValueError``;
    coordinates whose gradient is exactly zero at every point where the value is finite give
    a ``UserWarning``."""
    points = np.random.default_rng(0).uniform(-2.0, 2.0, (_CHECK_POINTS, dim)).astype(np.float32)
    checked = checkify.checkify(_values_and_grads, errors=checkify.index_checks)
    try:
        err, (values, grads) = jax.jit(checked, static_argnums=0)(_Fn(fn), points, consts)
    except Exception:  # noqa: BLE001 - a function checkify cannot transform is checked no further
        return
    message = err.get()
    if message is not None:
        raise ValueError(
            f"{what} reads outside its input, a vector of length dim={dim}: {message.splitlines()[0].strip()} "
            "JAX clamps such an index instead of failing, so the fit would target another "
            "density in silence. Pass the dim your function reads, or fix its indexing."
        )
    values, grads = np.asarray(values), np.asarray(grads)
    ok = np.isfinite(values) & np.isfinite(grads).all(axis=1)
    if not ok.any():
        return
    flat = np.flatnonzero((grads[ok] == 0).all(axis=0))
    if flat.size:
        coords = ", ".join(map(str, flat[:8])) + (", ..." if flat.size > 8 else "")
        warnings.warn(
            f"{what} does not change along coordinate(s) {coords} of {dim} at any of "
            f"{int(ok.sum())} test points in [-2, 2]^{dim}: either dim={dim} is larger than the "
            "vector your function reads (pass the right dim), or the target is flat, so "
            "improper, along them (give them a prior); a fit would run away along them.",
            UserWarning,
            stacklevel=3,
        )


class _Fn(eqx.Module):
    fn: object = eqx.field(static=True)


def _values_and_grads(fn: _Fn, points, consts):
    f = fn.fn if consts is None else (lambda z: fn.fn(z, consts))
    return jax.vmap(jax.value_and_grad(f))(points)


# ---------------------------------------------------------------------------- after a fit
class Assessment(NamedTuple):
    """What :func:`assess_run` found: a new stop reason (``None``: the run's own stands) and
    the warning to give."""

    reason: str | None
    message: str


@eqx.filter_jit
def _draw_values(target, q, key, n: int):
    z = q.sample(key, n)
    log_p = target.log_density_rows(z)
    grads = jax.vmap(jax.grad(target.log_density))(z) if not target.is_minibatched else jnp.zeros_like(z)
    return z, log_p, jnp.isfinite(grads).all(axis=1)


def assess_run(target, q, trace: np.ndarray, num_skipped: int, num_steps: int, key) -> Assessment:
    """Whether a finished run's ``q`` can stand as its result: ``Assessment(None, "")`` when
    it can, else ``"diverged"`` (``q``'s parameters, or its draws, not finite) or
    ``"undefined"`` (too many steps skipped) with a message naming the coordinates. ``key``
    (folded here, and only where draws are needed) makes the draws that find the cause."""
    params = jax.device_get(jax.tree.leaves(eqx.filter(q, eqx.is_inexact_array)))  # one transfer
    if all(np.isfinite(x).all() for x in params):
        trace = np.asarray(trace)
        tail = trace[-max(1, len(trace) // 10):]
        share = num_skipped / max(num_steps, 1)
        final_share = float(np.mean(~np.isfinite(tail))) if tail.size else 0.0
        if share <= MAX_SKIPPED_SHARE and final_share <= MAX_FINAL_SKIPPED_SHARE:
            return Assessment(None, "")  # the common case: nothing else to compute
    key = jax.random.fold_in(key, 7)
    names = coordinate_names(target)
    if not all(np.isfinite(x).all() for x in params):
        try:
            bad_cols = np.flatnonzero(~np.isfinite(np.asarray(q.mean)))
        except Exception:  # noqa: BLE001 - a family whose mean cannot be formed from bad parameters
            bad_cols = np.arange(0)
        if bad_cols.size == 0:  # the location is finite: the scales ran away; see where
            z = np.asarray(q.sample(key, 64))
            bad_cols = np.flatnonzero(~np.isfinite(z).all(axis=0))
        where = f" along {_list(names, bad_cols)}" if bad_cols.size else ""
        return Assessment("diverged", (
            f"The fit ran away: q's parameters left the finite range{where}. The target is "
            "improper there (flat, or growing without bound, so no distribution fits it), or "
            "the log density is wrong along those coordinates (a dim larger than the function "
            "reads): give them a proper prior, or check the model. This result is not a fit."
        ))
    trace = np.asarray(trace)
    tail = trace[-max(1, len(trace) // 10):]
    share = num_skipped / max(num_steps, 1)
    final_share = float(np.mean(~np.isfinite(tail))) if tail.size else 0.0
    if share <= MAX_SKIPPED_SHARE and final_share <= MAX_FINAL_SKIPPED_SHARE:
        return Assessment(None, "")
    z, log_p, grad_ok = (np.asarray(x) for x in _draw_values(target, q, key, _CAUSE_DRAWS))
    bad = ~np.isfinite(log_p)
    if bad.any():
        cause = (f"the log density is not finite at {bad.mean():.1%} of the fitted q's draws"
                 f"{_separating(z, bad, names)}")
    elif (~grad_ok).any():
        cause = f"the gradient of the log density is not finite at {(~grad_ok).mean():.1%} of the fitted q's draws"
    else:
        cause = ("the log density was not finite where the run's earlier, wider q put mass, "
                 "though the fitted q no longer reaches it")
    return Assessment("undefined", (
        f"{num_skipped} of {num_steps} steps ({share:.0%}; {final_share:.0%} of the last tenth) "
        f"were skipped because the loss or its gradient was not finite: {cause}. Every skipped "
        "step ignored the draws that met the undefined region, so q was fitted to the part of "
        "the target that is defined, not to the target. Fix the model where it is undefined "
        "(log of zero or of a negative, out-of-support values), or bound the parameter with a "
        "constrained site."
    ))


def _separating(z: np.ndarray, bad: np.ndarray, names: list[str], most: int = 3) -> str:
    """``" (where z[0] > 4)"``: the coordinates whose values alone separate the bad draws from
    the good ones, with the boundary halfway between the nearest of each, or ``""``."""
    good = ~bad
    if not good.any():
        return " (at every draw)"
    parts = []
    for j in range(z.shape[1]):
        lo_bad, hi_bad = z[bad, j].min(), z[bad, j].max()
        lo_good, hi_good = z[good, j].min(), z[good, j].max()
        if lo_bad > hi_good:
            parts.append(f"{names[j]} > {0.5 * (lo_bad + hi_good):.3g}")
        elif hi_bad < lo_good:
            parts.append(f"{names[j]} < {0.5 * (hi_bad + lo_good):.3g}")
        if len(parts) == most:
            break
    return f" (where {' or '.join(parts)}, in unconstrained space)" if parts else ""
