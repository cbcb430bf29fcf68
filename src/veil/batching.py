"""Batch sources: where the compiled loop gets each step's rows of data.

A batch source is a pure pair ``init(key) -> state`` and ``next(state) -> (batch, state)``
that the driver (:mod:`veil.driver`) calls inside its compiled loop, once per step. Nothing
goes back to the host between steps, so a minibatch step costs what the step's arithmetic
costs.

:class:`Shuffled` is the in-memory source: the rows in a fresh random order every epoch, in
``batch_size`` slices, what a PyTorch ``DataLoader(shuffle=True, drop_last=True)`` gives. The
order is a keyed pseudo-random permutation (a Feistel network on ``[0, a) x [0, b)``,
``a b >= N``, with cycle-walking, after Black & Rogaway, "Ciphers with Arbitrary Finite
Domains", 2002),
evaluated only at the positions of the step's batch: ``O(batch_size)`` work per step, ``O(1)``
memory, no sort. ``jax.random.permutation`` would instead sort ``N`` keys once per epoch:
on this project's 2-core CPU it takes 12 s for ``N = 1e7`` (0.3 ms per 256-row step,
amortised, sixty times the step itself; ``benchmarks/minibatch.py``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

__all__ = ["Shuffled", "ShuffledIndices", "ShuffleState", "permute"]


# Rounds of the Feistel network: four rounds over random round functions already give a
# pseudo-random permutation (Luby & Rackoff 1988), far more than batch selection needs.
ROUNDS = 4


class ShuffleState(NamedTuple):
    round_keys: jax.Array  # uint32[ROUNDS]: this epoch's permutation
    position: jax.Array  # int32: batches of this epoch already served
    key: jax.Array  # draws the next epoch's round keys


def _mix(x: jax.Array, k: jax.Array) -> jax.Array:
    """A 32-bit integer hash of ``x`` keyed by ``k`` (multiply-xorshift; the round function)."""
    x = (x ^ k) * jnp.uint32(0x9E3779B1)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x85EBCA77)
    return x ^ (x >> 13)


def _split(n: int) -> tuple[int, int]:
    """``a x b >= n`` with ``a = ceil(sqrt(n))``: the two halves of the Feistel network,
    whose product exceeds ``n`` by less than ``a``."""
    a = math.isqrt(max(n, 1) - 1) + 1
    return a, -(-n // a)


def _feistel(x: jax.Array, round_keys: jax.Array, a: int, b: int) -> jax.Array:
    """A bijection of ``[0, a b)``: write ``x = l b + r`` with ``l < a``, ``r < b``; the
    rounds add a keyed hash of one half to the other, modulo its size (invertible by
    subtracting it again whatever the hash), the halves taking turns (Black & Rogaway's
    Feistel network on an arbitrary domain)."""
    ua, ub = jnp.uint32(a), jnp.uint32(b)
    left, right = x // ub, x % ub
    for i in range(ROUNDS):
        if i % 2 == 0:
            left = (left + _mix(right, round_keys[i]) % ua) % ua
        else:
            right = (right + _mix(left, round_keys[i]) % ub) % ub
    return left * ub + right


def permute(positions: jax.Array, round_keys: jax.Array, n: int) -> jax.Array:
    """The images of ``positions`` (ints in ``[0, n)``) under the permutation of ``[0, n)``
    that ``round_keys`` picks.

    The Feistel network permutes ``[0, a b)``, ``a b - n < sqrt(n) + 1``; an image at or above
    ``n`` is sent through the network again until it lands below ``n`` (cycle walking). The
    walk follows the cycle of the position, so the result is a bijection of ``[0, n)``; an
    image lands above ``n`` with probability below ``1 / sqrt(n)``, so the loop rarely runs
    more than twice.
    """
    a, b = _split(n)

    def walk(x):
        return jnp.where(x >= n, _feistel(x, round_keys, a, b), x)

    x = _feistel(positions.astype(jnp.uint32), round_keys, a, b)
    x = jax.lax.while_loop(lambda x: jnp.any(x >= n), walk, x)
    return x.astype(jnp.int32)


class ShuffledIndices(eqx.Module):
    """Row indices of ``batch_size``-row batches of ``num_data`` rows, reshuffled every epoch.

    An epoch serves ``num_data // batch_size`` batches: the images of positions
    ``[p B, (p + 1) B)`` under a fresh keyed permutation (:func:`permute`); the
    ``num_data mod batch_size`` rows at its end sit that epoch out. Every row is in exactly
    one batch of an epoch (or none), and the permutation is new each epoch, so each row has
    the same chance of being in a step's batch and ``(N / batch_size) x`` the batch sum
    estimates the full sum without bias. ``next`` returns the indices themselves (a NumPyro
    model indexes its data with them).
    """

    num_data: int = eqx.field(static=True)
    batch_size: int = eqx.field(static=True)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_data // self.batch_size

    def init(self, key: jax.Array) -> ShuffleState:
        """State at the start: at the end of an (empty) epoch, so the first ``next`` draws
        the first permutation."""
        return ShuffleState(jnp.zeros(ROUNDS, jnp.uint32), jnp.int32(self.batches_per_epoch), key)

    def next(self, state: ShuffleState) -> tuple[jax.Array, ShuffleState]:
        """The row indices of the next batch (int32[batch_size]) and the advanced state."""

        def new_epoch(s):
            key, sub = jax.random.split(s.key)
            return ShuffleState(jax.random.bits(sub, (ROUNDS,), jnp.uint32), jnp.int32(0), key)

        state = jax.lax.cond(state.position >= self.batches_per_epoch, new_epoch, lambda s: s, state)
        positions = state.position * self.batch_size + jnp.arange(self.batch_size)
        idx = permute(positions, state.round_keys, self.num_data)
        return idx, state._replace(position=state.position + 1)


class Shuffled(eqx.Module):
    """Batches of ``batch_size`` rows of ``data``, reshuffled every epoch: the rows that
    :class:`ShuffledIndices` picks, gathered from every leaf of ``data`` (a pytree whose
    leaves share a leading axis of length ``N``). ``num_data``, when given, is the number of
    real rows: rows past it (padding, so that the rows split evenly over devices) are never
    served.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from veil.batching import Shuffled
        >>> src = Shuffled(jnp.arange(10.0), batch_size=5)
        >>> s = src.init(jax.random.key(0))
        >>> b1, s = src.next(s); b2, s = src.next(s)
        >>> sorted(jnp.concatenate([b1, b2]).tolist()) == list(range(10))
        True
    """

    data: Any
    batch_size: int = eqx.field(static=True)
    rows: int | None = eqx.field(static=True, default=None)

    @property
    def num_data(self) -> int:
        return self.rows if self.rows is not None else jax.tree.leaves(self.data)[0].shape[0]

    @property
    def order(self) -> ShuffledIndices:
        return ShuffledIndices(self.num_data, self.batch_size)

    @property
    def batches_per_epoch(self) -> int:
        return self.order.batches_per_epoch

    def init(self, key: jax.Array) -> ShuffleState:
        return self.order.init(key)

    def next(self, state: ShuffleState) -> tuple[Any, ShuffleState]:
        """The next batch (the rows of every leaf) and the advanced state."""
        idx, state = self.order.next(state)
        # Plain indexing: the permutation keeps idx in [0, N), and take(mode="clip") cost 35%
        # of a 4096-row step at N = 1e6 (BENCHMARKS.md section 14).
        batch = jax.tree.map(lambda x: x[idx], self.data)
        return batch, state
