"""What veil's benchmarks share: the Inference Gym targets (loaded offline through the shared
data shim), the accuracy of draws against a target's ground truth, and a plain ELBO estimate.

The shim lives beside the repository, in ``../shared/bench/ig_offline_shim.py`` (``VEIL_SHARED``
points elsewhere); it is loaded from its file, not put on ``sys.path``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository


@functools.cache
def _offline_shim():
    shared = Path(os.environ.get("VEIL_SHARED", ROOT.parent / "shared"))
    spec = importlib.util.spec_from_file_location("ig_offline_shim", shared / "bench" / "ig_offline_shim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TARGETS = [
    "EightSchools",
    "GermanCreditNumericLogisticRegression",
    "RadonContextualEffectsIndiana",
    "IllConditionedGaussian",
    "Banana",
    "NealsFunnel",
    "BrownianMotionMissingMiddleObservations",
    "SyntheticItemResponseTheory",
    "VectorizedStochasticVolatilityLogSP500Small",
]
NUM_DRAWS = 20_000


def load_target(name):
    _offline_shim().install()
    import inference_gym.using_jax as gym
    import jax
    import jax.numpy as jnp

    model = gym.targets.VectorModel(getattr(gym.targets, name)(), flatten_sample_transformations=True)
    bij = model.default_event_space_bijector
    d = int(model.event_shape[0])

    def log_p(z):
        return model.unnormalized_log_prob(bij(z)) + bij.forward_log_det_jacobian(z, event_ndims=1)

    st = model.sample_transformations["identity"]
    gt_mean = jnp.asarray(st.ground_truth_mean)
    gt_sd = jnp.asarray(st.ground_truth_standard_deviation)

    def to_ground_truth_space(z):
        # The ground truth is of the sample transformation applied to the constrained sample,
        # in the transformation's own order (which differs from the model's event order for
        # some targets, e.g. stochastic volatility).
        return jax.vmap(st)(bij(z))

    return log_p, to_ground_truth_space, d, gt_mean, gt_sd


def accuracy(z, to_gt, gt_mean, gt_sd):
    import numpy as np

    x = np.asarray(to_gt(z), np.float64)
    err = np.abs(x.mean(0) - np.asarray(gt_mean)) / np.asarray(gt_sd)
    ratio = x.std(0) / np.asarray(gt_sd)
    return {"max_err": float(err.max()), "median_err": float(np.median(err)),
            "sd_ratio_min": float(ratio.min()), "sd_ratio_max": float(ratio.max()),
            "sd_ratio_median": float(np.median(ratio))}


def elbo(log_p, z, log_q) -> float:
    """Plain Monte-Carlo ELBO of the fitted Gaussian (higher is closer to the KL optimum)."""
    import jax
    import numpy as np

    return float(np.mean(np.asarray(jax.vmap(log_p)(z)) - np.asarray(log_q)))
