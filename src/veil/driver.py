"""The chunked, compiled optimisation loop. It knows nothing of variational inference.

``run`` minimises a stochastic loss ``loss_fn(params, key) -> (loss, aux)`` with an optax
optimizer. Steps run inside one compiled ``lax.while_loop`` per *chunk*; the host is touched
only between chunks (progress bar, stopping rule), never per step. Independent restarts are a
leading batch axis of ``params`` and run under ``vmap`` in the same program.

Each step whose loss or gradient is not finite is skipped (parameters and optimizer state
keep their previous values) and counted; ``max_consecutive_skips`` skipped steps in a row stop
the run with ``stop_reason="nonfinite"``.

The update of every step is multiplied by a per-restart ``step_scale`` held in the loop's
state. The host's stopping rule lowers it between chunks (step-size decay) without changing
the compiled program, whatever optax optimizer the user chose.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from veil.diagnostics import Decision, StopRule

__all__ = ["run", "RunOutput", "CHUNK_CAPACITY", "CHUNK_SCHEDULE"]

# Steps one compiled chunk can hold (a static size: the loss buffer); chunks that run fewer
# steps reuse the same program. Chunk lengths: short first chunks so the progress bar and the
# stopping rule see early progress, then CHUNK_SCHEDULE[-1] steps per chunk. A fixed schedule (not one timed on the
# host) keeps a fit a pure function of its key: the stopping rule sees the same chunks on every
# machine. 500 steps amortise the ~0.3 ms of host work per chunk to under 5% of even the
# cheapest steps (~30 us).
CHUNK_CAPACITY = 500
CHUNK_SCHEDULE = (100, 200, CHUNK_CAPACITY)
# The stopping rule also watches the parameters themselves (a drift in a flat direction shows
# in the parameters long before it shows in the noisy loss): per chunk, the driver returns
# means over batches of PROBE_BATCH steps of at most MAX_PROBE coordinates.
from veil.diagnostics import PROBE_BATCH  # noqa: E402  (one constant, two users)
MAX_PROBE = 4096


class LoopState(NamedTuple):
    params: Any
    opt_state: Any
    key: jax.Array
    step_scale: jax.Array
    skipped: jax.Array  # total skipped steps (int32)
    consecutive: jax.Array  # skipped steps in a row at the end of the chunk (int32)


class ChunkOut(NamedTuple):
    losses: jax.Array  # [CHUNK_CAPACITY], NaN where skipped or unused
    mean_params: Any  # parameters averaged over the chunk's finite steps
    probe_means: jax.Array  # [CHUNK_CAPACITY // PROBE_BATCH, num_probe]: batch means of the probe


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def probe_indices(params) -> np.ndarray:
    """Coordinates of the flat parameter vector (one restart) that the stopping rule watches:
    all of them up to ``MAX_PROBE``, else ``MAX_PROBE`` evenly spaced ones."""
    size = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(params))
    if size <= MAX_PROBE:
        return np.arange(size)
    return np.linspace(0, size - 1, MAX_PROBE).round().astype(np.int64)


def _tree_where(pred, a, b):
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if eqx.is_inexact_array(x)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _chunk(loss_fn, optimizer, state: LoopState, n_steps, probe, capacity: int):
    """Run ``n_steps`` (dynamic, ``<= capacity``) optimisation steps of one restart."""
    grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)

    def body(i, carry):
        st, losses, psum, nfinite, pbuf = carry
        key, sub = jax.random.split(st.key)
        (loss, _), grads = grad_fn(st.params, sub)
        ok = jnp.isfinite(loss) & _all_finite(grads)
        # Zero the gradient of a skipped step so no NaN reaches the optimizer's arithmetic.
        grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
        updates, new_opt = optimizer.update(grads, st.opt_state, st.params)
        updates = jax.tree.map(lambda u: st.step_scale * u, updates)
        new_params = eqx.apply_updates(st.params, updates)
        params = _tree_where(ok, new_params, st.params)
        opt_state = _tree_where(ok, new_opt, st.opt_state)
        skip = (~ok).astype(jnp.int32)
        st = LoopState(
            params, opt_state, key, st.step_scale,
            st.skipped + skip, jnp.where(ok, 0, st.consecutive + 1),
        )
        losses = losses.at[i].set(jnp.where(ok, loss, jnp.nan))
        psum = jax.tree.map(lambda s, p: s + jnp.where(ok, p, 0.0), psum, params)
        pbuf = pbuf.at[i // PROBE_BATCH].add(_flat(params)[probe])
        return st, losses, psum, nfinite + ok, pbuf

    losses = jnp.full((capacity,), jnp.nan)
    psum = jax.tree.map(jnp.zeros_like, state.params)
    pbuf = jnp.zeros((capacity // PROBE_BATCH, probe.shape[0]))
    state, losses, psum, nfinite, pbuf = jax.lax.fori_loop(
        0, n_steps, body, (state, losses, psum, jnp.int32(0), pbuf)
    )
    denom = jnp.maximum(nfinite, 1)
    mean_params = jax.tree.map(lambda s, p: jnp.where(nfinite > 0, s / denom, p), psum, state.params)
    # Steps in each probe batch: PROBE_BATCH, except a last partial one.
    counts = jnp.clip(n_steps - PROBE_BATCH * jnp.arange(pbuf.shape[0]), 0, PROBE_BATCH)
    probe_means = pbuf / jnp.maximum(counts, 1)[:, None]
    return state, ChunkOut(losses, mean_params, probe_means)


@eqx.filter_jit
def _run_chunk(loss_fn, optimizer, state, n_steps, probe, capacity):
    return jax.vmap(
        lambda st: _chunk(loss_fn, optimizer, st, n_steps, probe, capacity)
    )(state)


@eqx.filter_jit
def _init_opt(optimizer, params):
    return jax.vmap(optimizer.init)(params)


class RunOutput(NamedTuple):
    """What :func:`run` returns, one entry per restart where it says so."""

    params: Any  # final parameters, leading restart axis
    traces: list[np.ndarray]  # loss per step, per restart (NaN where a step was skipped)
    num_steps: np.ndarray  # steps each restart ran
    stop_reasons: list[str]
    skipped: np.ndarray  # skipped (non-finite) steps per restart
    final_loss: np.ndarray  # mean loss over each restart's final window
    wall_time: float


def run(
    loss_fn: Callable,
    params,
    optimizer: optax.GradientTransformation,
    *,
    key: jax.Array,
    max_steps: int,
    stop_rule: StopRule | None,
    progress: bool = True,
    max_consecutive_skips: int = 100,
    description: str = "fit",
) -> RunOutput:
    """Minimise ``loss_fn`` from ``params`` (leading axis = restarts) for at most ``max_steps``.

    Args:
        loss_fn: ``(params, key) -> (loss, aux)``; an ``equinox.Module`` or a function whose
            identity is stable between calls (it keys the compilation cache).
        params: a pytree of arrays with a leading restart axis of size ``k``.
        optimizer: an optax transformation; its updates are scaled by the stop rule's factor.
        key: a JAX key; split into one stream per restart.
        max_steps: cap on the number of steps.
        stop_rule: a :class:`~veil.diagnostics.StopRule`, or ``None`` to run ``max_steps``
            steps and return the last iterate.
        progress: show a tqdm progress bar (updated once per chunk).
    """
    t0 = time.perf_counter()
    k = jax.tree.leaves(params)[0].shape[0]
    state = LoopState(
        params=params,
        opt_state=_init_opt(optimizer, params),
        key=jax.random.split(key, k),
        step_scale=jnp.ones(k),
        skipped=jnp.zeros(k, jnp.int32),
        consecutive=jnp.zeros(k, jnp.int32),
    )
    rules = [stop_rule.start() if stop_rule is not None else None for _ in range(k)]
    # Without a stopping rule nothing reads the probe: watch no coordinates at all.
    probe = jnp.asarray(probe_indices(params) if stop_rule is not None else np.zeros(0, np.int64))
    traces: list[list[np.ndarray]] = [[] for _ in range(k)]
    chunk_means: list[list[tuple[int, Any]]] = [[] for _ in range(k)]  # (end step, mean params)
    done = np.zeros(k, bool)
    num_steps = np.zeros(k, np.int64)
    reasons = [""] * k
    final = [None] * k
    final_loss = np.full(k, np.nan)
    scales = np.ones(k)
    applied = np.ones(k)

    bar = _progress_bar(progress, max_steps, description)
    steps, chunk_index = 0, 0
    try:
        while steps < max_steps and not done.all():
            n = CHUNK_SCHEDULE[min(chunk_index, len(CHUNK_SCHEDULE) - 1)]
            n = int(min(n, max_steps - steps))
            chunk_index += 1
            state, out = _run_chunk(loss_fn, optimizer, state, jnp.int32(n), probe, CHUNK_CAPACITY)
            losses = np.asarray(out.losses[:, :n])  # the one host sync of the chunk
            rows = -(-n // PROBE_BATCH)
            probes = np.asarray(out.probe_means[:, :rows]) if stop_rule is not None else None
            steps += n
            consecutive = np.asarray(state.consecutive)
            for r in np.flatnonzero(~done):
                traces[r].append(losses[r])
                chunk_means[r].append((steps, jax.tree.map(lambda x: x[r], out.mean_params)))
                num_steps[r] = steps
                if consecutive[r] >= max_consecutive_skips:
                    done[r], reasons[r] = True, "nonfinite"
                    final[r] = jax.tree.map(lambda x: x[r], state.params)
                    continue
                if rules[r] is None:
                    continue
                decision = rules[r].update(losses[r], probes[r])
                if decision.action == "decay":
                    scales[r] *= decision.factor
                elif decision.action == "stop":
                    done[r], reasons[r] = True, decision.reason
                    final_loss[r] = decision.final_loss
                    final[r] = _average_since(chunk_means[r], steps - decision.window)
            # Finished restarts stop moving; the others take their (possibly decayed) scale.
            live = np.where(done, 0.0, scales)
            if not np.array_equal(live, applied):
                applied = live
                state = state._replace(step_scale=jnp.asarray(live, state.step_scale.dtype))
            if bar is not None:
                bar.update(n)
                bar.set_postfix(loss=f"{np.nanmean(losses[~done] if (~done).any() else losses):.4g}")
    finally:
        if bar is not None:
            bar.close()

    skipped = np.asarray(state.skipped)
    for r in range(k):
        if done[r]:
            continue
        reasons[r] = "max_steps"
        if rules[r] is None:
            final[r] = jax.tree.map(lambda x: x[r], state.params)
        else:
            window = rules[r].current_window()
            final_loss[r] = rules[r].window_mean()
            final[r] = _average_since(chunk_means[r], num_steps[r] - window)
    for r in range(k):
        if np.isnan(final_loss[r]):
            tr = np.concatenate(traces[r]) if traces[r] else np.array([np.nan])
            tail = tr[-max(1, len(tr) // 10):]
            final_loss[r] = np.nanmean(tail) if np.isfinite(tail).any() else np.nan
    out_params = jax.tree.map(lambda *xs: jnp.stack(xs), *final)
    return RunOutput(
        params=out_params,
        traces=[np.concatenate(t) if t else np.zeros(0) for t in traces],
        num_steps=num_steps,
        stop_reasons=reasons,
        skipped=skipped,
        final_loss=final_loss,
        wall_time=time.perf_counter() - t0,
    )


def _average_since(chunk_means, start_step):
    """Iterate average over the chunks that end after ``start_step`` (at least the last one).

    Chunk means are weighted by chunk length, so the average is over steps, not chunks.
    """
    starts = [0] + [end for end, _ in chunk_means[:-1]]
    kept = [(end - s, m) for (end, m), s in zip(chunk_means, starts) if end > start_step]
    kept = kept or [(1, chunk_means[-1][1])]
    total = float(sum(w for w, _ in kept))
    return jax.tree.map(
        lambda *xs: sum(w / total * x for (w, _), x in zip(kept, xs)), *[m for _, m in kept]
    )


def _progress_bar(progress: bool, total: int, description: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", leave=False, dynamic_ncols=True)
