"""Batch sources: where the compiled loop gets each step's rows of data.

A batch source is a pure pair ``init(key) -> state`` and ``next(state) -> (batch, state)``
that the driver (:mod:`veil.driver`) calls inside its compiled loop, once per step. Nothing
goes back to the host between steps, so a minibatch step costs what the step's arithmetic
costs.

:class:`Shuffled` is the in-memory source: the rows of one random permutation per epoch, in
``batch_size`` slices, what a PyTorch ``DataLoader(shuffle=True, drop_last=True)`` gives. The
permutation (``O(N log N)``) is drawn when an epoch starts, inside the loop; every other
step slices it (``O(batch_size)``) and gathers its rows.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

__all__ = ["Shuffled", "ShuffleState"]


class ShuffleState(NamedTuple):
    perm: jax.Array  # int32[N]: this epoch's order of the rows
    position: jax.Array  # int32: batches of this epoch already served
    key: jax.Array  # draws the next epoch's permutation


class Shuffled(eqx.Module):
    """Batches of ``batch_size`` rows of ``data``, reshuffled every epoch.

    ``data`` is a pytree whose leaves share a leading axis of length ``N``. An epoch serves
    ``N // batch_size`` batches, the rows of a fresh uniform permutation in order; the
    ``N mod batch_size`` rows at its end sit that epoch out. Every row has the same chance
    ``batch_size / N`` of being in a given step's batch, so ``(N / batch_size) x`` the batch
    sum is an unbiased estimate of the full sum at every step.

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

    @property
    def num_data(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]

    @property
    def batches_per_epoch(self) -> int:
        return self.num_data // self.batch_size

    def init(self, key: jax.Array) -> ShuffleState:
        """State at the start: position at the end of an (empty) epoch, so the first
        ``next`` draws the first permutation."""
        n = self.num_data
        return ShuffleState(jnp.arange(n, dtype=jnp.int32), jnp.int32(self.batches_per_epoch), key)

    def next(self, state: ShuffleState) -> tuple[Any, ShuffleState]:
        """The next batch and the advanced state."""

        def new_epoch(s):
            key, sub = jax.random.split(s.key)
            return ShuffleState(jax.random.permutation(sub, self.num_data).astype(jnp.int32), jnp.int32(0), key)

        state = jax.lax.cond(state.position >= self.batches_per_epoch, new_epoch, lambda s: s, state)
        idx = jax.lax.dynamic_slice_in_dim(state.perm, state.position * self.batch_size, self.batch_size)
        batch = jax.tree.map(lambda x: jnp.take(x, idx, axis=0, mode="clip"), self.data)
        return batch, state._replace(position=state.position + 1)
