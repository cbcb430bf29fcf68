"""Minibatched targets and the in-loop batch source (issue 5, first slice)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import veil
from unchecked import unchecked
from veil.loop.batching import ROUNDS, Shuffled, permute
from veil.target import log_density_rows

N, B = 2000, 100
PRIOR_VAR = 10.0


def _gauss_data(seed=0, n=N):
    return np.random.default_rng(seed).normal(1.5, 1.0, size=n).astype(np.float32)


def _prior(z):
    return -0.5 * jnp.sum(z**2) / PRIOR_VAR


def _lik(z, xb):
    return jnp.sum(-0.5 * (xb - z[0]) ** 2)


def _exact_posterior(x):
    """x_i ~ N(mu, 1), mu ~ N(0, 10): the posterior is N(sum x / (n + 1/10), 1 / (n + 1/10))."""
    prec = x.size + 1 / PRIOR_VAR
    return float(np.sum(x, dtype=np.float64) / prec), float(1 / np.sqrt(prec))


# ------------------------------------------------------------------ the batch source
def _epoch_batches(src, state, count):
    """``count`` batches from ``src`` in one compiled scan (the loop's own way of calling it)."""
    state, batches = jax.jit(lambda s: jax.lax.scan(lambda s, _: src.next(s)[::-1], s, None, length=count))(state)
    return list(np.asarray(batches)), state


@pytest.mark.parametrize("n", [1, 2, 3, 5, 1000, 1025, 4096, 65537])
def test_permute_is_a_bijection(n):
    keys = jax.random.bits(jax.random.key(n), (ROUNDS,), jnp.uint32)
    out = np.asarray(jax.jit(permute, static_argnums=2)(jnp.arange(n), keys, n))
    np.testing.assert_array_equal(np.sort(out), np.arange(n))


def test_permutations_look_uniform():
    """Over 4000 epochs (keys) of N = 50 rows: each row's position and each row's presence in
    the first 10-row batch are uniform (chi-square, 49 dof: the 1e-5 upper quantile is 99.6),
    and rows 0 and 1, neighbours as inputs (where a weak permutation shows structure), share
    the first batch as often as random pairs do: 4000 (10/50)(9/49) = 147, sd ~12; 5 sd."""
    n, m = 50, 4000
    keys = jax.random.bits(jax.random.key(0), (m, ROUNDS), jnp.uint32)
    perms = np.asarray(jax.jit(jax.vmap(lambda k: permute(jnp.arange(n), k, n)))(keys))
    first = perms[:, :10]
    counts = np.bincount(first.ravel(), minlength=n)
    expected = m * 10 / n
    assert np.sum((counts - expected) ** 2 / expected) < 99.6
    pos0 = np.bincount(np.argmax(perms == 0, axis=1), minlength=n)
    assert np.sum((pos0 - m / n) ** 2 / (m / n)) < 99.6
    both = np.sum((first == 0).any(1) & (first == 1).any(1))
    assert abs(both - 146.9) < 5 * 12


def test_each_epoch_serves_every_row_once():
    src = Shuffled(jnp.arange(N), batch_size=B)
    state = src.init(jax.random.key(0))
    first, state = _epoch_batches(src, state, N // B)
    second, _ = _epoch_batches(src, state, N // B)
    for epoch in (first, second):
        assert sorted(np.concatenate(epoch).tolist()) == list(range(N))
    # A fresh permutation per epoch, not the same order again, and not the identity.
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))
    assert not np.array_equal(np.concatenate(first), np.arange(N))


def test_remainder_rows_sit_out_and_rows_stay_aligned():
    """N = 1050, B = 100: 10 batches per epoch of distinct rows; the leaves of a pytree are
    gathered with the same indices (row i of X goes with row i of y)."""
    n = 1050
    X = jnp.arange(2 * n).reshape(n, 2)
    y = jnp.arange(n)
    src = Shuffled((X, y), batch_size=B)
    state = src.init(jax.random.key(1))
    assert src.batches_per_epoch == 10
    state, (xb, yb) = jax.jit(lambda s: jax.lax.scan(lambda s, _: src.next(s)[::-1], s, None, length=10))(state)
    np.testing.assert_array_equal(np.asarray(xb[..., 0]), 2 * np.asarray(yb))
    seen = np.asarray(yb).ravel()
    assert len(np.unique(seen)) == 1000


def test_batch_order_is_a_function_of_the_key():
    src = Shuffled(jnp.arange(N), batch_size=B)
    a, _ = _epoch_batches(src, src.init(jax.random.key(3)), 3)
    b, _ = _epoch_batches(src, src.init(jax.random.key(3)), 3)
    c, _ = _epoch_batches(src, src.init(jax.random.key(4)), 3)
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))


# ------------------------------------------------------------------ the target
def test_full_data_density_and_epoch_average_identity():
    """With B dividing N, the average over one epoch's batches of the scaled batch density is
    exactly the full-data density (each row once, times N/B, over N/B batches): an identity,
    checked to float32 rounding, for the value and the gradient."""
    x = _gauss_data()
    t = veil.Target.minibatched(_prior, _lik, x, dim=1, batch_size=B)
    z = jnp.array([1.3])
    full = _prior(z) + _lik(z, jnp.asarray(x))
    np.testing.assert_allclose(t.log_density(z), full, rtol=1e-6)
    np.testing.assert_allclose(t.log_likelihood(z), _lik(z, jnp.asarray(x)), rtol=1e-6)
    src = Shuffled(t.data, batch_size=B)
    batches, _ = _epoch_batches(src, src.init(jax.random.key(0)), N // B)
    value_and_grad = jax.jit(jax.vmap(lambda b: jax.value_and_grad(t.on_batch(b).log_density)(z)))
    vals, grads = value_and_grad(jnp.asarray(np.stack(batches)))
    np.testing.assert_allclose(np.mean(vals), full, rtol=1e-5)
    np.testing.assert_allclose(np.mean(grads), jax.grad(t.log_density)(z), rtol=1e-4)
    # log_density_rows maps over draws in blocks: same values as a vmap.
    zs = jnp.linspace(0.0, 3.0, 7)[:, None]
    np.testing.assert_allclose(log_density_rows(t, zs), jax.vmap(t.log_density)(zs), rtol=1e-6)


def test_user_data_untouched():
    x = _gauss_data()
    before = x.copy()
    veil.Target.minibatched(_prior, _lik, x, dim=1, batch_size=B)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize(
    "data, batch_size, match",
    [
        (np.zeros(10, np.float32), 11, "between 1 and the number of rows N=10.*batch_size=N"),
        (np.zeros(10, np.float32), 0, "between 1 and the number of rows"),
        ((np.zeros((10, 2)), np.zeros(9)), 5, r"share their leading axis.*\[0\]: 10, \[1\]: 9"),
        ({"x": np.zeros(10), "c": np.float32(1.0)}, 5, r"\['c'\] is a scalar"),
        ({"x": np.r_[np.zeros(7), np.nan, 0.0, np.inf]}, 5, r"data \['x'\].*2 row\(s\), the first at row 7"),
    ],
)
def test_bad_data_and_batch_size(data, batch_size, match):
    lik = lambda z, b: jnp.sum(jax.tree.leaves(b)[0]) * z[0]  # noqa: E731
    with pytest.raises(ValueError, match=match):
        veil.Target.minibatched(_prior, lik, data, dim=1, batch_size=batch_size)


def test_bad_functions():
    x = _gauss_data(n=20)
    with pytest.raises(ValueError, match="log_lik must return a scalar.*jnp.sum"):
        veil.Target.minibatched(_prior, lambda z, b: -0.5 * (b - z[0]) ** 2, x, dim=1, batch_size=5)
    with pytest.raises(ValueError, match=r"Calling log_prior on a vector of shape \(3,\)"):
        veil.Target.minibatched(lambda z: z @ jnp.ones(2), _lik, x, dim=3, batch_size=5)
    with pytest.raises(TypeError, match="batch_size must be an integer"):  # veil's message, as a user sees it
        unchecked(veil.Target.minibatched)(_prior, _lik, x, dim=1, batch_size=2.5)


def test_on_batch_needs_a_minibatched_target():
    t = veil.Target.from_logdensity(_prior, dim=1)
    assert not t.is_minibatched
    with pytest.raises(ValueError, match="minibatched target"):
        t.on_batch(jnp.zeros(3))


# ------------------------------------------------------------------ fits
def test_minibatch_fit_recovers_conjugate_posterior():
    """x_i ~ N(mu, 1), N = 2000, batches of 100. The stop rule's iterate average removes most
    of the minibatch noise: the fitted mean lies within 0.1 posterior sd of the exact one
    and the sd within 10% (with the minibatch stop rule, seeds 0-5 gave mean errors below
    0.005 sd and sd ratios 0.97-1.03, the spread being the minibatch noise left after
    averaging; a full-batch fit is exact here). A wrong N/B scaling would put the sd off by
    a factor sqrt(20)."""
    x = _gauss_data()
    t = veil.Target.minibatched(_prior, _lik, x, dim=1, batch_size=B)
    res = veil.fit(t, veil.MeanField(1), key=jax.random.key(0), progress=False)
    m, s = _exact_posterior(x)
    assert abs(float(res.q.mean[0]) - m) < 0.1 * s
    assert abs(float(res.q.scale[0]) / s - 1) < 0.10
    assert res.num_skipped == 0 and res.stop_reason.startswith("converged")


def test_same_key_same_fit_and_restarts():
    x = _gauss_data()
    t = veil.Target.minibatched(_prior, _lik, x, dim=1, batch_size=B)
    kw = dict(max_steps=300, stop=None, progress=False)
    a = veil.fit(t, veil.MeanField(1), key=jax.random.key(5), **kw)
    b = veil.fit(t, veil.MeanField(1), key=jax.random.key(5), **kw)
    c = veil.fit(t, veil.MeanField(1), key=jax.random.key(6), **kw)
    np.testing.assert_array_equal(a.trace, b.trace)
    assert not np.array_equal(a.trace, c.trace)
    # Vmapped restarts each carry their own batch order.
    r = veil.fit(t, veil.MeanField(1), key=jax.random.key(5), num_restarts=3, **kw)
    assert r.q.mean.shape == (1,)
    assert np.isfinite(r.restart_losses).all()


def test_nonfinite_batches_are_skipped_and_counted():
    """Three flagged rows whose likelihood is -inf once mu > 0.5 (finite at the start, so the
    start check passes): every later batch holding one is non-finite; those steps are
    skipped and counted, the others move on."""
    x = _gauss_data()
    bad = np.zeros(N, np.float32)
    bad[:3] = 1.0  # 3 rows out of 2000: about 14% of 100-row batches hold one

    def lik(z, b):
        xb, flag = b
        return jnp.sum(-0.5 * (xb - z[0]) ** 2 + jnp.where((flag > 0) & (z[0] > 0.5), -jnp.inf, 0.0))

    t = veil.Target.minibatched(_prior, lik, (x, bad), dim=1, batch_size=B)
    # The full-data target is -inf wherever mu > 0.5, which is where q ends: the run says so.
    with pytest.warns(RuntimeWarning, match="were skipped.*not finite at 100.0% of the fitted q's draws"):
        res = veil.fit(t, veil.MeanField(1), key=jax.random.key(0), max_steps=400, stop=None, progress=False)
    assert res.stop_reason == "undefined"
    # A batch holds a flagged row with probability 1 - C(1997,100)/C(2000,100) = 0.143: over
    # the ~360 steps after mu passes 0.5 the count is Binomial-like (mean ~51, sd ~7);
    # 20..100 is > 4 sd either side.
    assert 20 < res.num_skipped < 100
    assert np.isnan(res.trace).sum() == res.num_skipped
    assert np.isfinite(np.asarray(res.q.mean)).all()


# ------------------------------------------------------------------ NumPyro's subsampled plate
def _logistic_data(n=3000, d=3, seed=0):
    r = np.random.default_rng(seed)
    X = r.standard_normal((n, d)).astype(np.float32)
    y = (r.random(n) < 1 / (1 + np.exp(-X @ np.array([1.0, -1.0, 0.5])[:d]))).astype(np.float32)
    return X, y


def _logistic_model(X, y, B=None):
    import numpyro
    import numpyro.distributions as dist

    w = numpyro.sample("w", dist.Normal(0, 1).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0], subsample_size=B) as idx:
        numpyro.sample("y", dist.Bernoulli(logits=X[idx] @ w), obs=y[idx])


def test_numpyro_subsample_plate_is_honoured():
    """A model with plate(subsample_size=B): the full-row density equals the same model
    without subsampling, and one epoch's batch densities (NumPyro's own N/B scaling) average
    to it exactly (B divides N)."""
    X, y = map(jnp.asarray, _logistic_data())  # device arrays: the batch indices below are traced
    t = veil.Target.from_numpyro(_logistic_model, X, y, B=100)
    full = veil.Target.from_numpyro(_logistic_model, X, y)
    assert t.is_minibatched and (t.num_data, t.batch_size, t.plate) == (3000, 100, "data")
    assert not full.is_minibatched
    z = jnp.array([0.3, -0.2, 0.1])
    np.testing.assert_allclose(t.log_density(z), full.log_density(z), rtol=1e-6)
    np.testing.assert_allclose(t.log_likelihood(z), full.log_likelihood(z), rtol=1e-6)
    src = t.batches
    _, idx = jax.lax.scan(lambda s, _: src.next(s)[::-1], src.init(jax.random.key(0)), None, length=30)
    vals = jax.jit(jax.vmap(lambda i: t.on_batch(i).log_density(z)))(idx)
    np.testing.assert_allclose(np.mean(vals), full.log_density(z), rtol=1e-5)


def test_numpyro_subsampled_fit_matches_full_data_fit():
    """MeanField on 3000 rows, batches of 100 vs all rows: means within 0.3 posterior sd and
    sds within 20% of each other (the minibatch fit's leftover noise; seeds 0-3 gave mean
    differences 0.02-0.04 sd and sd differences 4-13%), and draws work in constrained space."""
    X, y = _logistic_data()
    kw = dict(key=jax.random.key(0), progress=False)
    mb = veil.fit(veil.Target.from_numpyro(_logistic_model, X, y, B=100), veil.MeanField(3), **kw)
    fb = veil.fit(veil.Target.from_numpyro(_logistic_model, X, y), veil.MeanField(3), **kw)
    sd = np.asarray(fb.q.scale)
    assert np.all(np.abs(np.asarray(mb.q.mean - fb.q.mean)) < 0.3 * sd)
    assert np.all(np.abs(np.asarray(mb.q.scale) / sd - 1) < 0.2)
    draws = mb.draws(100, key=jax.random.key(1))
    assert draws["w"].shape == (100, 3)


def test_numpyro_local_latents_and_plates_veil_cannot_split():
    import numpyro
    import numpyro.distributions as dist

    def model(x):
        mu = numpyro.sample("mu", dist.Normal(0, 1))
        with numpyro.plate("rows", x.shape[0], subsample_size=10):
            u = numpyro.sample("u", dist.Normal(mu, 1))
            numpyro.sample("x", dist.Normal(u, 1), obs=numpyro.subsample(x, event_dim=0))

    t = veil.Target.from_numpyro(model, jnp.zeros(50))  # u is local (tests/test_local.py fits such models)
    assert [s.name for s in t.local_sites] == ["u"] and t.dim == 1
    with pytest.raises(ValueError, match=r"local latents \('u', one per row of the plate 'rows'\) that MeanField"):
        veil.fit(t, veil.MeanField(1), key=jax.random.key(0), progress=False)

    def rows_last(x):
        with numpyro.plate("rows", x.shape[0], subsample_size=10, dim=-1):
            numpyro.sample("u", dist.Normal(0, 1).expand([3, 10]))
            numpyro.sample("x", dist.Normal(0, 1), obs=numpyro.subsample(x, event_dim=0))

    with pytest.raises(NotImplementedError, match=r"Local latent site 'u'.*has shape \(3, 10\)"):
        veil.Target.from_numpyro(rows_last, jnp.zeros(50))

    def two(x):
        mu = numpyro.sample("mu", dist.Normal(0, 1))
        with numpyro.plate("a", 50, subsample_size=10):
            numpyro.sample("x", dist.Normal(mu, 1), obs=numpyro.subsample(x, event_dim=0))
        with numpyro.plate("b", 50, subsample_size=5):
            numpyro.sample("x2", dist.Normal(mu, 1), obs=numpyro.subsample(x, event_dim=0))

    with pytest.raises(NotImplementedError, match="subsamples 2 plates"):
        veil.Target.from_numpyro(two, jnp.zeros(50))


# ------------------------------------------------------------------ the loop without branches (GPU)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 50, 1025, 65537, 1_000_003])
def test_unrolled_cycle_walk_is_the_loop(n):
    """The branch-free walk (a b - n unconditional rounds) gives the loop's permutation
    exactly: a walk visits each value above n at most once."""
    from veil.loop.batching import MAX_EXCESS, _split, permute_host

    a, b = _split(n)
    assert 0 <= a * b - n <= MAX_EXCESS
    keys = jax.random.bits(jax.random.key(n), (4, ROUNDS), jnp.uint32)
    pos = jnp.arange(min(n, 5000))
    for k in keys:
        loop = np.asarray(permute(pos, k, n, unrolled=False))
        np.testing.assert_array_equal(np.asarray(permute(pos, k, n, unrolled=True)), loop)
        np.testing.assert_array_equal(permute_host(np.asarray(pos), np.asarray(k), n), loop)


def test_feistel_split_is_tight_and_balanced():
    """Every n below 20000: the walk is short enough to unroll, the halves within 4x."""
    from veil.loop.batching import MAX_EXCESS, _split

    for n in range(4, 20_000):
        a, b = _split(n)
        assert a * b >= n and a * b - n <= MAX_EXCESS and max(a, b) <= 4 * min(a, b) + 4, n


def test_branch_free_loop_gives_the_same_fit(monkeypatch):
    """With branches dear (a GPU), the loop selects instead of branching: skipped steps, the
    epochs' turns and the partial last block of steps (300 = 2 x 128 + 44) come out the same."""
    import veil.loop.batching
    import veil.loop.driver

    x = _gauss_data()
    bad = np.zeros(N, np.float32)
    bad[:3] = 1.0

    def run():
        def lik(z, b):  # a new function each time: a new program
            xb, flag = b
            return jnp.sum(-0.5 * (xb - z[0]) ** 2 + jnp.where((flag > 0) & (z[0] > 0.5), -jnp.inf, 0.0))

        t = veil.Target.minibatched(_prior, lik, (x, bad), dim=1, batch_size=B)
        with pytest.warns(RuntimeWarning, match="were skipped"):  # as in the test above
            return veil.fit(t, veil.MeanField(1), key=jax.random.key(0), max_steps=300, stop=None, progress=False)

    branchy = run()
    asked = []
    for mod in (veil.loop.driver, veil.loop.batching):
        monkeypatch.setattr(mod, "cheap_branches", lambda mod=mod: asked.append(mod.__name__) or False)
    flat = run()
    assert {"veil.loop.driver", "veil.loop.batching"} <= set(asked)  # both places took the select path
    assert branchy.num_skipped > 0
    np.testing.assert_array_equal(flat.trace, branchy.trace)
    np.testing.assert_array_equal(flat.q.mean, branchy.q.mean)
    np.testing.assert_array_equal(flat.q.scale, branchy.q.scale)
