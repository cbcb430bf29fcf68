"""L-BFGS as a kernel of veil's loop: deterministic ADVI's fixed-draw objective and the
Laplace approximation's search for the mode both run on it.

One step is one L-BFGS iteration (optax's, with its zoom line search) on ``objective(params)``,
a deterministic function; the traced value is the objective. The kernel finishes when the
objective has not fallen below its best value so far by more than ``tol`` in ``patience``
iterations in a row. Progress is measured against the best value so far, not the previous one:
at the optimum float32 round-off makes the objective jitter by an ulp (1.2e-7 at 1.9), and a
one-ulp dip after a one-ulp rise counted as a fall of more than 1e-7 and reset the count, so a
converged fit could run to its cap (test_dadvi's Gaussian did, under the test suite's XLA
flags). The jitter cannot keep beating its own minimum. A non-finite objective does not change
on a second look: that ends the run too (as ``nonfinite``, with the last finite iterate).
"""

from __future__ import annotations

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from veil.loop.kernel import Kernel, StepInfo, all_finite, keep_if

__all__ = ["LBFGSKernel"]

_LBFGS = optax.lbfgs()  # one object: the compiled loop is keyed by the kernel's static parts


class LBFGSKernel(Kernel):
    """L-BFGS on ``objective`` (an ``equinox.Module`` called on the parameters; its arrays are
    inputs of the compiled loop). The state carries L-BFGS's, the best value, the stall count and
    the objective's evaluations (the line search's; ``value_and_grad_from_state`` reuses the
    accepted point's, except at the start)."""

    objective: Any
    tol: float = eqx.field(static=True)
    patience: int = eqx.field(static=True, default=5)

    finishes: ClassVar[bool] = True

    @property
    def finish_reason(self) -> str:
        return (f"converged: the objective fell below its best by less than {self.tol:g} in "
                f"{self.patience} iterations in a row")

    def init(self, params):
        best = jnp.asarray(jnp.inf, jax.dtypes.canonicalize_dtype(jnp.float64))  # the default float's width
        return _LBFGS.init(params), best, jnp.int32(0), jnp.int32(1)

    def step(self, params, state, key, scale, batch):
        opt_state, best, stall, evals = state
        value, grad = optax.value_and_grad_from_state(self.objective)(params, state=opt_state)
        ok = all_finite(value, grad)

        def move(args):
            params, opt_state, best, stall, evals = args
            updates, opt_state = _LBFGS.update(grad, opt_state, params, value=value, grad=grad, value_fn=self.objective)
            stall = jnp.where(best - value > self.tol, 0, stall + 1)
            evals = evals + optax.tree_utils.tree_get(opt_state, "num_linesearch_steps")
            return optax.apply_updates(params, updates), opt_state, jnp.minimum(value, best).astype(best.dtype), stall, evals

        params, opt_state, best, stall, evals = keep_if(ok, move, (params, opt_state, best, stall, evals))
        return params, (opt_state, best, stall, evals), StepInfo(value, ok, (stall >= self.patience) | ~ok)
