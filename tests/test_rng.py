"""The unrolled threefry generator (veil.loop.rng) gives exactly JAX's default draws."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import veil
import veil.loop.driver
from veil.loop.rng import UNROLLED_THREEFRY, hash2x32, unrolled


def test_hash_known_answers():
    # Random123's known-answer vectors for Threefry-2x32 with 20 rounds (kat_vectors):
    # (key, counter) -> output. An exact identity: any wrong rotation or key injection
    # changes every bit.
    cases = [
        ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ]
    for key, ctr, out in cases:
        got = hash2x32(*(np.uint32(k) for k in key), *(np.uint32(c) for c in ctr))
        assert [int(g) for g in got] == list(out)


def test_hash_matches_jax_threefry():
    rng = np.random.default_rng(0)
    key = rng.integers(0, 2**32, size=2, dtype=np.uint32)
    x = rng.integers(0, 2**32, size=(2, 64), dtype=np.uint32)
    ours = jax.jit(hash2x32)(key[0], key[1], x[0], x[1])
    theirs = jax.extend.random.threefry_2x32((key[0], key[1]), x.reshape(-1))
    np.testing.assert_array_equal(np.concatenate(ours), np.asarray(theirs))


DRAWS = {
    "normal": lambda k, s: jax.random.normal(k, s),
    "uniform": lambda k, s: jax.random.uniform(k, s),
    "bits32": lambda k, s: jax.random.bits(k, s, jnp.uint32),
    "bits16": lambda k, s: jax.random.bits(k, s, jnp.uint16),
    "bits8": lambda k, s: jax.random.bits(k, s, jnp.uint8),
    "randint": lambda k, s: jax.random.randint(k, s, 0, 7),
    "split": lambda k, s: jax.random.key_data(jax.random.split(k, 3)),
    "fold_in": lambda k, s: jax.random.key_data(jax.random.fold_in(k, 12345)),
}


@pytest.mark.parametrize("name", sorted(DRAWS))
@pytest.mark.parametrize("shape", [(), (4, 97), (0, 3)])
def test_draws_equal_jax_default(name, shape):
    # Exact: the same key data, counters and rounds give the same bits, and the same
    # conversion of those bits follows. Jitted, as in a fit.
    draw = DRAWS[name]
    for seed in (0, 2**31 - 1):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(np.asarray(jax.jit(draw, static_argnums=1)(unrolled(key), shape)),
                                      np.asarray(draw(key, shape)))


def test_rejection_sampler_equals_jax_default():
    # Gamma draws loop until accepted: keys split and fold inside a while loop.
    key = jax.random.key(7)
    # The same bits are drawn and accepted at the same iterations (a wrong bit would change a
    # draw by far more than its rounding); the float arithmetic on the accepted bits is
    # compiled in two different programs, which XLA may fuse differently: one draw in 15
    # differed by one ulp on jax 0.10.2 (CPU). So 2 ulps, relative.
    draw = jax.jit(lambda k: jax.random.gamma(k, 0.7, (3, 5)))
    np.testing.assert_allclose(np.asarray(draw(unrolled(key))), np.asarray(draw(key)),
                               rtol=2 * np.finfo(np.float32).eps, atol=0)


def test_vmapped_keys_equal_jax_default():
    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(5), j))(jnp.arange(16))
    draw = jax.vmap(lambda k: jax.random.normal(k, (4, 3)))
    np.testing.assert_array_equal(np.asarray(jax.jit(draw)(unrolled(keys))), np.asarray(draw(keys)))
    assert jax.random.key_impl(unrolled(keys)) == jax.random.key_impl(jax.random.wrap_key_data(
        jax.random.key_data(keys), impl=UNROLLED_THREEFRY))


def test_other_keys_pass_unchanged():
    rbg = jax.random.key(0, impl="rbg")
    assert unrolled(rbg) is rbg
    raw = jax.random.PRNGKey(0)  # a loss given raw keys may treat them as numbers
    assert unrolled(raw) is raw
    key = jax.random.key(0)
    previous = jax.config.jax_threefry_partitionable
    try:  # JAX counts differently with the flag off: the same draws would then not hold
        jax.config.update("jax_threefry_partitionable", False)
        assert unrolled(key) is key
    finally:
        jax.config.update("jax_threefry_partitionable", previous)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the driver converts keys on CPU only")
def test_fit_equals_fit_with_jax_default_keys(monkeypatch):
    # A fit on CPU with the unrolled keys against the same fit with JAX's own keys (the
    # driver's conversion patched out; a new optimizer object compiles a new loop). Exact:
    # every step hashes the same counters under the same keys, and both store the bits
    # before converting them, so the same arithmetic follows.
    target = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum((z - 1.0) ** 2 / jnp.arange(1.0, 6.0)), dim=5)
    converted = []
    monkeypatch.setattr(veil.loop.driver, "unrolled", lambda keys: converted.append(keys.shape) or unrolled(keys))
    ours = veil.fit(target, veil.MeanField(5), key=jax.random.key(0), optimizer=optax.adam(0.05),
                    max_steps=200, stop=None, progress=False)
    assert converted  # the CPU path converts each block's keys
    monkeypatch.setattr(veil.loop.driver, "unrolled", lambda keys: keys)
    theirs = veil.fit(target, veil.MeanField(5), key=jax.random.key(0), optimizer=optax.adam(0.05),
                      max_steps=200, stop=None, progress=False)
    for a, b in zip(jax.tree.leaves(ours.q), jax.tree.leaves(theirs.q)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
