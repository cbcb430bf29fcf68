"""The loop contract: what veil's compiled loop runs.

A method is a :class:`Kernel`, state in, state out. The loop (:func:`veil.loop.driver.run`)
holds the parameters ``params`` (with a leading restart axis) and the kernel's own state, and
at every step calls, for one restart,

    params, state, info = kernel.step(params, state, key, scale, batch)

with the step's key, the stopping rule's step-size factor ``scale`` (1 until the rule decays
it; a kernel multiplies its move by it) and, where the kernel declares a batch source, the
step's batch. ``info`` (:class:`StepInfo`) is what the host reads of the step at the next chunk
boundary: the value traced and judged by the stopping rule, and whether the step was taken. A
step that is not finite is not taken: the kernel returns its input unchanged (``keep_if``)
with ``ok = False``, and the loop counts it. At a chunk boundary the host also reads
``kernel.watched(params)``, what the stopping rule's drift test watches. Nothing else is
looked up on a kernel: no attribute names, no fake gradients.

Kernels in veil: :class:`GradientKernel` (an optax optimizer on the gradient of a
:class:`Loss`: ``veil.fit``, repulsive ensembles), the particle methods' kernel
(:mod:`veil.particles.runner`: the method's own move), FB-GVI's (its proximal step) and
deterministic ADVI's (an L-BFGS iteration; it ``finishes`` by its own tolerance).

Models that learn (issue 31) use the contract as it is: model parameters learned beside ``q``
are more leaves of ``params`` (``{"q": ..., "theta": ...}``) that the same kernel moves; local
latents run as one more kernel (:mod:`veil.local`), whose per-row table of variational
parameters is a leaf of ``params`` and whose row-wise optimizer moments are its ``state``, both
read and written only at the rows the step's batch names. Neither changes the loop: ``init``,
``step``, ``watched`` and the batch source stay as they are.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from veil._config import cheap_branches

__all__ = ["Kernel", "StepInfo", "Loss", "GradientKernel", "keep_if", "all_finite"]


class StepInfo(NamedTuple):
    """What the loop records of one step."""

    value: jax.Array  # the traced value (a loss, or a method's report); NaN is recorded where not ok
    ok: jax.Array  # whether the step was taken (bool): a step that is not finite keeps its input
    done: Any = False  # for a kernel that ``finishes``: its own criterion is met after this step


class Kernel(eqx.Module):
    """One step of a method that veil's loop runs (see the module docstring).

    ``init(params)`` gives the kernel's state for one restart's ``params``; ``step`` moves
    them; ``watched(params)`` is what the stopping rule's drift test watches (by default the
    parameters); ``batches`` is the batch source the loop draws each step's batch from
    (``None``: full data). A kernel is an ``equinox.Module``: its static parts key the
    compiled loop, its arrays (data) are inputs of it.

    A deterministic method that knows when it is done (L-BFGS on a fixed objective) sets
    ``finishes`` and says so in ``StepInfo.done``: the loop then takes no more steps of that
    restart and ends it with ``finish_reason``; stochastic methods leave that to the stopping
    rule.
    """

    finishes: ClassVar[bool] = False
    finish_reason: ClassVar[str] = "converged: the method's own criterion was met"

    @abc.abstractmethod
    def init(self, params) -> Any:
        """The kernel's state for one restart's ``params`` (optimizer moments, baselines)."""

    @abc.abstractmethod
    def step(self, params, state, key: jax.Array, scale: jax.Array, batch: Any) -> tuple[Any, Any, StepInfo]:
        """One step: ``(params, state, StepInfo)``; a step that is not finite returns its
        input (see :func:`keep_if`) and ``ok = False``."""

    def watched(self, params):
        """What the stopping rule's drift test watches for one restart's ``params``."""
        return params

    @property
    def batches(self):
        """The batch source (``veil.loop.batching``), or ``None`` for a full-data kernel."""
        return None


def all_finite(value, tree) -> jax.Array:
    """Whether ``value`` and every entry of ``tree`` are finite, in one reduction (a sum with
    an inf or NaN in it is not finite)."""
    return jnp.isfinite(value + sum(jnp.sum(x) for x in jax.tree.leaves(tree)))


def keep_if(ok, move, old):
    """``move(old)`` where ``ok``, else ``old`` unchanged (``None`` leaves stay ``None``).

    ``lax.cond`` on a CPU, where the branch costs less than selecting every array; ``where``
    on a GPU, where a branch costs a round trip to the host (``veil._config.cheap_branches``).
    """
    if cheap_branches():
        return jax.lax.cond(ok, move, lambda args: args, old)
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), move(old), old)


class Loss(eqx.Module):
    """A stochastic loss for :class:`GradientKernel`: ``(params, key, state, batch) ->
    (value, new_state)``, with its own state (a moving-average baseline; ``None`` for most),
    what the drift test watches, and its batch source."""

    @abc.abstractmethod
    def __call__(self, params, key: jax.Array, state: Any, batch: Any) -> tuple[jax.Array, Any]:
        """The loss's value at ``params`` and its new state."""

    def init_state(self, params) -> Any:
        return None

    def watched(self, params):
        return params

    @property
    def batches(self):
        return None


class GradientKernel(Kernel):
    """An optax optimizer on the gradient of a :class:`Loss`; the update is scaled by the
    stopping rule's factor. A step whose value or any gradient entry is not finite is skipped:
    the parameters, the optimizer's state and the loss's state stay as they were."""

    loss: Loss
    optimizer: optax.GradientTransformation = eqx.field(static=True)

    def init(self, params):
        return self.optimizer.init(params), self.loss.init_state(params)

    def step(self, params, state, key, scale, batch):
        opt_state, loss_state = state
        (value, new_loss_state), grads = eqx.filter_value_and_grad(self.loss, has_aux=True)(
            params, key, loss_state, batch)
        ok = all_finite(value, grads)

        def move(args):
            params, opt_state, _ = args
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u: scale * u, updates)
            return eqx.apply_updates(params, updates), opt_state, new_loss_state

        params, opt_state, loss_state = keep_if(ok, move, (params, opt_state, loss_state))
        return params, (opt_state, loss_state), StepInfo(value, ok)

    def watched(self, params):
        return self.loss.watched(params)

    @property
    def batches(self):
        return self.loss.batches
