"""Pathfinder: Gaussian approximations along a quasi-Newton path, picked by ELBO.

Zhang, Carpenter, Gelman & Vehtari (2022), "Pathfinder: Parallel quasi-Newton variational
inference". One *path* runs L-BFGS on ``-log p`` from a random start. At every iterate
``x_l`` (gradient ``g_l = grad log p(x_l)``) the L-BFGS inverse-Hessian estimate ``H_l`` defines
a Gaussian

    q_l = N(x_l + H_l g_l, H_l)           (one Newton step from x_l, covariance H_l)

and the path returns the ``q_l`` with the largest ELBO, estimated from a few draws each. The
ELBO search is what makes Pathfinder robust: on a target whose mode is at infinity (a funnel)
or far in the tails, the path passes through the bulk of the mass on its way and the best
``q_l`` is found there, not at the end of the optimisation. *Multi-path* Pathfinder runs
several paths from independent starts (vmapped: one compiled program) and corrects their
uniform mixture towards the target by Pareto-smoothed importance resampling.

What veil writes and what it reuses:

- The optimisation is optax's L-BFGS with its zoom line search (strong Wolfe conditions):
  veil does not carry its own L-BFGS.
- The inverse-Hessian estimate that defines ``q_l`` is the paper's, which optax does not
  expose: a diagonal ``D = diag(alpha)`` updated by the diagonal of a scaled BFGS update
  (Gilbert & Lemaréchal 1989) plus the last ``history`` accepted ``(s, y)`` pairs in Byrd,
  Nocedal & Schnabel's (1994) compact form ``H = D + B G B^T`` (``B`` is ``dim x 2 history``).
  A pair is accepted when ``s.y > eps ||y||^2`` (curvature), which keeps ``H`` positive
  definite.
- Draws and densities of ``q_l`` cost ``O(dim history^2)`` through a thin QR of
  ``D^{-1/2} B = Q R``: ``H = D^{1/2} (I - Q Q^T + Q M Q^T) D^{1/2}`` with
  ``M = I + R G R^T = C C^T``, so ``z = mu + D^{1/2} (Q C Q^T + I - Q Q^T) eps`` and
  ``log |H| = sum log alpha + 2 sum log diag C``.

Cost is counted, not assumed: every path reports its gradient evaluations (one at the start
plus one per line-search trial, the count the paper and Stan report) and its log-density
evaluations for the ELBO estimates. Under ``vmap`` the line search's branches become selects,
so the compiled multi-path program also computes one discarded gradient per iteration (counted
with a callback in the tests); the counts above leave it out, as a sequential run would.

Examples:
    >>> import jax, jax.numpy as jnp, veil
    >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum((z - 1.0) ** 2 / 4.0), dim=3)
    >>> pf = veil.pathfinder(t, key=jax.random.key(0), num_paths=2)
    >>> bool(jnp.allclose(pf.q.mean, 1.0, atol=1e-2)), bool(jnp.allclose(pf.q.stddev, 2.0, atol=0.05))
    (True, True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import typing
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from veil._checks import check_key as _check_key
from veil._checks import check_positive_int as _check_positive_int
from veil.diagnostics import format_khat, khat_ok, khat_verdict, psis_khat
from veil.families.gaussian import FullRank, LowRank, MeanField, gaussian_to_family  # noqa: F401 (re-exported)
from veil.result import Result
from veil.target import Target, log_density_rows

__all__ = ["pathfinder", "PathfinderResult", "Gaussian"]

_LOG_2PI = math.log(2 * math.pi)
_KHAT_DRAWS = 2000
_SUMMARY_DRAWS = 4000


# ---------------------------------------------------------------------- one Gaussian on the path
class Gaussian(typing.NamedTuple):
    """``N(loc, Sigma)`` with ``Sigma = D^{1/2} (I - Q Q^T + Q C C^T Q^T) D^{1/2}``,
    ``D = diag(exp(log_diag))``, ``Q`` (``dim x r``) orthonormal, ``C`` (``r x r``) lower
    triangular: the factored form in which Pathfinder's approximations are drawn from.
    Arrays may carry leading batch axes (one per path)."""

    loc: jax.Array  # [dim]
    log_diag: jax.Array  # [dim]
    basis: jax.Array  # Q [dim, r]
    chol: jax.Array  # C [r, r]

    def log_det(self) -> jax.Array:
        """``log |Sigma|``."""
        return jnp.sum(self.log_diag) + 2 * jnp.sum(jnp.log(jnp.diagonal(self.chol)))

    def transform_and_log_prob(self, eps):
        """Draws from standard-normal noise ``eps`` ``[n, dim]`` and their log densities."""
        proj = eps @ self.basis  # Q^T eps, row-wise
        u = eps + (proj @ self.chol.T - proj) @ self.basis.T
        z = self.loc + jnp.exp(0.5 * self.log_diag) * u
        return z, _std_normal_logpdf(eps) - 0.5 * self.log_det()

    def log_prob(self, z):
        """``log N(z; loc, Sigma)`` for ``z`` of shape ``[..., dim]``."""
        w = (z - self.loc) * jnp.exp(-0.5 * self.log_diag)  # (Q C Q^T + I - Q Q^T) eps
        proj = w @ self.basis  # C Q^T eps
        inner = jax.scipy.linalg.solve_triangular(
            self.chol, proj.reshape(-1, proj.shape[-1]).T, lower=True
        ).T.reshape(proj.shape)  # Q^T eps
        eps = w + (inner - proj) @ self.basis.T
        return _std_normal_logpdf(eps) - 0.5 * self.log_det()

    @property
    def cov(self) -> jax.Array:
        """The dense covariance ``Sigma`` (``O(dim^2)`` memory)."""
        q = self.basis
        m = self.chol @ self.chol.T
        inner = jnp.eye(q.shape[0]) - q @ q.T + q @ m @ q.T
        s = jnp.exp(0.5 * self.log_diag)
        return s[:, None] * inner * s[None, :]


def _std_normal_logpdf(eps):
    return -0.5 * jnp.sum(eps**2, axis=-1) - 0.5 * eps.shape[-1] * _LOG_2PI


def inverse_hessian_factors(alpha, s, y, valid):
    """Compact form ``H = diag(alpha) + B G B^T`` of the BFGS inverse Hessian built from
    ``H0 = diag(alpha)`` and the pairs ``(s_i, y_i)`` (rows of ``s``, ``y``; oldest first;
    rows with ``valid`` false are ignored), after Byrd, Nocedal & Schnabel (1994):

        B = [S, H0 Y],   G = [[R^-T (E + Y^T H0 Y) R^-1, -R^-T], [-R^-1, 0]],

    ``R`` the upper triangle of ``S^T Y``, ``E`` its diagonal. Empty slots hold zero pairs and
    a unit diagonal in ``R``: their columns of ``B`` vanish, so they add nothing.
    """
    m = s.shape[0]
    sy = s @ y.T  # (i, j) = s_i . y_j
    r = jnp.triu(sy) + jnp.diag(jnp.where(valid, 0.0, 1.0))
    r_inv = jax.scipy.linalg.solve_triangular(r, jnp.eye(m), lower=False)
    e = jnp.diag(jnp.where(valid, jnp.diagonal(sy), 0.0))
    ydy = (y * alpha) @ y.T
    top_left = r_inv.T @ (e + ydy) @ r_inv
    g = jnp.block([[top_left, -r_inv.T], [-r_inv, jnp.zeros((m, m))]])
    b = jnp.concatenate([s.T, (y * alpha).T], axis=1)  # [dim, 2m]
    return b, g


def gaussian_from_lbfgs(x, grad_log_p, alpha, s, y, valid) -> Gaussian:
    """Pathfinder's ``q = N(x + H g, H)`` at iterate ``x`` with ``g = grad log p(x)`` and the
    inverse-Hessian estimate ``H`` from :func:`inverse_hessian_factors`, in factored form."""
    b, g = inverse_hessian_factors(alpha, s, y, valid)
    loc = x + alpha * grad_log_p + b @ (g @ (b.T @ grad_log_p))
    q, r = jnp.linalg.qr(b / jnp.sqrt(alpha)[:, None])
    m = jnp.eye(r.shape[0]) + r @ g @ r.T
    chol = jnp.linalg.cholesky(0.5 * (m + m.T))
    return Gaussian(loc, jnp.log(alpha), q, chol)


def update_diagonal(alpha, s, y):
    """Diagonal of the scaled BFGS update of the Hessian estimate ``diag(1/alpha)`` by the
    pair ``(s, y)`` (Gilbert & Lemaréchal 1989, as used by Pathfinder): returns the new
    inverse-Hessian diagonal ``alpha``.

        1/alpha'_i = a / (b alpha_i) + y_i^2 / b - a s_i^2 / (b c alpha_i^2),
        a = y^T diag(alpha) y,  b = y^T s,  c = s^T diag(1/alpha) s.
    """
    a = jnp.sum(alpha * y**2)
    b = jnp.sum(y * s)
    c = jnp.sum(s**2 / alpha)
    inv = a / (b * alpha) + y**2 / b - a * s**2 / (b * c * alpha**2)
    return 1.0 / inv


# ---------------------------------------------------------------------- one path, compiled
class _PathState(typing.NamedTuple):
    x: jax.Array
    value: jax.Array  # -log p(x)
    grad: jax.Array  # grad of -log p at x
    opt_state: Any
    s: jax.Array  # [history, dim]
    y: jax.Array
    valid: jax.Array  # [history] bool
    alpha: jax.Array
    best: Gaussian
    best_elbo: jax.Array
    best_iter: jax.Array
    iteration: jax.Array
    grad_evals: jax.Array
    done: jax.Array


class PathOutput(typing.NamedTuple):
    """What one path returns (arrays gain a leading path axis under multi-path)."""

    gaussian: Gaussian  # the approximation with the largest ELBO estimate
    elbo: jax.Array  # its ELBO estimate
    best_iter: jax.Array  # the L-BFGS iterate it was built at (1-based)
    num_iters: jax.Array  # L-BFGS iterations run
    grad_evals: jax.Array  # evaluations of log p and its gradient by L-BFGS
    logp_evals: jax.Array  # evaluations of log p (no gradient) for the ELBO estimates
    final_x: jax.Array  # the last L-BFGS iterate


def _elbo(target, gauss: Gaussian, key, n: int):
    z, log_q = gauss.transform_and_log_prob(jax.random.normal(key, (n, gauss.loc.shape[0])))
    lw = log_density_rows(target, z) - log_q
    return jnp.where(jnp.all(jnp.isfinite(lw)), jnp.mean(lw), -jnp.inf)


def _run_path(
    target: Target, x0, log_p0, grad0, key, *, max_iters, history, num_elbo_draws, rel_tol, grad_tol
):
    """One path from ``x0``, where ``log p`` and its gradient are ``log_p0``, ``grad0``
    (evaluated once, by the caller's start check)."""
    dim = x0.shape[0]
    neg = lambda x: -target.log_density(x)  # noqa: E731
    opt = optax.lbfgs(memory_size=history)
    value0, grad0 = -log_p0, -grad0
    eps = jnp.finfo(x0.dtype).eps

    rank = min(dim, 2 * history)  # columns of the thin QR's Q
    empty = Gaussian(x0, jnp.zeros(dim), jnp.zeros((dim, rank)), jnp.eye(rank))
    init = _PathState(
        x=x0, value=value0, grad=grad0, opt_state=opt.init(x0),
        s=jnp.zeros((history, dim)), y=jnp.zeros((history, dim)),
        valid=jnp.zeros(history, bool), alpha=jnp.ones(dim),
        best=empty, best_elbo=-jnp.inf, best_iter=jnp.asarray(0),
        iteration=jnp.asarray(0), grad_evals=jnp.asarray(1),
        done=~(jnp.isfinite(value0) & jnp.all(jnp.isfinite(grad0))),
    )  # fmt: skip

    def cond(st: _PathState):
        return (~st.done) & (st.iteration < max_iters)

    def body(st: _PathState):
        updates, opt_state = opt.update(
            st.grad, st.opt_state, st.x, value=st.value, grad=st.grad, value_fn=neg
        )
        x = optax.apply_updates(st.x, updates)
        value = optax.tree.get(opt_state, "value")
        grad = optax.tree.get(opt_state, "grad")
        trials = optax.tree.get(opt_state, "info").num_linesearch_steps
        finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(grad))
        s, yv = x - st.x, grad - st.grad
        accept = finite & (jnp.dot(s, yv) > eps * jnp.dot(yv, yv))
        # Shift the pair into the newest slot (oldest first keeps R upper triangular).
        push = lambda buf, row: jnp.concatenate([buf[1:], row[None]])  # noqa: E731
        s_buf = jnp.where(accept, push(st.s, s), st.s)
        y_buf = jnp.where(accept, push(st.y, yv), st.y)
        valid = jnp.where(accept, push(st.valid, jnp.asarray(True)), st.valid)
        alpha = jnp.where(accept, update_diagonal(st.alpha, s, yv), st.alpha)
        alpha = jnp.where(jnp.all(jnp.isfinite(alpha) & (alpha > 0)), alpha, st.alpha)

        iteration = st.iteration + 1
        gauss = gaussian_from_lbfgs(x, -grad, alpha, s_buf, y_buf, valid)
        elbo = _elbo(target, gauss, jax.random.fold_in(key, iteration), num_elbo_draws)
        elbo = jnp.where(finite & jnp.isfinite(elbo), elbo, -jnp.inf)
        better = elbo > st.best_elbo
        best = jax.tree.map(lambda a, b: jnp.where(better, a, b), gauss, st.best)

        change = jnp.abs(st.value - value) / jnp.maximum(
            jnp.maximum(jnp.abs(st.value), jnp.abs(value)), 1.0
        )
        done = (~finite) | (change <= rel_tol) | (jnp.max(jnp.abs(grad)) <= grad_tol)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        return _PathState(
            x=keep(x, st.x), value=keep(value, st.value), grad=keep(grad, st.grad),
            opt_state=opt_state, s=s_buf, y=y_buf, valid=valid, alpha=alpha,
            best=best, best_elbo=jnp.where(better, elbo, st.best_elbo),
            best_iter=jnp.where(better, iteration, st.best_iter),
            iteration=iteration, grad_evals=st.grad_evals + trials, done=done,
        )  # fmt: skip

    final = jax.lax.while_loop(cond, body, init)
    return PathOutput(
        gaussian=final.best,
        elbo=final.best_elbo,
        best_iter=final.best_iter,
        num_iters=final.iteration,
        grad_evals=final.grad_evals,
        logp_evals=final.iteration * num_elbo_draws,
        final_x=final.x,
    )


@eqx.filter_jit
def _run_paths(target, x0s, log_p0s, grad0s, keys, settings: tuple):
    max_iters, history, num_elbo_draws, rel_tol, grad_tol = settings
    run = functools.partial(
        _run_path, target, max_iters=max_iters, history=history,
        num_elbo_draws=num_elbo_draws, rel_tol=rel_tol, grad_tol=grad_tol,
    )  # fmt: skip
    return jax.vmap(run)(x0s, log_p0s, grad0s, keys)


@eqx.filter_jit
def _start_values(target, x0s):
    return jax.vmap(jax.value_and_grad(target.log_density))(x0s)


# ---------------------------------------------------------------------- the mixture of paths
def _mixture_log_prob(gaussians: Gaussian, weights_log, z):
    """``log sum_k w_k N(z; path k)`` for stacked path Gaussians."""
    per_path = jax.vmap(lambda g: g.log_prob(z))(gaussians)  # [paths, n]
    return jax.scipy.special.logsumexp(per_path + weights_log[:, None], axis=0)


@eqx.filter_jit
def _mixture_draws(target, gaussians: Gaussian, log_w_paths, key, n_per_path: int):
    """``n_per_path`` draws from every path's Gaussian (stratified draws of the mixture),
    their log target density, log mixture density, and constrained values."""
    num_paths, dim = gaussians.loc.shape
    eps = jax.random.normal(key, (num_paths, n_per_path, dim))
    z, _ = jax.vmap(lambda g, e: g.transform_and_log_prob(e))(gaussians, eps)
    z = z.reshape(num_paths * n_per_path, dim)
    log_q = _mixture_log_prob(gaussians, log_w_paths, z)
    log_p = log_density_rows(target, z)
    return z, log_p, log_q


def _psis_log_weights(log_weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed, normalised log weights and k-hat (ArviZ's ``psislw``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's import banner and small-sample warnings
        import arviz as az

        lw, khat = az.psislw(np.asarray(log_weights, np.float64).copy())
    return np.asarray(lw), float(khat)


@dataclasses.dataclass(eq=False)
class PathfinderResult(Result):
    """The outcome of :func:`veil.pathfinder`.

    Attributes:
        target: the target.
        paths: every path's :class:`PathOutput` (arrays with a leading path axis).
        best_path: index of the path whose approximation has the largest ELBO estimate.
        wall_time: seconds for the paths (compilation included).
        diagnostic_key: the key the lazily computed diagnostics draw with.

    ``q`` is the best path's Gaussian as a :class:`veil.FullRank` (use it alone, or to start
    :func:`veil.fit`); :meth:`draws` corrects the uniform mixture of all paths' Gaussians
    towards the target by Pareto-smoothed importance resampling (multi-path Pathfinder).
    """

    target: Any
    paths: PathOutput
    best_path: int
    wall_time: float
    diagnostic_key: jax.Array = dataclasses.field(repr=False)

    def __repr__(self) -> str:
        return (
            f"PathfinderResult(dim={self.target.dim}, {self.num_paths} paths, "
            f"best ELBO {self.elbo:.3f}, {self.num_grad_evals} gradient evaluations)"
        )

    @property
    def num_paths(self) -> int:
        return int(self.paths.elbo.shape[0])

    @property
    def elbo(self) -> float:
        """The best path's ELBO estimate (from ``num_elbo_draws`` draws)."""
        return float(self.paths.elbo[self.best_path])

    @property
    def num_grad_evals(self) -> int:
        """Evaluations of the log density with its gradient, all paths together."""
        return int(np.sum(self.paths.grad_evals))

    @property
    def num_logp_evals(self) -> int:
        """Evaluations of the log density alone (the ELBO estimates), all paths together."""
        return int(np.sum(self.paths.logp_evals))

    @functools.cached_property
    def gaussian(self) -> Gaussian:
        """The best path's approximation in factored form."""
        return jax.tree.map(lambda a: a[self.best_path], self.paths.gaussian)

    @functools.cached_property
    def q(self) -> FullRank:
        """The best path's Gaussian as a :class:`veil.FullRank` (a dense Cholesky factor)."""
        g = self.gaussian
        return gaussian_to_family(FullRank(self.target.dim), g.loc, g.cov)

    def init(self, q):
        """``q`` (a ``MeanField``, ``FullRank`` or ``LowRank`` of the target's dimension)
        moved to the best path's Gaussian: its mean and, as far as the family can hold it,
        its covariance. The way to start :func:`veil.fit` from Pathfinder."""
        g = self.gaussian
        return gaussian_to_family(q, g.loc, g.cov)

    def _log_weights_paths(self):
        ok = np.isfinite(np.asarray(self.paths.elbo))
        if not ok.any():
            raise RuntimeError(
                "No path produced a finite ELBO estimate: the log density is not finite "
                "where the approximations put mass. Check the target, or start the paths "
                "elsewhere (init=...)."
            )
        return jnp.log(jnp.asarray(ok / ok.sum())), int(ok.sum())

    def _pool(self, key, n: int):
        log_w, live = self._log_weights_paths()
        per_path = -(-n // live)
        z, log_p, log_q = _mixture_draws(self.target, self.paths.gaussian, log_w, key, per_path)
        keep = np.repeat(np.asarray(log_w) > -np.inf, per_path)
        return z[keep], np.asarray(log_p, np.float64)[keep], np.asarray(log_q, np.float64)[keep]

    @functools.cached_property
    def khat(self) -> float:
        """PSIS k-hat of the paths' mixture against the target (2000 draws)."""
        _, log_p, log_q = self._pool(self.diagnostic_key, _KHAT_DRAWS)
        lw = log_p - log_q
        return psis_khat(lw) if np.isfinite(lw).all() else math.nan

    def draws(self, n: int, *, key: jax.Array, resample: bool = True) -> dict[str, jax.Array]:
        """``n`` constrained draws: the mixture of the paths' Gaussians, importance-resampled
        towards the target with Pareto-smoothed weights (``resample=False``: the mixture's
        own draws). Resampling is with replacement from a pool of ``n`` draws, so repeats
        occur where the weights are uneven; the k-hat says how far to trust them.

        Examples:
            >>> import jax, jax.numpy as jnp, veil
            >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)
            >>> pf = veil.pathfinder(t, key=jax.random.key(0))
            >>> pf.draws(100, key=jax.random.key(1))["z"].shape
            (100, 2)
        """

        _check_key(key)
        n = _check_positive_int("n", n)
        pool_key, pick_key = jax.random.split(key)
        z, log_p, log_q = self._pool(pool_key, n)
        if resample:
            lw = log_p - log_q
            if not np.isfinite(lw).all():
                bad = int((~np.isfinite(lw)).sum())
                raise ValueError(
                    f"{bad} of {lw.size} importance weights are not finite: the log density "
                    "is undefined where the paths put mass. Use resample=False to see the "
                    "unweighted draws."
                )
            smoothed, _ = _psis_log_weights(lw)
            p = np.exp(smoothed - smoothed.max())
            idx = jax.random.choice(pick_key, z.shape[0], (n,), p=jnp.asarray(p / p.sum()))
            z = z[idx]
        else:
            z = z[:n]
        return jax.vmap(self.target.to_constrained)(z)

    _subject = "these draws"
    _arviz_note = "importance-resampled draws of the paths' mixture"

    def _summary_header(self) -> str:
        return (
            f"veil pathfinder: {self.num_paths} paths, dim {self.target.dim}, "
            f"{self.num_grad_evals} gradient + {self.num_logp_evals} density evaluations, "
            f"{self.wall_time:.2f} s, best ELBO {self.elbo:.2f}"
        )

    def verdict(self) -> tuple[list[str], bool]:
        """The k-hat of the paths' mixture in plain words, the paths that found nothing, and
        a yes/no."""
        khat = self.khat
        ok = khat_ok(khat)
        lines = [f"PSIS k-hat of the paths' mixture = {format_khat(khat)}: {khat_verdict(khat)}"]
        dead = int(np.sum(~np.isfinite(np.asarray(self.paths.elbo))))
        if dead:
            lines.append(f"{dead} of {self.num_paths} paths found no approximation with a finite ELBO.")
        lines.append("Verdict: OK to use." if ok else f"Verdict: do NOT trust {self._subject} as they stand.")
        return lines, ok

    def _plot_title(self) -> str:
        return f"{self.num_paths} paths; k-hat {format_khat(self.khat)}"


# ---------------------------------------------------------------------- moving a family
# ---------------------------------------------------------------------- public entry point
def pathfinder(
    target,
    *,
    key: jax.Array,
    num_paths: int = 4,
    max_iters: int = 1000,
    history: int = 6,
    num_elbo_draws: int = 25,
    init=None,
    init_radius: float = 2.0,
    rel_tol: float = 1e-7,
    grad_tol: float = 1e-6,
) -> PathfinderResult:
    """Multi-path Pathfinder variational inference (Zhang, Carpenter, Gelman & Vehtari 2022).

    Runs ``num_paths`` L-BFGS paths on ``-log p`` from independent starts (one compiled,
    vmapped program); along each, builds the Gaussian ``N(x + H g, H)`` from L-BFGS's
    inverse-Hessian estimate ``H`` at every iterate and keeps the one with the largest ELBO
    (``num_elbo_draws`` draws each). The result's ``q`` is the best of these Gaussians;
    ``draws`` resample the paths' mixture with Pareto-smoothed importance weights.

    Args:
        target: a :class:`veil.Target` or a log-density function on ``R^dim`` (then ``init``
            must be given to fix ``dim``).
        key: a JAX PRNG key (starting points and ELBO draws).
        num_paths: independent paths (Stan's default is 4).
        max_iters: cap on L-BFGS iterations per path (Stan: 1000).
        history: L-BFGS pairs kept (Stan: 6); the covariance has rank ``2 history`` on top
            of its diagonal.
        num_elbo_draws: draws per ELBO estimate along the path (Stan: 25).
        init: starting point(s), shape ``[dim]`` or ``[num_paths, dim]`` on the unconstrained
            scale; default uniform on ``[-init_radius, init_radius]^dim`` per path (Stan's).
        rel_tol: a path stops when ``-log p`` changes by less than this relative amount.
        grad_tol: ... or when every gradient component is below this.

    Returns:
        :class:`PathfinderResult`.

    Raises:
        ValueError: before any optimisation, for bad arguments or a log density that is not
            finite (or has a non-finite gradient) at every starting point.
    """

    _check_key(key)
    num_paths = _check_positive_int("num_paths", num_paths)
    max_iters = _check_positive_int("max_iters", max_iters)
    history = _check_positive_int("history", history)
    num_elbo_draws = _check_positive_int("num_elbo_draws", num_elbo_draws)
    for name, v in (("init_radius", init_radius), ("rel_tol", rel_tol), ("grad_tol", grad_tol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite non-negative number, got {v!r}.")
    if not isinstance(target, Target):
        if not callable(target):
            raise TypeError(
                f"target must be a veil.Target or a log-density function, got {type(target).__name__}."
            )
        if init is None:
            raise ValueError(
                "A plain log-density function needs init=... (or use "
                "veil.Target.from_logdensity(fn, dim))."
            )
        target = Target.from_logdensity(target, dim=int(np.shape(init)[-1]))
    dim = target.dim
    init_key, run_key, diag_key = jax.random.split(key, 3)
    if init is None:
        x0s = jax.random.uniform(init_key, (num_paths, dim), minval=-init_radius, maxval=init_radius)
    else:
        x0s = jnp.asarray(init, float)
        if x0s.shape == (dim,):
            x0s = jnp.broadcast_to(x0s, (num_paths, dim))
        if x0s.shape != (num_paths, dim):
            raise ValueError(f"init must have shape ({dim},) or ({num_paths}, {dim}), got {x0s.shape}.")
        if not bool(jnp.all(jnp.isfinite(x0s))):
            raise ValueError("init holds non-finite values; pass finite starting points.")
    values, grads = _start_values(target, x0s)
    ok = np.isfinite(np.asarray(values)) & np.isfinite(np.asarray(grads)).all(axis=1)
    if not ok.any():
        raise ValueError(
            f"The log density (or its gradient) is not finite at any of the {num_paths} "
            "starting points. Remedy: pass init=... inside the support, or a smaller "
            "init_radius; check the model for NaN data or a log density that is -inf there."
        )
    start = time.perf_counter()
    keys = jax.random.split(run_key, num_paths)
    settings = (max_iters, history, num_elbo_draws, float(rel_tol), float(grad_tol))
    paths = _run_paths(target, x0s, values, grads, keys, settings)
    paths = jax.block_until_ready(paths)
    wall = time.perf_counter() - start
    elbos = np.asarray(paths.elbo)
    if not np.isfinite(elbos).any():
        raise RuntimeError(
            "No Pathfinder path found an approximation with a finite ELBO estimate: the log "
            "density is not finite where the Gaussians put mass. Try more paths, other "
            "starting points (init=...), or check the model."
        )
    best = int(np.nanargmax(np.where(np.isfinite(elbos), elbos, -np.inf)))
    return PathfinderResult(target, paths, best, wall, diag_key)
