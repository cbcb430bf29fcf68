"""The compiled loop every method runs in, knowing nothing of targets or families.

``kernel`` is the contract every method meets (``Kernel``: ``init``, ``step``, ``watched``,
``batches``); ``driver`` runs a kernel in chunks of compiled steps (progress, stopping rule, non-finite steps
skipped and counted, restarts as a batch axis); ``batching`` holds the minibatch sources
(shuffled rows in memory, rows streamed from disk); ``checkpoint`` saves and resumes a run;
``rng`` chooses how per-step keys are made.
"""

from veil.loop import batching, checkpoint, driver, kernel, rng
from veil.loop.checkpoint import Checkpoint
from veil.loop.kernel import GradientKernel, Kernel, Loss, StepInfo

__all__ = ["driver", "batching", "checkpoint", "kernel", "rng", "Checkpoint", "Kernel", "StepInfo", "Loss", "GradientKernel"]
