"""The compiled loop every method runs in, knowing nothing of targets or families.

``driver`` runs a loss in chunks of compiled steps (progress, stopping rule, non-finite steps
skipped and counted, restarts as a batch axis); ``batching`` holds the minibatch sources
(shuffled rows in memory, rows streamed from disk); ``checkpoint`` saves and resumes a run;
``rng`` chooses how per-step keys are made.
"""

from veil.loop import batching, checkpoint, driver, rng
from veil.loop.checkpoint import Checkpoint

__all__ = ["driver", "batching", "checkpoint", "rng", "Checkpoint"]
