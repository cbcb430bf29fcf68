"""``veil.optim.clip_outliers``: the exact rule, its clipping rate under Gaussian noise, and
what it protects Adam from."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import veil
from veil.optim import clip_outliers


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
