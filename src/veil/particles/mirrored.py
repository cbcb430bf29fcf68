"""Mirrored SVGD and Stein variational mirror descent (Shi, Liu & Mackey 2022, "Sampling
with mirrored Stein operators") for targets on constrained domains."""

from __future__ import annotations


import equinox as eqx
import jax.numpy as jnp
import numpy as np
import optax

from veil._checks import check_positive as _check_positive
from veil.kernels import _sq_dists
from veil.particles.mirror import MirrorMap
from veil.particles.base import OptaxMethod, _adagrad, _report_and_scores, svgd_bandwidth


class MirroredSVGD(OptaxMethod):
    """Mirrored SVGD (Shi, Liu & Mackey 2022, "Sampling with Mirrored Stein Operators") for a
    target on a constrained set: simplex, positive orthant or box (:mod:`veil.particles.mirror`).

    The target's log density is ``log p(theta)`` on the set itself (Lebesgue measure in its
    coordinates; for the simplex, the first ``d`` of ``d + 1`` coordinates). The particles
    move in the mirror map's dual space, ``eta = grad psi(theta)``, along

    ``g(theta_j) = (1/n) sum_i [k(theta_i, theta_j) grad_eta log p_H(eta_i)
    + hess psi(theta_i)^{-1} grad_{theta_i} k(theta_i, theta_j)]``,

    the kernelised steepest descent of ``KL(q || p)`` under the mirrored Stein operator, with
    ``p_H(eta) = p(theta) |det hess psi(theta)|^{-1}`` the target's density in the dual space and
    the RBF kernel on the primal points ``theta`` (median heuristic there). It is SVGD on
    ``p_H`` with the kernel ``k(grad psi*(eta), grad psi*(eta'))``; every particle stays inside
    the set because ``theta = grad psi*(eta)`` always is.

    Args:
        mirror: a :class:`veil.particles.mirror.MirrorMap` (``Simplex()``, ``Positive()``, ``Box(a, b)``).
        step_size: AdaGrad's step size (as for :class:`SVGD`).
        bandwidth: a fixed RBF bandwidth on ``theta``; ``None`` for the median heuristic.
        optimizer: an optax transformation instead of AdaGrad (``optax.contrib.cocob(alpha=1.0)`` for
            a coin-betting, step-size-free version); reuse the same object between runs.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> alpha = jnp.array([2.0, 3.0, 5.0])   # Dirichlet(2, 3, 5) by its first 2 coordinates
        >>> def log_p(t):
        ...     full = jnp.concatenate([t, 1.0 - jnp.sum(t, keepdims=True)])
        ...     return jnp.sum((alpha - 1.0) * jnp.log(full))
        >>> t = veil.Target.from_logdensity(log_p, dim=2)
        >>> res = veil.particles.run(t, veil.particles.MirroredSVGD(veil.particles.mirror.Simplex()),
        ...                          key=jax.random.key(0), n_particles=100, progress=False)
        >>> [round(float(m), 1) for m in res.particles.mean(0)]   # alpha / sum(alpha)
        [0.2, 0.3]
    """

    mirror: MirrorMap
    step_size: float = 0.1
    bandwidth: float | None = None
    custom_optimizer: optax.GradientTransformation | None = eqx.field(default=None, static=True)

    def __init__(self, mirror: MirrorMap, step_size: float = 0.1, bandwidth: float | None = None, optimizer=None):
        if not isinstance(mirror, MirrorMap):
            raise TypeError(
                f"mirror must be a veil.particles.mirror map (Simplex(), Positive(), Box(low, high)), got {mirror!r}."
            )
        _check_positive("step_size", step_size)
        if bandwidth is not None:
            _check_positive("bandwidth", bandwidth)
        if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}.")
        self.mirror, self.step_size = mirror, float(step_size)
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        self.custom_optimizer = optimizer

    @property
    def optimizer(self):
        return self.custom_optimizer if self.custom_optimizer is not None else _adagrad(self.step_size)

    def positions(self, z):
        return self.mirror.primal(z)

    def coordinates(self, x):
        return self.mirror.dual(x)

    def check_init(self, x):
        bad = self.mirror.outside(x)
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} starting particle(s) lie outside {self.mirror.description} "
                f"(the first is row {int(np.flatnonzero(bad)[0])}): mirrored methods start, and "
                "stay, strictly inside the set."
            )

    def log_density_fn(self, target):
        def dual_log_density(eta):
            return target.log_density(self.mirror.primal(eta)) + self.mirror.log_det_jacobian(eta)

        return dual_log_density

    def direction(self, target, z, key):
        report, scores = _report_and_scores(self, target, z, key)
        theta = self.mirror.primal(z)
        h = svgd_bandwidth(theta) if self.bandwidth is None else self.bandwidth
        k = jnp.exp(-_sq_dists(theta, theta) / (2.0 * h**2))
        # sum_i k_ij hess psi(theta_i)^{-1} (theta_j - theta_i) / h^2: the RBF kernel's gradient
        # in theta_i, carried to eta_i by d theta / d eta = hess psi^{-1}.
        repulsion = (self.mirror.kernel_pairs(k, theta) - k @ self.mirror.hess_inv_vp(theta, theta)) / h**2
        return report, (k @ scores + repulsion) / z.shape[0]


def _adaptive_direction(k, h, scores, spread, pairs, metric_vp, threshold):
    """The Stein direction under the adaptive matrix kernel of Shi, Liu & Mackey (2022),

    ``K_t(x, y) = sum_ij sqrt(mu_i mu_j) u_i(x) u_j(y) Gamma_ij``,
    ``Gamma_ij = E_q[u_i u_j G]``,

    with ``(mu_i, u_i)`` the eigenpairs of the kernel's integral operator under the particles
    (the Gram matrix's, extended off the particles by Nystrom) and ``G`` a metric; for one
    particle it is ``k G``. Every argument is per particle:

    - ``scores``: ``G^{-1} grad log p`` plus the divergence of ``G^{-1}`` (in a mirror map's
      dual space: the dual scores, which hold both);
    - ``spread``: ``G_i^{-1} x_i``; ``pairs``: ``sum_i k_ij G_i^{-1} x_j`` (the RBF kernel's
      gradient carried by ``G^{-1}``, whose sum over the particles is the repulsion);
    - ``metric_vp(w)``: ``G_i w_i`` for each row.

    With ``k = E L E^T`` (``L`` the eigenvalues kept: the largest, making up ``threshold`` of
    the trace; the rest would enter through ``1 / sqrt(L)`` and only add noise) the direction
    ``(1/n) sum_j [K(x_i, x_j) s_j + div_j K(x_i, x_j) G_j^{-1}]`` reduces to

    ``phi = E sqrt(L) E^T G (E c)``,
    ``c = (1/n) [sqrt(L) E^T (s - spread / h^2) + E^T pairs / (sqrt(L) h^2)]``:

    two ``n x n`` eigenvectors' products, no ``[n, n, d, d]`` kernel. With ``G = I`` and
    every eigenvalue kept it is :func:`stein_direction` exactly.
    """
    n = k.shape[0]
    lam, vec = jnp.linalg.eigh(k)  # ascending
    lam = jnp.maximum(lam, 0.0)
    desc = lam[::-1]
    before = (jnp.cumsum(desc) - desc) / jnp.sum(desc)
    # The largest eigenvalues up to and including the one that reaches the threshold, and
    # none below float32's resolution of the largest (their eigenvectors are noise).
    keep = (before < threshold)[::-1] & (lam > 1e-5 * lam[-1])
    safe = jnp.where(keep, lam, 1.0)
    root = jnp.where(keep, jnp.sqrt(safe), 0.0)[:, None]
    inv_root = jnp.where(keep, 1.0 / jnp.sqrt(safe), 0.0)[:, None]
    c = (root * (vec.T @ (scores - spread / h**2)) + inv_root * (vec.T @ pairs) / h**2) / n
    return vec @ (root * (vec.T @ metric_vp(vec @ c)))


def _check_threshold(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(
            f"eigen_threshold must be in (0, 1] (the share of the Gram matrix's trace whose "
            f"eigenvalues the adaptive kernel keeps; the paper uses 0.98), got {value!r}."
        )


class SVMD(MirroredSVGD):
    """Stein variational mirror descent (Shi, Liu & Mackey 2022, "Sampling with Mirrored
    Stein Operators") for a target on a constrained set: :class:`MirroredSVGD` with a kernel
    that adapts to the mirror map's geometry.

    MSVGD's kernel is ``k(theta, theta') I``; SVMD's is
    ``K_t(theta, theta') = sum_ij sqrt(mu_i mu_j) u_i(theta) u_j(theta') Gamma_ij`` with
    ``Gamma_ij = E_q[u_i u_j hess psi]`` and ``(mu_i, u_i)`` the eigenpairs of ``k``'s
    integral operator under the particles: roughly ``k^{1/2} hess psi k^{1/2}``, so that for
    a single particle the move in the dual space is ``hess psi`` times MSVGD's, that is,
    mirror descent on ``log p`` (up to the entropy's log determinant term). Near the
    boundary of the set, where ``hess psi`` is large, particles take proportionately larger
    dual steps instead of crawling. Each step eigendecomposes the ``n x n`` Gram matrix
    (``O(n^3)``; fine for hundreds of particles) and keeps the eigenvalues that make up
    ``eigen_threshold`` of its trace (the paper's 0.98). See :func:`_adaptive_direction`
    for the computation, which never forms the ``[n, n, d, d]`` kernel.

    Args:
        mirror, bandwidth: as for :class:`MirroredSVGD`.
        step_size: AdaGrad's step size. Plain steps (``optimizer=optax.sgd(...)``, mirror
            descent's own) are unstable here: near the boundary ``hess psi`` is large, and so
            is the move. On Dirichlet(2, 3, 5, 0.7, 1.5) plain steps of 0.03 to 0.3 reached
            a good fit and then left it for non-finite points within 300 to 3,000 steps;
            AdaGrad's moves are bounded by its step, and 0.1 to 1 were all stable. The default
            step, 0.5, let the default stopping rule stop after 800 to 3,300 steps on
            Dirichlet(2, 3, 5, 0.7) with 50 and 200 particles; 0.1 had not stopped at 5,000.
        optimizer: an optax transformation instead of AdaGrad.
        eigen_threshold: the share of the Gram matrix's trace kept, in ``(0, 1]``.

    Examples:
        >>> import jax, jax.numpy as jnp, veil
        >>> def log_p(t):   # two independent Gamma(3, 2): mean 1.5, on the positive orthant
        ...     return jnp.sum(2.0 * jnp.log(t) - 2.0 * t)
        >>> t = veil.Target.from_logdensity(log_p, dim=2)
        >>> res = veil.particles.run(t, veil.particles.SVMD(veil.particles.mirror.Positive()),
        ...                          key=jax.random.key(0), n_particles=100, progress=False)
        >>> [round(float(m), 1) for m in res.particles.mean(0)]
        [1.5, 1.5]
    """

    eigen_threshold: float = 0.98

    def __init__(self, mirror: MirrorMap, step_size: float = 0.5, bandwidth: float | None = None,
                 optimizer=None, eigen_threshold: float = 0.98):
        super().__init__(mirror, step_size=step_size, bandwidth=bandwidth, optimizer=optimizer)
        _check_threshold(eigen_threshold)
        self.eigen_threshold = float(eigen_threshold)

    def direction(self, target, z, key):
        report, scores = _report_and_scores(self, target, z, key)
        theta = self.mirror.primal(z)
        h = svgd_bandwidth(theta) if self.bandwidth is None else self.bandwidth
        k = jnp.exp(-_sq_dists(theta, theta) / (2.0 * h**2))
        # In the dual space the mirrored Stein operator is the ordinary one for p_H, whose
        # scores already hold the divergence of hess psi^{-1} (through its log determinant).
        phi = _adaptive_direction(
            k, h, scores, self.mirror.hess_inv_vp(theta, theta), self.mirror.kernel_pairs(k, theta),
            lambda w: self.mirror.hess_vp(theta, w), self.eigen_threshold,
        )
        return report, phi
