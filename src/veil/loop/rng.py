"""JAX's default generator with its hash's rounds written out: the same draws, cheaper on CPU.

A fit draws each step's noise from one call of the Threefry-2x32 hash (Salmon, Moraes, Dror
& Shaw 2011, "Parallel random numbers: as easy as 1, 2, 3"). On CPU JAX lowers that hash as
a loop of five iterations of four rounds (it keeps programs with many random calls quick to
compile), and inside a fit's loop the rolled loop's fixed cost was most of a draw: one
step's (4, 97) normals took 13.8 us rolled against 4.5 us with the rounds written out and
the bits stored once; whole default fits ran 1.0-1.3x faster (docs/benchmarks/draws-without-rolled-threefry.md).

This module defines the same generator as a JAX PRNG implementation: the same key data, the
same counters (a draw of shape ``s`` hashes the row-major indices ``0 .. prod(s) - 1``; a
split or a ``fold_in`` hashes as JAX's does) and the same 20 rounds, so a key gives bitwise
the draws :mod:`jax.random` gives it (``tests/test_rng.py`` compares them). :func:`unrolled`
re-wraps a default (threefry) key's data with it; other keys pass unchanged, and so do all
keys when JAX's ``jax_threefry_partitionable`` flag is off (JAX then counts differently).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

__all__ = ["hash2x32", "unrolled", "UNROLLED_THREEFRY"]

# Rotation distances of the 2x32 variant's rounds, alternating every four rounds, and the
# key schedule's parity constant (Salmon et al. 2011; the Threefish specification).
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, r: int) -> jax.Array:
    return lax.shift_left(x, np.uint32(r)) | lax.shift_right_logical(x, np.uint32(32 - r))


def hash2x32(k1: ArrayLike, k2: ArrayLike, x1: ArrayLike, x2: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds of the counter pair ``(x1, x2)`` under the key
    ``(k1, k2)`` (uint32, broadcast together): five groups of four rounds, each group
    followed by the injection of the next key-schedule word pair and the group's number.

    Examples:
        >>> import jax, numpy as np
        >>> from veil.loop.rng import hash2x32
        >>> k1, k2 = jax.random.key_data(jax.random.key(0))
        >>> a = hash2x32(k1, k2, np.uint32([0, 0]), np.uint32([0, 1]))
        >>> b = jax.extend.random.threefry_2x32((k1, k2), np.uint32([0, 0, 0, 1]))
        >>> bool((np.concatenate(a) == b).all())
        True
    """
    k1, k2, x1, x2 = (jnp.asarray(a, jnp.uint32) for a in (k1, k2, x1, x2))
    ks = (k1, k2, k1 ^ k2 ^ _PARITY)
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            x1 = x1 + x2
            x2 = _rotate_left(x2, r) ^ x1
        x1 = x1 + ks[(group + 1) % 3]
        x2 = x2 + ks[(group + 2) % 3] + np.uint32(group + 1)
    return x1, x2


def _standard(key_data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(key_data, impl="threefry2x32")


def _counted_hash(key_data: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The hash of the row-major indices of ``shape`` (fewer than 2**32 of them: the high
    counter word is then 0)."""
    lo = lax.iota(np.uint32, math.prod(shape)).reshape(shape)
    return hash2x32(key_data[0], key_data[1], jnp.zeros_like(lo), lo)


def _stored(bits: jax.Array) -> jax.Array:
    """``bits``, written to memory once, where each use then reads them.

    XLA's CPU fusion copies a chain of cheap integer operations into every fused consumer
    of its result, and a MeanField step uses its draws in several: the 20 rounds were then
    computed 16 times a step on stochastic volatility, slower than JAX's rolled loop
    (146 against 127 us a step). ``lax.optimization_barrier`` does not stop that fusion on
    CPU; the output of a loop is always stored. The loop takes one trip, a count the
    compiler cannot see through (``x == x + 1`` is false for every integer), so it is not
    inlined; measured, 99 us a step (docs/benchmarks/draws-without-rolled-threefry.md). Were a compiler to see
    through it, the draws would be the same, only slower.
    """
    if bits.size == 0:
        return bits
    first = bits.reshape(-1)[0]
    trips = 1 + (first == first + 1).astype(jnp.int32)
    return lax.while_loop(lambda c: c[0] < trips, lambda c: (c[0] + 1, c[1] | bits), (0, jnp.zeros_like(bits)))[1]


def _random_bits(key_data: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    if math.prod(shape) >= 2**32:  # a second counter word would be needed: JAX's own code
        dtype = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}[bit_width]
        return jax.random.bits(_standard(key_data), shape, dtype)
    b1, b2 = _counted_hash(key_data, shape)
    if bit_width == 64:
        bits = lax.shift_left(b1.astype(jnp.uint64), np.uint64(32)) | b2.astype(jnp.uint64)
    else:
        bits = b1 ^ b2
        bits = bits if bit_width == 32 else bits.astype({8: jnp.uint8, 16: jnp.uint16}[bit_width])
    return _stored(bits)


def _split(key_data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if math.prod(shape) >= 2**32:
        return jax.random.key_data(jax.random.split(_standard(key_data), shape))
    b1, b2 = _counted_hash(key_data, shape)
    return jnp.stack([b1, b2], axis=-1)


def _fold_in(key_data: jax.Array, data: jax.Array) -> jax.Array:
    # JAX folds a 32-bit value in as the counter pair (0, data).
    data = jnp.asarray(data, jnp.uint32)
    b1, b2 = hash2x32(key_data[0], key_data[1], jnp.zeros_like(data), data)
    return jnp.stack([b1, b2])


def _seed(seed: jax.Array) -> jax.Array:
    return jax.random.key_data(jax.random.key(seed, impl="threefry2x32"))


UNROLLED_THREEFRY = jax.extend.random.define_prng_impl(
    key_shape=(2,), seed=_seed, split=_split, random_bits=_random_bits, fold_in=_fold_in,
    name="veil_threefry2x32_unrolled", tag="vfy")


def unrolled(keys: jax.Array) -> jax.Array:
    """``keys`` (typed JAX keys of the default threefry implementation) re-wrapped with
    :data:`UNROLLED_THREEFRY`: the same draws, without the rolled loop on CPU. Keys of any
    other implementation, raw ``uint32`` keys (``jax.random.PRNGKey``), and every key while
    ``jax_threefry_partitionable`` is off, come back unchanged.

    Examples:
        >>> import jax
        >>> from veil.loop.rng import unrolled
        >>> key = jax.random.key(3)
        >>> bool((jax.random.normal(unrolled(key), (5,)) == jax.random.normal(key, (5,))).all())
        True
    """
    typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    if not typed or jax.random.key_impl(keys) != "threefry2x32" or not jax.config.jax_threefry_partitionable:
        return keys  # raw uint32 keys stay raw: a loss may read them as numbers
    return jax.random.wrap_key_data(jax.random.key_data(keys), impl=UNROLLED_THREEFRY)
