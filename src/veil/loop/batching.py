"""Batch sources: where the compiled loop gets each step's rows of data.

A batch source is a pure pair ``init(key) -> state`` and ``next(state) -> (batch, state)``
that the driver (:mod:`veil.loop.driver`) calls inside its compiled loop, once per step. Nothing
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
amortised, sixty times the step itself; ``benchmarks/peers/minibatch.py``).

:class:`OnDisk` keeps rows that do not fit in memory on disk (memory-mapped ``.npy`` files):
its batch source, :class:`DiskBatches`, is *fed* by the host rather than called in the loop.
The batch of step ``j`` is a function of ``j`` alone (epoch ``j // (N // B)``, whose round
keys are :func:`epoch_keys`, position ``j mod (N // B)``), so a :class:`Feeder` thread reads
the rows of the next chunk's batches from disk, in the same order as :class:`Shuffled` would
serve them, while the device runs the current chunk; the compiled chunk takes its batches as
an input array.
"""

from __future__ import annotations

import abc
import concurrent.futures
import functools
import math
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from veil._config import cheap_branches

__all__ = [
    "DiskBatches", "Feeder", "OnDisk", "Shuffled", "ShuffledIndices", "ShuffleState",
    "epoch_keys", "permute", "permute_host",
]


# Rounds of the Feistel network: four rounds over random round functions already give a
# pseudo-random permutation (Luby & Rackoff 1988), far more than batch selection needs.
ROUNDS = 4


class ShuffleState(NamedTuple):
    round_keys: jax.Array  # uint32[ROUNDS]: this epoch's permutation
    position: jax.Array  # int32: batches of this epoch already served
    epoch: jax.Array  # int32: this epoch's number (from 0)
    key: jax.Array  # epoch e's round keys are epoch_keys(key, e)


def epoch_keys(key: jax.Array, epoch) -> jax.Array:
    """The round keys of epoch ``epoch``'s permutation: a function of the order's key and the
    epoch's number alone, so a step's batch is a function of the step's number (the host can
    compute a chunk's batches ahead of the loop, :class:`OnDisk`)."""
    return jax.random.bits(jax.random.fold_in(key, epoch), (ROUNDS,), jnp.uint32)


def _mix(x, k, xp=jnp):
    """A 32-bit integer hash of ``x`` keyed by ``k`` (multiply-xorshift; the round function).
    ``xp`` is ``jax.numpy`` in the compiled loop, ``numpy`` on the host (:func:`permute_host`):
    the same uint32 arithmetic, wrapping alike, so both give the same permutation."""
    x = (x ^ k) * xp.uint32(0x9E3779B1)
    x = x ^ (x >> 15)
    x = x * xp.uint32(0x85EBCA77)
    return x ^ (x >> 13)


# The Feistel domain [0, a b) exceeds [0, n) by at most this many values when such a split
# exists (for every n below 2e5 and every one of 20000 random n up to 1e10, checked): the
# cycle walk then needs at most this many extra rounds, few enough to unroll where branches
# are dear (veil._config.cheap_branches).
MAX_EXCESS = 32


@functools.lru_cache(maxsize=256)
def _split(n: int) -> tuple[int, int]:
    """The two halves of the Feistel network, ``a x b >= n`` with ``b = ceil(n / a)``: the
    ``a`` in ``[max(2, ceil(sqrt(n)) / 2), ceil(sqrt(n))]`` with the least excess ``a b - n``, the
    largest such ``a`` on ties.

    The excess bounds the cycle walk of :func:`permute`: a walk passes only through values
    at or above ``n``, each at most once, so it takes at most ``a b - n`` extra rounds. The
    excess is ``(-n) mod a``, roughly uniform over ``[0, a)``, so among ``sqrt(n) / 2``
    candidates some ``a`` nearly always gives a few; the halves stay within a factor of 4
    of each other, balanced enough for the rounds to mix.
    """
    top = math.isqrt(max(n, 1) - 1) + 1
    a = min(range(top, max(min(2, top), top // 2) - 1, -1), key=lambda a: (-n % a, -a))
    return a, -(-n // a)


def _feistel(x, round_keys, a: int, b: int, xp=jnp):
    """A bijection of ``[0, a b)``: write ``x = l b + r`` with ``l < a``, ``r < b``; the
    rounds add a keyed hash of one half to the other, modulo its size (invertible by
    subtracting it again whatever the hash), the halves taking turns (Black & Rogaway's
    Feistel network on an arbitrary domain)."""
    ua, ub = xp.uint32(a), xp.uint32(b)
    left, right = x // ub, x % ub
    for i in range(ROUNDS):
        if i % 2 == 0:
            left = (left + _mix(right, round_keys[i], xp) % ua) % ua
        else:
            right = (right + _mix(left, round_keys[i], xp) % ub) % ub
    return left * ub + right


def permute(positions: jax.Array, round_keys: jax.Array, n: int, unrolled: bool | None = None) -> jax.Array:
    """The images of ``positions`` (ints in ``[0, n)``) under the permutation of ``[0, n)``
    that ``round_keys`` picks.

    The Feistel network permutes ``[0, a b)``, ``a b - n < sqrt(n) + 1``; an image at or above
    ``n`` is sent through the network again until it lands below ``n`` (cycle walking). The
    walk follows the cycle of the position, so the result is a bijection of ``[0, n)``; an
    image lands above ``n`` with probability below ``1 / sqrt(n)``, so the loop rarely runs
    more than twice. ``unrolled`` (default: where branches are dear, on a GPU, and the
    excess is small) replaces the loop by ``a b - n`` unconditional rounds, enough for any
    walk: the same result, with no predicate copied to the host.
    """
    a, b = _split(n)

    def walk(x):
        return jnp.where(x >= n, _feistel(x, round_keys, a, b), x)

    x = _feistel(positions.astype(jnp.uint32), round_keys, a, b)
    if unrolled is None:
        unrolled = not cheap_branches() and a * b - n <= MAX_EXCESS
    if unrolled:  # every walk ends within a b - n rounds (see _split): no loop, no branch
        for _ in range(a * b - n):
            x = walk(x)
    else:
        x = jax.lax.while_loop(lambda x: jnp.any(x >= n), walk, x)
    return x.astype(jnp.int32)


def permute_host(positions: np.ndarray, round_keys: np.ndarray, n: int) -> np.ndarray:
    """:func:`permute` in NumPy, on the host: the same permutation, bit for bit (the test
    suite checks it), for sources whose rows the host reads ahead of the loop (:class:`OnDisk`)."""
    a, b = _split(n)
    round_keys = np.asarray(round_keys, np.uint32)
    x = _feistel(np.asarray(positions, np.uint32), round_keys, a, b, np)
    while (x >= n).any():
        x = np.where(x >= n, _feistel(x, round_keys, a, b, np), x)
    return x.astype(np.int64)


class BatchSource(eqx.Module):
    """What the loop draws each step's batch from: ``init(key)`` gives the source's state,
    ``next(state)`` the step's batch and the next state (inside the compiled loop). A
    ``host_fed`` source is not called in the loop: its batches are read on the host, a piece
    of ``steps_per_chunk(restarts)`` steps at a time (:class:`Feeder`)."""

    host_fed: ClassVar[bool] = False

    @abc.abstractmethod
    def init(self, key: jax.Array) -> ShuffleState:
        """The source's state at the start of a run (each restart its own key)."""

    def next(self, state: ShuffleState) -> tuple[Any, ShuffleState]:
        raise NotImplementedError(f"{type(self).__name__} is fed from the host, not called in the loop.")


class ShuffledIndices(BatchSource):
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
        return ShuffleState(jnp.zeros(ROUNDS, jnp.uint32), jnp.int32(self.batches_per_epoch), jnp.int32(-1), key)

    def next(self, state: ShuffleState) -> tuple[jax.Array, ShuffleState]:
        """The row indices of the next batch (int32[batch_size]) and the advanced state."""

        def new_epoch(s):
            return ShuffleState(epoch_keys(s.key, s.epoch + 1), jnp.int32(0), s.epoch + 1, s.key)

        turn = state.position >= self.batches_per_epoch
        if cheap_branches():
            state = jax.lax.cond(turn, new_epoch, lambda s: s, state)
        else:  # the next epoch's keys every step (a few hashes), kept only at an epoch's turn
            s = state
            state = ShuffleState(jnp.where(turn, epoch_keys(s.key, s.epoch + 1), s.round_keys),
                                 jnp.where(turn, 0, s.position), jnp.where(turn, s.epoch + 1, s.epoch), s.key)
        positions = state.position * self.batch_size + jnp.arange(self.batch_size)
        idx = permute(positions, state.round_keys, self.num_data)
        return idx, state._replace(position=state.position + 1)


class Shuffled(BatchSource):
    """Batches of ``batch_size`` rows of ``data``, reshuffled every epoch: the rows that
    :class:`ShuffledIndices` picks, gathered from every leaf of ``data`` (a pytree whose
    leaves share a leading axis of length ``N``). ``num_data``, when given, is the number of
    real rows: rows past it (padding, so that the rows split evenly over devices) are never
    served.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from veil.loop.batching import Shuffled
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
        # of a 4096-row step at N = 1e6 (docs/benchmarks/minibatch-vi-scale.md).
        batch = jax.tree.map(lambda x: x[idx], self.data)
        return batch, state


# ---------------------------------------------------------------------------- on disk
# Bytes of rows one chunk's batches may hold on the device (all restarts together); two
# chunks are alive at once (the running one and the one read ahead).
FEED_BYTES = 64 * 2**20
# Rows read per block when the full data are streamed (the finiteness check, full-data log
# densities): a bound on the host memory such a pass needs, and on its number of reads.
STREAM_BYTES = 16 * 2**20
# Fewest steps a fed chunk holds, whatever its bytes: the stopping rule averages the probe
# over this many steps (veil.diagnostics.PROBE_BATCH).
MIN_FEED_STEPS = 25


def _canonical(dtype) -> np.dtype:
    """The dtype JAX gives an array of ``dtype`` (float64 becomes float32 unless x64 is on)."""
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


class OnDisk:
    """Rows of data that stay on disk: a pytree whose leaves are memory-mapped arrays
    (``np.load(path, mmap_mode="r")``, or ``np.memmap``) sharing a leading axis of ``N`` rows.

    Give it (or the memory-mapped arrays themselves, which veil wraps in one) as the data of
    :meth:`veil.Target.minibatched`. ``veil.fit`` then never holds the whole data in memory:
    each chunk of the compiled loop takes the rows of its batches, which a background thread
    reads (in ascending row order, so the disk reads are as sequential as the batches allow)
    while the previous chunk runs; full-data evaluations (the start check, the diagnostics)
    stream the rows in blocks. The fit is the same as with the data in memory.

    Args:
        data: a pytree of arrays with a leading axis of rows, read with NumPy indexing (an
            in-memory ``np.ndarray`` works too, and is read the same way).
        chunk_bytes: bytes of rows one chunk of the loop may hold (default 64 MiB; at least
            25 steps' worth are always held). Larger chunks amortise the per-chunk cost (about
            a millisecond) over more steps.

    Examples:
        >>> import numpy as np, tempfile, os
        >>> from veil.loop.batching import OnDisk
        >>> path = os.path.join(tempfile.mkdtemp(), "x.npy")
        >>> np.save(path, np.arange(12.0).reshape(6, 2))
        >>> rows = OnDisk(np.load(path, mmap_mode="r"))
        >>> rows.num_data, rows.row_bytes
        (6, 8)
    """

    def __init__(self, data: Any, *, chunk_bytes: int = FEED_BYTES):
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, (int, np.integer)) or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive integer (bytes), got {chunk_bytes!r}.")
        leaves = jax.tree_util.tree_leaves_with_path(data)
        if not leaves:
            raise ValueError("data holds no arrays: pass a memory-mapped array, or a tuple/dict of them.")
        for path, leaf in leaves:
            if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype") and len(leaf.shape) >= 1):
                where = jax.tree_util.keystr(path) or "(the array)"
                raise ValueError(
                    f"data leaf {where} is not an array with a leading axis of rows (got "
                    f"{type(leaf).__name__}); open .npy files with np.load(path, mmap_mode='r')."
                )
        self.data = data
        self.paths = [jax.tree_util.keystr(p) or "(the array)" for p, _ in leaves]
        self.leaves = [leaf for _, leaf in leaves]
        self.treedef = jax.tree.structure(data)
        self.chunk_bytes = int(chunk_bytes)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{p}: {tuple(x.shape)} {x.dtype}" for p, x in zip(self.paths, self.leaves))
        return f"OnDisk({shapes})"

    @property
    def num_data(self) -> int:
        return int(self.leaves[0].shape[0])

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (all leaves), as the device holds it."""
        return sum(math.prod(x.shape[1:]) * _canonical(x.dtype).itemsize for x in self.leaves)

    def shapes(self, rows: int):
        """The pytree of ``jax.ShapeDtypeStruct`` of ``rows`` rows."""
        return self.treedef.unflatten(
            [jax.ShapeDtypeStruct((rows, *x.shape[1:]), _canonical(x.dtype)) for x in self.leaves]
        )

    def slice(self, start: int, stop: int):
        """Rows ``[start, stop)`` of every leaf, as the pytree of in-memory arrays."""
        return self.treedef.unflatten(
            [np.ascontiguousarray(x[start:stop], _canonical(x.dtype)) for x in self.leaves]
        )

    def stream_rows(self) -> int:
        """Rows per block when the full data are streamed."""
        return max(1, min(self.num_data, STREAM_BYTES // max(self.row_bytes, 1)))

    def check_finite(self) -> None:
        """Raise naming the first leaf with a NaN or inf and its first bad row, reading the
        data once, a block of rows at a time."""
        step = self.stream_rows()
        for where, x in zip(self.paths, self.leaves):
            if not np.issubdtype(np.dtype(x.dtype), np.inexact):
                continue
            bad_rows, first = 0, None
            for start in range(0, self.num_data, step):
                block = np.asarray(x[start:start + step])
                bad = ~np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)
                if bad.any():
                    first = start + int(np.argmax(bad)) if first is None else first
                    bad_rows += int(bad.sum())
            if first is not None:
                raise ValueError(
                    f"data {where} holds non-finite values (NaN or inf) in {bad_rows} row(s), the "
                    f"first at row {first}. A NaN row turns every step that draws it into NaN. "
                    "Drop or impute those rows before building the target."
                )


def _gather_into(x, rows: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = x[rows]``, straight into ``out`` when the dtypes agree. In batch order, not
    ascending: on rows in the page cache one gather costs less than an ascending read and a
    scatter back (docs/benchmarks/rows-disk.md)."""
    if x.dtype == out.dtype:
        np.take(x, rows, axis=0, out=out)
    else:  # e.g. float64 on disk, float32 on the device
        out[...] = x[rows]


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """``np.empty`` whose data start on an ``align``-byte boundary: XLA's CPU runtime uses
    such a buffer in place (``_to_device``) and copies any other (a 64 MB chunk: 36 ms)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _to_device(tree):
    """The chunk's buffers on the device: used in place rather than copied where the runtime
    can (a CPU device, aligned buffers, JAX with ``may_alias``); each buffer is fresh, so
    nothing writes to it afterwards."""
    try:
        return jax.device_put(tree, may_alias=True)
    except TypeError:  # JAX before may_alias
        return jax.device_put(tree)


class DiskBatches(BatchSource):
    """The batch source of an :class:`OnDisk` target: the batches :class:`Shuffled` would
    serve (same key, same rows in the same order), fed to the compiled loop a chunk at a
    time by a :class:`Feeder` instead of gathered inside it (``host_fed``)."""

    store: OnDisk = eqx.field(static=True)
    batch_size: int = eqx.field(static=True)
    host_fed: ClassVar[bool] = True

    @property
    def order(self) -> ShuffledIndices:
        return ShuffledIndices(self.store.num_data, self.batch_size)

    def init(self, key: jax.Array) -> ShuffleState:
        """The order's state (its key; the driver leaves it as it is: the feeder serves)."""
        return self.order.init(key)

    def steps_per_chunk(self, restarts: int) -> int:
        """Steps of batches one chunk holds within ``store.chunk_bytes`` (at least
        ``MIN_FEED_STEPS``)."""
        per_step = restarts * self.batch_size * max(self.store.row_bytes, 1)
        return max(MIN_FEED_STEPS, self.store.chunk_bytes // per_step)


class Feeder:
    """Reads the rows of a chunk's batches on a background thread, for :class:`DiskBatches`.

    ``submit(first, n)`` starts reading the batches of steps ``[first, first + n)`` of every
    restart and returns a future of the chunk's input: a pytree whose leaves have shape
    ``(restarts, capacity, batch_size, ...)`` (steps past ``n`` are zeros, never read), on
    the device. Step ``j`` of restart ``r`` takes the rows that ``ShuffledIndices.next``
    would give at its ``j``-th call from ``order_keys[r]``.
    """

    def __init__(self, source: DiskBatches, order_keys: jax.Array, capacity: int):
        self.source, self.capacity = source, int(capacity)
        self.keys = list(order_keys)  # one key per restart
        self._round_keys: dict[tuple[int, int], np.ndarray] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="veil-feeder")

    def indices(self, first: int, n: int) -> np.ndarray:
        """Rows of the batches of steps ``[first, first + n)``: int64[restarts, n, B]."""
        order = self.source.order
        per_epoch, size = order.batches_per_epoch, order.batch_size
        steps = np.arange(first, first + n)
        epochs, positions = steps // per_epoch, steps % per_epoch
        out = np.empty((len(self.keys), n, size), np.int64)
        within = positions[:, None] * size + np.arange(size)
        for r in range(len(self.keys)):
            for e in np.unique(epochs):
                if (r, int(e)) not in self._round_keys:
                    self._round_keys[r, int(e)] = np.asarray(epoch_keys(self.keys[r], int(e)))
                sel = epochs == e
                out[r, sel] = permute_host(within[sel], self._round_keys[r, int(e)], order.num_data)
        return out

    def load(self, first: int, n: int):
        """The chunk's input for steps ``[first, first + n)`` (see the class)."""
        idx = self.indices(first, n)
        k, size = idx.shape[0], idx.shape[2]
        leaves = []
        for x in self.source.store.leaves:
            out = _aligned_empty((k, self.capacity, size, *x.shape[1:]), _canonical(x.dtype))
            out[:, n:] = 0
            for r in range(k):
                _gather_into(x, idx[r].reshape(-1), out[r, :n].reshape(n * size, *x.shape[1:]))
            leaves.append(out)
        return _to_device(self.source.store.treedef.unflatten(leaves))

    def submit(self, first: int, n: int) -> concurrent.futures.Future:
        return self._pool.submit(self.load, first, n)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
