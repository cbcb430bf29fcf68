"""The chunked, compiled loop that every veil method runs in. It knows nothing of variational
inference.

``run`` runs a :class:`veil.loop.kernel.Kernel` (``init``, ``step``, ``watched``, ``batches``:
the loop contract, described there) from ``params``. Steps run inside one compiled
``lax.fori_loop`` per *chunk*; the host is touched only between chunks (progress bar,
stopping rule), never per step. Independent restarts are a leading batch axis of ``params``
and run under ``vmap`` in the same program.

Each step the kernel does not take (``StepInfo.ok`` false: its value or move was not finite)
is counted; ``max_consecutive_skips`` of them in a row stop the run with
``stop_reason="nonfinite"``.

A kernel with a batch source (``kernel.batches``, see :mod:`veil.loop.batching`: ``init(key)
-> state``, ``next(state) -> (batch, state)``) gets the next batch at every step (skipped
steps included); each restart draws its own batch order. A source marked ``host_fed`` (rows on
disk, :class:`veil.loop.batching.DiskBatches`) is not called in the loop: a
:class:`veil.loop.batching.Feeder` thread reads the next piece's batches while the current
piece runs, and each compiled call takes its batches as an input array. A piece holds at most
``source.steps_per_chunk(restarts)`` steps; a longer chunk runs as several pieces whose
outputs are joined on the host before the stopping rule sees them.

The stopping rule's drift test watches ``kernel.watched(params)`` (a flow watches where fixed
noise points land rather than its unidentifiable network weights). Its step-size decay is a
per-restart ``step_scale`` in the loop's state, handed to every step as ``scale``: the host
lowers it between chunks without changing the compiled program.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from veil import _blas
from veil.loop import checkpoint as ckpt
from veil._config import cheap_branches
from veil.loop.rng import unrolled
from veil.loop.batching import Feeder
from veil.loop.kernel import Kernel
from veil.diagnostics import PROBE_BATCH, StopRule

__all__ = ["run", "RunOutput", "CHUNK_CAPACITY", "PLAIN_CAPACITY", "chunk_schedule"]

# Steps one compiled chunk can hold (a static size: the loss buffer); chunks that run fewer
# steps reuse the same program. With a stopping rule the chunk lengths follow
# chunk_schedule: a fixed schedule (not one timed on the host), because the rule decides at
# chunk boundaries and a fit must stay a pure function of its key on every machine.
CHUNK_CAPACITY = 500
# No chunk of the rule's schedule is shorter (a chunk costs ~1 ms of host and runtime work).
CHUNK_MIN = 100
# Without a stopping rule nothing is decided between chunks, and each step's key is
# fold_in(key, step) whatever the chunking, so chunk lengths are chosen on the host: about
# PLAIN_SECONDS of work each (at most 8x the previous, between 100 and PLAIN_CAPACITY steps).
# A chunk costs ~1 ms of fixed host and runtime work: 2,000-step chunks of an 8 us step
# spent 6% there (docs/benchmarks/minibatch-vi-scale.md).
PLAIN_CAPACITY = 20_000
# Step keys are made this many at a time (see _chunk).
KEY_BLOCK = 128
PLAIN_FIRST = 500
PLAIN_SECONDS = 0.25
# The stopping rule also watches the parameters themselves (a drift in a flat direction shows
# in the parameters long before it shows in the noisy loss): per chunk, the driver returns
# means over batches of PROBE_BATCH steps of at most MAX_PROBE coordinates.
MAX_PROBE = 4096


class LoopState(NamedTuple):
    params: Any
    kernel_state: Any  # the kernel's own state (optimizer moments, a loss's baseline)
    key: jax.Array
    step_scale: jax.Array
    skipped: jax.Array  # total skipped steps (int32)
    consecutive: jax.Array  # skipped steps in a row at the end of the chunk (int32)
    step: jax.Array  # steps taken so far (int32): the step's key is fold_in(key, step)
    batch_state: Any = None  # the batch source's state (its epoch's permutation), if any
    finished: Any = None  # for a kernel that finishes by itself: whether it has (bool)
    finished_at: Any = None  # and the step count when it did (int32, -1 before)


class ChunkOut(NamedTuple):
    losses: jax.Array  # [CHUNK_CAPACITY], NaN where skipped or unused
    mean_params: Any  # parameters averaged over the chunk's finite steps
    probe_means: jax.Array  # [CHUNK_CAPACITY // PROBE_BATCH, num_probe]: batch means of the probe


_WATCH_PLANS: collections.OrderedDict = collections.OrderedDict()
_WATCH_PLANS_KEPT = 64


def _watch_plan(kernel: Kernel, params):
    """``(shapes, probe, groups)``: the shapes of what the drift test watches (all restarts),
    the watched coordinates (on the device) and their leaves (:func:`probe_indices`).

    Cached by the loss's static structure and its arrays' shapes, on which alone they depend:
    ``jax.eval_shape`` traces ``watch`` anew on every call (1.2 ms on the CPU machine, a third
    of a one-step particle run's fixed cost), and the probe's indices and their transfer cost
    another 0.3-0.5 ms on a GPU (docs/benchmarks/particle-run-fixed-cost-gpu.md). The last ``_WATCH_PLANS_KEPT``
    structures are kept (their static leaves, such as a log density function, stay alive as
    long: ``filter_jit``'s own cache holds the same objects for the compiled chunk)."""
    dynamic, static = eqx.partition((kernel, params), eqx.is_array)
    leaves, structure = jax.tree.flatten(static)
    try:
        key = (structure, tuple(leaves), tuple((x.shape, x.dtype) for x in jax.tree.leaves(dynamic)))
        hash(key)
    except TypeError:  # an unhashable static leaf: no cache, trace as before
        key = None
    if key is not None and key in _WATCH_PLANS:
        _WATCH_PLANS.move_to_end(key)
        return _WATCH_PLANS[key]
    shapes = jax.eval_shape(jax.vmap(kernel.watched), params)
    probe, groups = probe_indices(shapes)
    plan = (shapes, jnp.asarray(probe), groups)
    if key is not None:
        _WATCH_PLANS[key] = plan
        while len(_WATCH_PLANS) > _WATCH_PLANS_KEPT:
            _WATCH_PLANS.popitem(last=False)
    return plan


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def probe_indices(params) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of the flat parameter vector (one restart) that the stopping rule watches,
    and the parameter leaf each belongs to.

    All coordinates up to ``MAX_PROBE``; beyond that the budget is shared between leaves, the
    smallest first, so a small leaf (a location vector) is watched whole and is not drowned by
    a large one (a d x d factor), which gets evenly spaced coordinates. The rule judges each
    leaf on its own (see :func:`veil.diagnostics.StopRule`).
    """
    sizes = [int(np.prod(x.shape[1:])) for x in jax.tree.leaves(params)]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    budget, left = {}, MAX_PROBE
    for n, i in enumerate(sorted(range(len(sizes)), key=lambda i: sizes[i])):
        budget[i] = min(sizes[i], left // (len(sizes) - n))
        left -= budget[i]
    idx, groups = [], []
    for i, (size, offset) in enumerate(zip(sizes, offsets)):
        take = np.unique(np.linspace(0, size - 1, budget[i]).round().astype(np.int64)) if budget[i] else []
        idx.append(offset + np.asarray(take, np.int64))
        groups.append(np.full(len(take), i, np.int64))
    return np.concatenate(idx), np.concatenate(groups)


def _chunk(kernel: Kernel, state: LoopState, n_steps, probe, capacity: int, track: bool, feed=None):
    """Run ``n_steps`` (dynamic, ``<= capacity``) steps of ``kernel`` for one restart.

    With ``track`` the chunk also averages the iterates and the probe coordinates for the
    stopping rule; without it a step does nothing but the update (the benchmarked path).
    ``feed``, for a host-fed batch source, holds the chunk's batches (leading axis: step).
    """
    branches = cheap_branches()
    source = kernel.batches

    def body(i, step_key, carry):
        st, losses, psum, nfinite, pbuf = carry
        batch, batch_state = None, st.batch_state
        if feed is not None:
            batch = jax.tree.map(lambda x: x[i], feed)
        elif source is not None:
            batch, batch_state = source.next(st.batch_state)
        # A step the kernel does not take (not finite) returns its input unchanged.
        if kernel.finishes:  # after it has finished, a step is no step (recorded as NaN)
            def take(args):
                params, kernel_state, info = kernel.step(*args, step_key, st.step_scale, batch)
                return params, kernel_state, (jnp.asarray(info.value, losses.dtype), info.ok, jnp.asarray(info.done))

            idle = (jnp.full((), jnp.nan, losses.dtype), jnp.bool_(True), jnp.bool_(True))
            params, kernel_state, (value, ok, done) = jax.lax.cond(
                st.finished, lambda args: (*args, idle), take, (st.params, st.kernel_state))
            counted = ~st.finished
            finished = st.finished | done
            finished_at = jnp.where(counted & done, st.step + 1, st.finished_at)
        else:
            params, kernel_state, info = kernel.step(st.params, st.kernel_state, step_key, st.step_scale, batch)
            value, ok, counted, finished, finished_at = info.value, info.ok, True, None, None
        st = LoopState(
            params, kernel_state, st.key, st.step_scale,
            st.skipped + (counted & ~ok).astype(jnp.int32),
            jnp.where(counted, jnp.where(ok, 0, st.consecutive + 1), st.consecutive),
            st.step + 1, batch_state, finished, finished_at,
        )
        losses = losses.at[i].set(jnp.where(ok, value, jnp.nan))
        if track:
            psum = jax.tree.map(lambda s, p: s + jnp.where(ok, p, 0.0), psum, params)
            pbuf = pbuf.at[i // PROBE_BATCH].add(_flat(kernel.watched(params))[probe])
        return st, losses, psum, nfinite + ok, pbuf

    losses = jnp.full((capacity,), jnp.nan)
    psum = jax.tree.map(jnp.zeros_like, state.params) if track else None
    pbuf = jnp.zeros((-(-capacity // PROBE_BATCH), probe.shape[0])) if track else None
    # Step j's key is fold_in(key, j), a function of the step's number alone, so chunk
    # lengths do not change a fit. The keys are made KEY_BLOCK at a time, vectorised (one
    # fold_in inside the step cost 1.3 us of a 6.5 us step; docs/benchmarks/minibatch-vi-scale.md), and
    # on CPU handed to the loss as keys of the same generator with its rounds unrolled: the
    # same draws without the rolled loop JAX's CPU lowering gives every draw (veil.loop.rng; a
    # GPU's lowering is already unrolled).
    first = state.step

    def block(b, carry, steps=KEY_BLOCK):
        start = b * KEY_BLOCK
        keys = jax.vmap(lambda j: jax.random.fold_in(state.key, first + start + j))(jnp.arange(KEY_BLOCK))
        keys = unrolled(keys) if branches else keys
        return jax.lax.fori_loop(0, steps, lambda j, c: body(start + j, keys[j], c), carry)

    carry = (state, losses, psum, jnp.int32(0), pbuf)
    if branches:  # one loop body, each block's length computed: less to compile
        carry = jax.lax.fori_loop(
            0, (n_steps + KEY_BLOCK - 1) // KEY_BLOCK,
            lambda b, c: block(b, c, jnp.minimum(KEY_BLOCK, n_steps - b * KEY_BLOCK)), carry)
    else:
        # Whole blocks run a loop of fixed length (a GPU then runs it without asking the
        # host whether to go on at every step); the last, partial block one of computed length.
        full = n_steps // KEY_BLOCK
        carry = block(full, jax.lax.fori_loop(0, full, block, carry), n_steps - full * KEY_BLOCK)
    state, losses, psum, nfinite, pbuf = carry
    if not track:
        return state, ChunkOut(losses, state.params, jnp.zeros((0, 0)))
    denom = jnp.maximum(nfinite, 1)
    mean_params = jax.tree.map(lambda s, p: jnp.where(nfinite > 0, s / denom, p), psum, state.params)
    # Steps in each probe batch: PROBE_BATCH, except a last partial one.
    counts = jnp.clip(n_steps - PROBE_BATCH * jnp.arange(pbuf.shape[0]), 0, PROBE_BATCH)
    probe_means = pbuf / jnp.maximum(counts, 1)[:, None]
    return state, ChunkOut(losses, mean_params, probe_means)


@eqx.filter_jit
def _run_chunk(kernel, state, n_steps, probe, capacity, track, feed=None):
    def one(st, fd):
        return _chunk(kernel, st, n_steps, probe, capacity, track, fd)

    if state.step_scale.shape[0] == 1:  # a single fit: no batching rules in its program
        out = one(*jax.tree.map(lambda x: x[0], (state, feed)))
        return jax.tree.map(lambda x: x[None], out)
    return jax.vmap(one)(state, feed)


@eqx.filter_jit
def _init_state(kernel: Kernel, params, key):
    k = jax.tree.leaves(params)[0].shape[0]
    # Weakly typed inputs (arrays made from Python scalars) would compile the loop a second
    # time once its own strongly typed outputs come back in: every array leaves here strong.
    strong = lambda tree: jax.tree.map(lambda x: x.astype(x.dtype), tree)  # noqa: E731
    params = strong(params)
    source = kernel.batches
    # The batch order's own key stream, folded off the run's key (step keys are fold_in(key,
    # step) of the same key: the two streams never meet).
    batch_state = None if source is None else jax.vmap(source.init)(
        jax.random.split(jax.random.fold_in(key, 0x5EED), k))
    return LoopState(
        params=params,
        kernel_state=strong(jax.vmap(kernel.init)(params)),
        key=jax.random.split(key, k),
        step_scale=jnp.ones(k),
        skipped=jnp.zeros(k, jnp.int32),
        consecutive=jnp.zeros(k, jnp.int32),
        step=jnp.zeros(k, jnp.int32),
        batch_state=batch_state,
        finished=jnp.zeros(k, bool) if kernel.finishes else None,
        finished_at=jnp.full(k, -1, jnp.int32) if kernel.finishes else None,
    )


class RunOutput(NamedTuple):
    """What :func:`run` returns, one entry per restart where it says so."""

    params: Any  # final parameters, leading restart axis
    traces: list[np.ndarray]  # loss per step, per restart (NaN where a step was skipped)
    num_steps: np.ndarray  # steps each restart ran
    stop_reasons: list[str]
    skipped: np.ndarray  # skipped (non-finite) steps per restart
    final_loss: np.ndarray  # mean loss over each restart's final window
    wall_time: float
    kernel_state: Any = None  # the kernel's final state, leading restart axis


@dataclasses.dataclass
class _Host:
    """What the host keeps between chunks (all of it saved in a checkpoint)."""

    steps: int
    chunk_index: int
    plain_next: int  # steps in the next chunk of a run without a stopping rule
    traces: list  # per restart: list of per-chunk loss arrays
    history: list  # (first step, end step, chunk-mean params), for iterate averaging
    done: np.ndarray
    num_steps: np.ndarray
    reasons: list
    final: list  # per restart: parameters decided before the end, or None
    final_loss: np.ndarray
    scales: np.ndarray
    applied: np.ndarray
    rules: list | None
    skipped: np.ndarray | None = None  # per restart, as of the last chunk (not saved: re-read)


def run(
    kernel: Kernel,
    params,
    *,
    key: jax.Array,
    max_steps: int,
    stop_rule: StopRule | None,
    progress: bool = True,
    max_consecutive_skips: int = 100,
    description: str = "fit",
    checkpoint=None,
    fingerprint: dict | None = None,
) -> RunOutput:
    """Run ``kernel`` from ``params`` (leading axis = restarts) for at most ``max_steps``.

    Args:
        kernel: a :class:`veil.loop.kernel.Kernel` (an ``equinox.Module``: its static parts
            key the compilation cache, its arrays are inputs of the compiled loop).
        params: a pytree of arrays with a leading restart axis of size ``k``.
        key: a JAX key; split into one stream per restart.
        max_steps: cap on the number of steps.
        stop_rule: a :class:`~veil.diagnostics.StopRule`, or ``None`` to run ``max_steps``
            steps and return the last iterate.
        progress: show a tqdm progress bar (updated once per chunk).
        checkpoint: a :class:`veil.loop.checkpoint.Checkpoint`: save the run's state there at chunk
            boundaries, and resume from it if it exists (after checking ``fingerprint``, a
            JSON-able description of the caller's fit, and the state's shapes).
    """
    t0 = time.perf_counter()
    k = jax.tree.leaves(params)[0].shape[0]
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel must be a veil.loop.kernel.Kernel, got {type(kernel).__name__}.")
    state = _init_state(kernel, params, key)
    track = stop_rule is not None
    # Without a stopping rule nothing is watched: no plan (its cache lookup alone cost 0.3 ms of
    # a fit's ~3 ms fixed cost), and the chunk takes no probe (``track`` is static).
    probe, groups = _watch_plan(kernel, params)[1:] if track else (None, None)
    host = _Host(
        steps=0, chunk_index=0, plain_next=PLAIN_FIRST, traces=[[] for _ in range(k)], history=[],
        done=np.zeros(k, bool), num_steps=np.zeros(k, np.int64), reasons=["max_steps"] * k,
        final=[None] * k, final_loss=np.full(k, np.nan), scales=np.ones(k), applied=np.ones(k),
        rules=[stop_rule.start(groups) for _ in range(k)] if track else None,
    )
    if checkpoint is not None:
        fingerprint = {**(fingerprint or {}), "state": ckpt.shapes(state), "max_consecutive_skips": max_consecutive_skips}
        if checkpoint.exists():
            state, host = _restore(checkpoint, fingerprint, state, host)

    source = kernel.batches
    feeds, capacity = None, CHUNK_CAPACITY if track else PLAIN_CAPACITY
    if source is not None and source.host_fed:
        # A fed chunk holds at most the feed's steps (a multiple of the probe's batch); a
        # longer chunk of the stopping rule's schedule runs as several pieces, so the rule
        # decides at the same steps as with the data in memory. Lengths do not depend on
        # timing, so the next piece is known, and read, ahead.
        capacity = min(capacity, source.steps_per_chunk(k))
        capacity = max(PROBE_BATCH, capacity - capacity % PROBE_BATCH)
        host.plain_next = capacity
        feeds = _ReadAhead(Feeder(source, state.batch_state.key, capacity))

    bar = _progress_bar(progress, max_steps, description)
    if bar is not None and host.steps:
        bar.update(host.steps)
    try:
        # One LAPACK thread while the loop runs (veil/_blas.py: its pool costs more than it gives).
        with _blas.loop_threads():
            while host.steps < max_steps and not host.done.all():
                n = _chunk_len(host, track, max_steps)
                after = host.steps + n  # where the chunk after this one starts, and its length
                following = (after, min(_chunk_len(host, track, max_steps, ahead=1, at=after), capacity))
                state = _one_chunk(kernel, state, host, probe, track, max_consecutive_skips,
                                   bar, n, capacity, feeds, following if following[1] > 0 else None)
                if checkpoint is not None and checkpoint.due():
                    _save(checkpoint, fingerprint, state, host)
    finally:
        if bar is not None:
            # A run the stopping rule ended is complete at its own length, not at 4% of
            # max_steps: the bar ends full.
            bar.total = max(bar.n, 1)
            bar.refresh()
            bar.close()
        if feeds is not None:
            feeds.feeder.close()
    if checkpoint is not None:
        _save(checkpoint, fingerprint, state, host)
    return _finish(state, host, track, time.perf_counter() - t0)


def chunk_schedule(index: int, min_stage: int) -> int:
    """Length of chunk ``index`` (from 0) of a run with a stopping rule whose stages are
    judged once they hold ``min_stage`` steps (:attr:`StopRule.min_stage`).

    A short first chunk shows early progress; the second ends at step ``min_stage``, where
    the rule can first decide; later chunks hold ``min_stage`` steps. Every stage starts at a
    chunk boundary (a decay happens there), so with the boundaries on multiples of
    ``min_stage`` each stage is judged as soon as it is long enough. (With the earlier fixed
    100, 200, 500 schedule, stages of the default rule were judged at 500 steps where 400 were
    enough, and the first at step 800 where 400 were.) Chunks are at least ``CHUNK_MIN`` and at
    most ``CHUNK_CAPACITY`` steps.

    Examples:
        >>> [chunk_schedule(i, 400) for i in range(4)]   # the default StopRule
        [100, 300, 400, 400]
        >>> [chunk_schedule(i, 300) for i in range(4)]   # particles' min_window=150
        [100, 200, 300, 300]
    """
    n = CHUNK_MIN if index == 0 else min_stage - CHUNK_MIN if index == 1 else min_stage
    return int(min(max(n, CHUNK_MIN), CHUNK_CAPACITY))


def _chunk_len(host: _Host, track: bool, max_steps: int, ahead: int = 0, at: int | None = None) -> int:
    """Steps of the next chunk (``ahead=1``: of the one after it, which starts at step
    ``at``): the stopping rule's fixed schedule, or the length of a plain run (host-timed,
    except for a fed source, whose plain chunks hold the feed's capacity); at most the steps
    left."""
    index = host.chunk_index + ahead
    n = chunk_schedule(index, host.rules[0].rule.min_stage) if track else host.plain_next
    return int(max(0, min(n, max_steps - (host.steps if at is None else at))))


class _ReadAhead:
    """Feeds the pieces of chunks to the loop, reading the next piece's rows on the
    feeder's thread while the current piece runs."""

    def __init__(self, feeder: Feeder):
        self.feeder, self.pending = feeder, None  # ((first, steps), future)

    def __call__(self, first: int, steps: int, after: tuple[int, int] | None):
        """The feed of steps ``[first, first + steps)``; starts reading ``after`` (a piece)."""
        if self.pending is not None and self.pending[0] == (first, steps):
            feed = self.pending[1].result()
        else:  # the first piece, or one not foreseen (after a resume)
            feed = self.feeder.load(first, steps)
        self.pending = None if after is None else (after, self.feeder.submit(*after))
        return feed


def _one_chunk(kernel, state, host: _Host, probe, track, max_consecutive_skips, bar,
               n: int, capacity: int, feeds, following):
    """Run one chunk of ``n`` steps and do the host's work after it (stopping rule, step-size
    decay, bookkeeping); ``host`` is updated in place, the new loop state returned.

    The chunk is one compiled call, or, when ``n`` exceeds what a fed chunk holds, several
    (pieces of ``capacity`` steps) whose outputs are joined on the host; ``following`` is the
    first piece of the next chunk, read ahead.
    """
    host.chunk_index += 1
    t0 = time.perf_counter()
    pieces = []
    for offset in range(0, n, capacity):
        m = min(capacity, n - offset)
        feed = None
        if feeds is not None:
            nxt = offset + m
            ahead = (host.steps + nxt, min(capacity, n - nxt)) if nxt < n else following
            feed = feeds(host.steps + offset, m, ahead)
        state, out = _run_chunk(kernel, state, np.int32(m), probe, capacity, track, feed)
        pieces.append((m, out))
    # The one host sync of the chunk: every host-side quantity in a single transfer.
    got, consecutive, host.skipped, finished_at = jax.device_get(
        ([(o.losses, o.probe_means if track else None) for _, o in pieces], state.consecutive, state.skipped,
         state.finished_at)
    )
    got = [(loss[:, :m], p[:, : -(-m // PROBE_BATCH)] if track else None) for (m, _), (loss, p) in zip(pieces, got)]
    if not track and feeds is None:  # the next plain chunk: about PLAIN_SECONDS of work
        grow = PLAIN_SECONDS / max(time.perf_counter() - t0, 1e-6)
        host.plain_next = int(np.clip(n * min(grow, 8.0), 100, PLAIN_CAPACITY))
    losses = np.concatenate([g[0] for g in got], axis=1)
    if track:
        probes = np.concatenate([g[1] for g in got], axis=1)
        host.history.append((host.steps, host.steps + n, _join_means(pieces, [g[0] for g in got], state.params)))
    host.steps += n
    steps, rules = host.steps, host.rules
    for r in map(int, np.flatnonzero(~host.done)):
        if finished_at is not None and finished_at[r] >= 0:  # the kernel's own criterion ended it
            took = int(finished_at[r])
            host.traces[r].append(losses[r][: took - (steps - n)])
            host.num_steps[r] = took
            host.done[r] = True
            host.reasons[r] = "nonfinite" if consecutive[r] >= max_consecutive_skips else kernel.finish_reason
            host.final[r] = _index(state.params, r)
            continue
        host.traces[r].append(losses[r])
        host.num_steps[r] = steps
        if consecutive[r] >= max_consecutive_skips:
            host.done[r], host.reasons[r] = True, "nonfinite"
            host.final[r] = _index(state.params, r)
            continue
        if not track:
            continue
        decision = rules[r].update(losses[r], probes[r])
        if decision.action == "decay":
            host.scales[r] *= decision.factor
        elif decision.action == "stop":
            host.done[r], host.reasons[r] = True, decision.reason
            host.final_loss[r] = decision.final_loss
            host.final[r] = _window_average(host.history, r, steps - decision.window)
    if track:  # keep only the chunks a live restart's stage can still average over
        oldest = min((steps - rules[r].stage_len for r in np.flatnonzero(~host.done)), default=steps)
        # (at least the last chunk: a run that ends right after a decay averages it)
        host.history = [h for h in host.history if h[1] > oldest] or host.history[-1:]
    # Finished restarts stop moving; the others take their (possibly decayed) scale.
    live = np.where(host.done, 0.0, host.scales)
    if not np.array_equal(live, host.applied):
        host.applied = live
        state = state._replace(step_scale=jnp.asarray(live, state.step_scale.dtype))
    if bar is not None:
        bar.update(n)
        bar.set_postfix(loss=f"{np.nanmean(losses):.4g}")
    return state


def _join_means(pieces, losses, params):
    """The iterate average of a chunk run as pieces: each piece's average weighted by its
    finite steps (a step's loss is NaN where it was skipped); the last parameters where no
    step was finite."""
    if len(pieces) == 1:
        return pieces[0][1].mean_params
    counts = jnp.asarray(np.stack([np.isfinite(loss).sum(axis=1) for loss in losses]), jnp.float32)  # [piece, k]
    total = counts.sum(axis=0)

    def join(last, *means):
        w = counts / jnp.maximum(total, 1)
        w = w.reshape(w.shape + (1,) * (last.ndim - 1))
        avg = sum(wi * m for wi, m in zip(w, means))
        return jnp.where(total.reshape((-1,) + (1,) * (last.ndim - 1)) > 0, avg, last)

    return jax.tree.map(join, params, *[o.mean_params for _, o in pieces])


def _finish(state, host: _Host, track: bool, wall: float) -> RunOutput:
    k = host.done.shape[0]
    final, final_loss = list(host.final), host.final_loss.copy()
    for r in map(int, np.flatnonzero(~host.done)):  # ran out of steps
        if track:
            final_loss[r] = host.rules[r].window_mean()
            final[r] = _window_average(host.history, r, int(host.num_steps[r]) - host.rules[r].current_window())
    traces = [np.concatenate(t) if t else np.zeros(0) for t in host.traces]
    for r in range(k):
        if np.isnan(final_loss[r]):
            tail = traces[r][-max(1, len(traces[r]) // 10):]
            final_loss[r] = np.nanmean(tail) if np.isfinite(tail).any() else np.nan
    if all(f is None for f in final):
        out_params = state.params  # plain run: the last iterates, already stacked
    else:
        final = [_index(state.params, r) if f is None else f for r, f in enumerate(final)]
        out_params = jax.tree.map(lambda *xs: jnp.stack(xs), *final)
    return RunOutput(
        params=out_params,
        traces=traces,
        num_steps=host.num_steps,
        stop_reasons=host.reasons,
        # (read with the last chunk's losses: another device read here cost 0.3-0.6 ms on a GPU)
        skipped=np.asarray(state.skipped) if host.skipped is None else host.skipped,
        final_loss=final_loss,
        wall_time=wall,
        kernel_state=state.kernel_state,
    )


# ---------------------------------------------------------------------------- checkpoints
_TRACKER_SCALARS = ("stage_len", "previous", "decays", "final_stage", "last_drift")


def _save(checkpoint, fingerprint, state: LoopState, host: _Host) -> None:
    arrays, key_leaves = ckpt.tree_to_arrays("loop", state)
    k = host.done.shape[0]
    for r in range(k):
        arrays[f"trace/{r}"] = np.concatenate(host.traces[r]) if host.traces[r] else np.zeros(0, np.float32)
        if host.final[r] is not None:
            arrays.update(ckpt.tree_to_arrays(f"final/{r}", host.final[r])[0])
    for h, (_, _, means) in enumerate(host.history):
        arrays.update(ckpt.tree_to_arrays(f"history/{h}", means)[0])
    rules = []
    for r, rule in enumerate(host.rules or []):
        for j, x in enumerate(rule.stage):
            arrays[f"rule/{r}/stage/{j}"] = x
        for j, x in enumerate(rule.probes):
            arrays[f"rule/{r}/probe/{j}"] = x
        rules.append({"stage": len(rule.stage), "probes": len(rule.probes),
                      **{a: getattr(rule, a) for a in _TRACKER_SCALARS}})
    for name in ("done", "num_steps", "final_loss", "scales", "applied"):
        arrays[f"host/{name}"] = np.asarray(getattr(host, name))
    header = {
        "version": ckpt.FORMAT_VERSION, "fingerprint": fingerprint, "key_leaves": key_leaves,
        "steps": host.steps, "chunk_index": host.chunk_index, "plain_next": host.plain_next,
        "reasons": host.reasons,
        "history": [[a, b] for a, b, _ in host.history], "final": [f is not None for f in host.final],
        "rules": rules,
    }
    checkpoint.save(arrays, json.loads(json.dumps(header, default=_json_default)))


def _json_default(x):
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    raise TypeError(f"cannot save {type(x).__name__} in a checkpoint header")


def _restore(checkpoint, fingerprint, state: LoopState, host: _Host):
    arrays, header = checkpoint.load(fingerprint)
    try:
        state = ckpt.arrays_to_tree("loop", arrays, state, set(header["key_leaves"]))
        one = _index(state.params, 0)
        k = host.done.shape[0]
        host.steps, host.chunk_index, host.reasons = header["steps"], header["chunk_index"], header["reasons"]
        host.plain_next = header["plain_next"]
        host.traces = [[arrays[f"trace/{r}"]] if arrays[f"trace/{r}"].size else [] for r in range(k)]
        host.final = [ckpt.arrays_to_tree(f"final/{r}", arrays, one) if saved else None
                      for r, saved in enumerate(header["final"])]
        host.history = [(a, b, ckpt.arrays_to_tree(f"history/{h}", arrays, state.params))
                        for h, (a, b) in enumerate(header["history"])]
        for name in ("done", "num_steps", "final_loss", "scales", "applied"):
            setattr(host, name, np.array(arrays[f"host/{name}"]))
        for r, saved in enumerate(header["rules"]):
            rule = host.rules[r]
            rule.stage = [arrays[f"rule/{r}/stage/{j}"] for j in range(saved["stage"])]
            rule.probes = [arrays[f"rule/{r}/probe/{j}"] for j in range(saved["probes"])]
            for a in _TRACKER_SCALARS:
                value = saved[a]
                setattr(rule, a, tuple(value) if isinstance(value, list) else value)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise ValueError(
            f"The checkpoint {checkpoint.path} does not match this fit's state ({type(e).__name__}: "
            f"{e}). Delete it (or pass another path) to start afresh."
        ) from e
    return state, host


def _index(tree, r: int):
    return jax.tree.map(lambda x: x[r], tree)


def _window_average(history, r: int, start_step: int):
    """Iterate average of restart ``r`` over the chunks that end after ``start_step`` (at
    least the last one), each chunk weighted by its number of steps."""
    kept = [(end - first, means) for first, end, means in history if end > start_step]
    kept = kept or [(1, history[-1][2])]
    total = float(sum(w for w, _ in kept))
    return jax.tree.map(
        lambda *xs: sum(w / total * x[r] for (w, _), x in zip(kept, xs)), *[m for _, m in kept]
    )


def _progress_bar(progress: bool, total: int, description: str):
    if not progress:
        return None

    return tqdm(total=total, desc=description, unit="step", leave=False, dynamic_ncols=True)
