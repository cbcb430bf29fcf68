"""``veil.optim.clip_outliers``: the exact rule, its clipping rate under Gaussian noise, and
what it protects Adam from."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import veil
import veil.optim
from veil.optim import clip_outliers, factor_step_interval, whitened_factor, whitened_location


def _reference(grads: np.ndarray, threshold: float, decay: float) -> np.ndarray:
    """The rule written out step by step in NumPy (float64)."""
    ms = np.zeros(grads.shape[1])
    out = []
    for t, g in enumerate(grads, start=1):
        if t > 1:
            bound = threshold * np.sqrt(ms / (1 - decay ** (t - 1)))
            g = np.where(bound > 0, np.clip(g, -bound, bound), g)
        ms = decay * ms + (1 - decay) * g**2
        out.append(g)
    return np.stack(out)


def test_matches_the_rule_step_by_step():
    # Heavy-tailed gradients (Student t, 1.5 dof) so that many steps are clipped, a
    # coordinate that is zero at first (never clipped while its average is zero), and a fast
    # decay so that the bias correction matters throughout.
    rng = np.random.default_rng(0)
    grads = rng.standard_t(1.5, size=(60, 4)).astype(np.float32)
    grads[:5, 3] = 0.0
    tx = clip_outliers(threshold=2.0, decay=0.9)
    state = tx.init(jnp.zeros(4))
    got = []
    for g in grads:
        u, state = tx.update(jnp.asarray(g), state)
        got.append(np.asarray(u))
    want = _reference(grads.astype(np.float64), 2.0, 0.9)
    assert (np.asarray(got) != grads).sum() > 5  # the test exercises clipping
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_first_step_and_pytrees_pass_through():
    tx = clip_outliers()
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    state = tx.init(params)
    g = {"a": jnp.array([1e6, -2.0, 0.0]), "b": jnp.ones((2, 2))}
    u, _ = tx.update(g, state)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), u, g))


def test_clipping_rate_under_gaussian_noise():
    # For N(0, 1) gradients the threshold settles at t* = c * sqrt(E[min(g^2, t*^2)]) (the
    # average is of clipped squares); the fraction clipped is then 2 Phi(-t*). With c = 2,
    # t* ~ 1.92 and the rate ~ 5.5%. 20,000 steps x 8 coordinates: binomial sd ~ 0.0006;
    # the threshold's own jitter (an average over ~2,000 steps at decay 0.999) adds about
    # 0.001 to the fraction's sd. Tolerance 0.006: over 4 sd of the two together.
    c = 2.0

    def clipped_square_mean(t):
        return (2 * stats.norm.cdf(t) - 1) - 2 * t * stats.norm.pdf(t) + t**2 * 2 * stats.norm.cdf(-t)

    t = c
    for _ in range(200):
        t = c * np.sqrt(clipped_square_mean(t))
    want = 2 * stats.norm.cdf(-t)

    tx = clip_outliers(threshold=c)
    g = jax.random.normal(jax.random.key(0), (20_000, 8))

    def step(state, gi):
        u, state = tx.update(gi, state)
        return state, jnp.sum(u != gi)

    _, n = jax.lax.scan(step, tx.init(jnp.zeros(8)), g)
    rate = float(jnp.sum(n[2_000:])) / (18_000 * 8)  # after the average has settled
    assert abs(rate - want) < 0.006, (rate, want)


def test_one_outlier_does_not_silence_adam():
    # Unit gradients with one 1e6 spike at step 50. Plain Adam's second moment takes the
    # spike in (v ~ 1e9 at b2 = 0.999) and 200 steps later its update is ~1e-3 of the step
    # size; behind the clip the spike counts as 5 RMS and the update stays ~ the step size.
    g = np.ones((250, 1), np.float32)
    g[50] = 1e6

    def last_update(tx):
        state = tx.init(jnp.zeros(1))
        for gi in g:
            u, state = tx.update(jnp.asarray(gi), state)
        return abs(float(u[0]))

    assert last_update(optax.adam(0.05)) < 0.05 * 0.01
    assert last_update(optax.chain(clip_outliers(), optax.adam(0.05))) > 0.05 * 0.8


def test_default_optimizer_clips():
    # The default is the clip chained before Adam 0.05: the spike test above through it.
    tx = veil.default_optimizer()
    state = tx.init(jnp.zeros(1))
    for i in range(250):
        u, state = tx.update(jnp.array([1e6 if i == 50 else 1.0]), state)
    assert abs(float(u[0])) > 0.05 * 0.8


@pytest.mark.parametrize("kw", [{"threshold": 0.0}, {"threshold": -1.0}, {"decay": 1.0}, {"decay": 0.0}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError, match="threshold|decay"):
        clip_outliers(**kw)


# ----------------------------------------------------------------------------- whitened_location
def _whitened_reference(gs, A, lr, b1, b2, threshold, eps=1e-8):
    """The whitened location step written out in NumPy (float64): u = A^T g clipped at
    threshold x the running RMS, Adam's first moment over one shared second moment, mapped
    back with A."""
    m = np.zeros(A.shape[1])
    v = 0.0
    out = []
    for t, g in enumerate(gs, start=1):
        u = A.T @ g
        if t > 1:
            bound = threshold * np.sqrt(v / (1 - b2 ** (t - 1)))
            u = np.clip(u, -bound, bound)
        m = b1 * m + (1 - b1) * u
        v = b2 * v + (1 - b2) * np.mean(u**2)
        out.append(-lr * A @ ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)))
    return np.stack(out)


@pytest.mark.parametrize("make", [lambda: veil.MeanField(3), lambda: veil.FullRank(3), lambda: veil.LowRank(3, 2)],
                         ids=["MeanField", "FullRank", "LowRank"])
def test_whitened_location_matches_the_rule_step_by_step(make, key):
    # A generic family (every parameter moved off its start), heavy-tailed location
    # gradients so that some steps are clipped, and a fast b2 so the bias correction matters.
    # The inner optimizer (SGD 0.1) gives the location its own step and every other
    # parameter its whole update; both must come through exactly.
    leaves, tree = jax.tree.flatten(make())
    q = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(jax.random.fold_in(key, i), x.shape)
                                  for i, x in enumerate(leaves)])
    A = np.asarray(jax.jacobian(lambda e: q.transform_and_log_prob(e[None])[0][0])(jnp.zeros(q.noise_dim)), np.float64)
    rng = np.random.default_rng(1)
    gs = rng.standard_t(1.5, size=(40, 3))
    tx = whitened_location(optax.sgd(0.1), 0.05, b1=0.8, b2=0.9, threshold=2.0)
    state = tx.init(q)
    got = []
    for i, g in enumerate(gs):
        grads = eqx.tree_at(lambda m: m.loc, jax.tree.map(lambda x: jnp.full_like(x, i), q), jnp.asarray(g, jnp.float32))
        u, state = tx.update(grads, state, q)
        got.append(np.asarray(u.loc) + 0.1 * g)  # the whitened part alone
        # Every other parameter: SGD's update, -0.1 x its gradient, exactly.
        others = eqx.tree_at(lambda m: m.loc, u, jnp.zeros(3))
        want_others = eqx.tree_at(lambda m: m.loc, jax.tree.map(lambda x: -0.1 * x, grads), jnp.zeros(3))
        assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.allclose(x, y, rtol=1e-6)), others, want_others))
    want = _whitened_reference(gs, A, 0.05, 0.8, 0.9, 2.0)
    # float32 against float64 over 40 steps: round-off ~1e-6 relative; tolerance 1e-4.
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_whitened_location_points_at_a_gaussian_target_mean():
    # When q's covariance A A^T equals the target's, the whitened step of a quadratic log
    # density's gradient g = P (m - mu) is -lr (m - mu) / rms(u): exactly along mu - m,
    # however strongly correlated the target (here 0.99), where Adam's step alone is not.
    S = np.array([[1.0, 0.99], [0.99, 1.0]])
    L = np.linalg.cholesky(S)
    q = veil.FullRank(2)
    q = eqx.tree_at(lambda m: (m.log_scale, m.unit_tril), q,
                    (jnp.log(jnp.asarray(np.diag(L), jnp.float32)),
                     jnp.asarray(np.sqrt(2) * (L / np.diag(L)[:, None] - np.eye(2)), jnp.float32)))
    np.testing.assert_allclose(np.asarray(q.cov), S, rtol=1e-5)
    m_minus_mu = np.array([1.0, 1.2])  # mostly along the long axis: the gradient points across it
    g = np.linalg.solve(S, m_minus_mu)   # the loss's gradient in the location
    grads = eqx.tree_at(lambda m: m.loc, jax.tree.map(jnp.zeros_like, q), jnp.asarray(g, jnp.float32))
    tx = whitened_location(optax.sgd(0.0), 0.05)
    step, _ = tx.update(grads, tx.init(q), q)
    step = np.asarray(step.loc, np.float64)
    cos = step @ -m_minus_mu / np.linalg.norm(step) / np.linalg.norm(m_minus_mu)
    assert cos > 1 - 1e-5
    adam, _ = optax.adam(0.05).update(grads, optax.adam(0.05).init(q), q)
    a = np.asarray(adam.loc, np.float64)
    assert a @ -m_minus_mu / np.linalg.norm(a) / np.linalg.norm(m_minus_mu) < 0.2  # Adam: nearly orthogonal


def test_whitened_location_leaves_other_families_to_the_inner_optimizer(key):
    # A flow (no location-scale form) and plain arrays get the inner update bit for bit.
    inner = optax.chain(clip_outliers(), optax.adam(0.05))
    tx = whitened_location(inner)
    flow = eqx.filter(veil.flows.planar(2, key=key), eqx.is_inexact_array)
    for params in (jnp.zeros(3), flow):
        grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.3, params)
        a, _ = tx.update(grads, tx.init(params), params)
        b, _ = inner.update(grads, inner.init(params), params)
        assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


@pytest.mark.parametrize("kw", [{"learning_rate": 0.0}, {"b1": 1.0}, {"b2": -0.1}, {"threshold": 0.0}])
def test_whitened_location_refuses_bad_settings(kw):
    with pytest.raises(ValueError, match="learning_rate|b1|threshold"):
        whitened_location(optax.adam(0.05), **kw)


def test_whitened_location_starts_its_scale_after_zero_gradients():
    # Location gradients exactly zero for the first steps (a symmetric start) leave the
    # running scale at zero; the first non-zero gradient must then pass unclipped (a zero
    # bound would clip it, and every later one, to nothing), as clip_outliers does.
    q = veil.FullRank(2)
    tx = whitened_location(optax.sgd(0.0), 0.05)
    state = tx.init(q)
    zero = jax.tree.map(jnp.zeros_like, q)
    for _ in range(3):
        step, state = tx.update(zero, state, q)
        assert float(jnp.abs(step.loc).max()) == 0.0
    step, state = tx.update(eqx.tree_at(lambda m: m.loc, zero, jnp.array([1.0, 0.0])), state, q)
    assert float(step.loc[0]) < -1e-3


def _moved(q, key, size=0.3):
    """``q`` with every parameter moved off its start (a generic point)."""
    leaves, tree = jax.tree.flatten(q)
    return jax.tree.unflatten(tree, [x + size * jax.random.normal(jax.random.fold_in(key, i), x.shape)
                                     for i, x in enumerate(leaves)])


def _factor_params(q, M):
    """FullRank's (log_scale, unit_tril) for the factor L (I + tril(M)), written generically:
    the decomposition L' = diag(s') U' with U' unit lower triangular, T' = sqrt(d) (U' - I)."""
    Lp = q.scale_tril @ (jnp.eye(q.dim) + jnp.tril(M))
    dg = jnp.diagonal(Lp)
    return jnp.log(dg), np.sqrt(q.dim) * jnp.tril(Lp / dg[:, None], -1)


def test_factor_operators_are_the_jacobian_and_its_adjoint(key):
    # factor_matvec(M) is the derivative of M -> params(L (I + M)) at M = 0 and
    # factor_rmatvec its adjoint: both checked against jax.jvp / jax.vjp of the generic
    # decomposition above (float32, different paths: 1e-5 relative).
    q = _moved(veil.FullRank(5), key)
    M = jnp.tril(jax.random.normal(jax.random.fold_in(key, 7), (5, 5)))
    _, (dls, dut) = jax.jvp(lambda m: _factor_params(q, m), (jnp.zeros((5, 5)),), (M,))
    step = q.factor_matvec(M)
    np.testing.assert_allclose(step.log_scale, dls, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(step.unit_tril, dut, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(step.loc).max()) == 0.0
    g = eqx.tree_at(lambda m: (m.log_scale, m.unit_tril), jax.tree.map(jnp.zeros_like, q),
                    (jax.random.normal(jax.random.fold_in(key, 8), (5,)),
                     jax.random.normal(jax.random.fold_in(key, 9), (5, 5))))
    _, vjp = jax.vjp(lambda m: _factor_params(q, m), jnp.zeros((5, 5)))
    np.testing.assert_allclose(q.factor_rmatvec(g), jnp.tril(vjp((g.log_scale, jnp.tril(g.unit_tril, -1)))[0]),
                               rtol=1e-5, atol=1e-5)


def test_whitened_factor_keeps_a_scaled_posteriors_correlations():
    # q's covariance c^2 times a strongly correlated Gaussian target's: the KL's gradient in
    # the whitened factor move M is tril(L^T P L - I) = (c^2 - 1) I exactly, so the factor
    # step rescales L as a whole and leaves the correlations (unit_tril) where they are;
    # Adam's step, per parameter, changes them.
    S = np.array([[1.0, 0.95, 0.5], [0.95, 1.0, 0.6], [0.5, 0.6, 1.0]])
    c = 0.5
    L = c * np.linalg.cholesky(S)
    q = eqx.tree_at(lambda m: (m.log_scale, m.unit_tril), veil.FullRank(3),
                    (jnp.log(jnp.asarray(np.diag(L), jnp.float32)),
                     jnp.asarray(np.sqrt(3) * (L / np.diag(L)[:, None] - np.eye(3)), jnp.float32)))
    P = jnp.asarray(np.linalg.inv(S), jnp.float32)

    def kl(q):  # KL(q || N(0, S)) up to a constant
        C = q.cov
        return 0.5 * (jnp.trace(P @ C) + q.loc @ P @ q.loc) - jnp.sum(q.log_scale)

    grads = jax.grad(kl)(q)
    np.testing.assert_allclose(q.factor_rmatvec(grads), (c**2 - 1) * np.eye(3), atol=2e-5)
    tx = whitened_factor(optax.sgd(0.0), 0.1, every=1)
    step, _ = tx.update(grads, tx.init(q), q)
    assert float(jnp.abs(step.unit_tril).max()) < 1e-6
    np.testing.assert_allclose(step.log_scale, step.log_scale[0], rtol=1e-6)
    assert float(step.log_scale[0]) > 0  # q is too narrow (c < 1): it widens
    adam, _ = optax.adam(0.05).update(grads, optax.adam(0.05).init(q), q)
    assert float(jnp.abs(adam.unit_tril).max()) > 1e-3


def _factor_reference(q, gs_ls, gs_ut, lr, every, b1, b2, eps, threshold):
    """The factor step written out in NumPy (float64), from the family's operators as
    matrices: column j of J is the parameter change of M = E_j (the jvp above)."""
    d = q.dim
    idx = [(i, j) for i in range(d) for j in range(i + 1)]

    def J(M):
        _, (a, b) = jax.jvp(lambda m: _factor_params(q, m), (jnp.zeros((d, d)),), (jnp.asarray(M, jnp.float32),))
        return np.concatenate([np.asarray(a, np.float64), np.asarray(b, np.float64).ravel()])

    cols = []
    for i, j in idx:
        E = np.zeros((d, d))
        E[i, j] = 1.0
        cols.append(J(E))
    Jm = np.stack(cols, 1)  # (d + d*d) x (number of lower entries)
    m = np.zeros(len(idx))
    v = 0.0
    acc = np.zeros(Jm.shape[0])
    out = []
    for t, (a, b) in enumerate(zip(gs_ls, gs_ut), start=1):
        acc = acc + np.concatenate([a, np.tril(b, -1).ravel()])
        if t % every:
            out.append(np.zeros(Jm.shape[0]))
            continue
        k = t // every
        u = Jm.T @ (acc / every)
        acc = np.zeros_like(acc)
        if k > 1:
            bound = threshold * np.sqrt(v / (1 - b2 ** (k - 1)))
            u = np.clip(u, -bound, bound)
        m = b1 * m + (1 - b1) * u
        v = b2 * v + (1 - b2) * np.mean(u**2)
        D = (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + eps)
        out.append(Jm @ (-lr / np.sqrt(d) * D))
    return np.stack(out)


@pytest.mark.parametrize("cheap", [True, False], ids=["cond", "select"])
def test_whitened_factor_matches_the_rule_step_by_step(key, cheap, monkeypatch):
    # A generic FullRank, heavy-tailed factor gradients (some steps clipped), a fast b2, a
    # factor step every 3 steps from the mean gradient of those steps; the location gets
    # SGD's step alone. Both ways of waiting for the factor step (a branch on CPU, a selection on
    # GPUs) must give the same numbers.
    monkeypatch.setattr(veil.optim, "cheap_branches", lambda: cheap)
    q = _moved(veil.FullRank(3), key)
    rng = np.random.default_rng(2)
    gs_ls = rng.standard_t(1.5, size=(30, 3))
    gs_ut = np.tril(rng.standard_t(1.5, size=(30, 3, 3)), -1)
    gs_loc = rng.normal(size=(30, 3))
    tx = whitened_factor(optax.sgd(0.1), 0.1, every=3, b1=0.8, b2=0.9, threshold=2.0)
    state = tx.init(q)
    update = jax.jit(tx.update)  # traced once (after the patch above), not op by op
    got = []
    for a, b, c in zip(gs_ls, gs_ut, gs_loc):
        grads = eqx.tree_at(lambda m: (m.loc, m.log_scale, m.unit_tril), q,
                            tuple(jnp.asarray(x, jnp.float32) for x in (c, a, b)))
        u, state = update(grads, state, q)
        np.testing.assert_allclose(u.loc, -0.1 * c, rtol=1e-6)
        # the factor part alone: SGD's share (-0.1 g) taken out
        got.append(np.concatenate([np.asarray(u.log_scale) + 0.1 * a, (np.asarray(u.unit_tril) + 0.1 * b).ravel()]))
    want = _factor_reference(q, gs_ls, gs_ut, 0.1, 3, 0.8, 0.9, 1e-8, 2.0)
    assert np.abs(want).max() > 1e-2 and np.all(want[0::3] == 0) and np.all(want[1::3] == 0)
    # float32 against float64 over 10 factor steps; tolerance 1e-4 relative.
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=2e-5)


def test_whitened_factor_leaves_other_families_to_the_inner_optimizer(key):
    inner = optax.chain(clip_outliers(), optax.adam(0.05))
    tx = whitened_factor(inner)
    flow = eqx.filter(veil.flows.planar(2, key=key), eqx.is_inexact_array)
    for params in (jnp.zeros(3), flow, veil.MeanField(3), veil.LowRank(3, 1)):
        grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.3, params)
        a, _ = tx.update(grads, tx.init(params), params)
        b, _ = inner.update(grads, inner.init(params), params)
        assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


@pytest.mark.parametrize("kw", [{"learning_rate": 0.0}, {"every": 0}, {"b1": 1.0},
                                {"threshold": -1.0}])
def test_whitened_factor_refuses_bad_settings(kw):
    with pytest.raises(ValueError, match="learning_rate|every|b1|threshold"):
        whitened_factor(optax.adam(0.05), **kw)


def test_factor_step_interval():
    assert [factor_step_interval(d) for d in (2, 10, 25, 97, 501)] == [1, 1, 2, 7, 32]


def test_whitened_factor_leaves_large_factors_alone_by_default():
    # Above max_dim (128 by default) a FullRank gets the inner update bit for bit.
    inner = optax.sgd(0.1)
    q = veil.FullRank(129)
    grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.3, q)
    for tx, same in ((whitened_factor(inner, every=1), True), (whitened_factor(inner, every=1, max_dim=None), False)):
        a, _ = tx.update(grads, tx.init(q), q)
        b, _ = inner.update(grads, inner.init(q), q)
        assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)) is same
