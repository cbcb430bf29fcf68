"""The stopping rule's pieces, checked on synthetic iterates with known drift."""

import jax
import jax.numpy as jnp
import numpy as np

import veil
from veil.diagnostics import _drift_statistic
from veil.driver import MAX_PROBE, probe_indices


def test_drift_statistic_is_small_without_drift_and_large_with_it():
    # 40 batch means of 300 independent N(0, 1) coordinates: each squared split-half t is
    # F(1, 8) distributed, median 0.50; the median of 300 such values has sd ~0.06, so < 1 holds
    # with overwhelming probability. A trend of 1 sd per half-window gives t^2 near 5^2/2.
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((40, 300))
    assert _drift_statistic(rows, 10) < 1.0
    trend = np.linspace(0, 2, 40)[:, None]
    assert _drift_statistic(rows + trend, 10) > 5.0


def test_a_small_drifting_leaf_is_not_outvoted_by_a_large_settled_one():
    # 20 drifting coordinates (a location vector) beside 2,000 settled ones (a factor): pooled,
    # the median ignores the 1% that drift; per leaf, the drifting leaf decides.
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((40, 2020))
    rows[:, :20] += np.linspace(0, 2, 40)[:, None]
    groups = np.r_[np.zeros(20, int), np.ones(2000, int)]
    assert _drift_statistic(rows, 10) < 1.0
    assert _drift_statistic(rows, 10, groups) > 5.0


def test_probe_watches_small_leaves_whole():
    q = veil.FullRank(100)  # loc 100, log_scale 100, unit_tril 10,000
    params = jax.tree.map(lambda x: jnp.asarray(x)[None], q)  # one restart
    idx, groups = probe_indices(params)
    assert len(idx) <= MAX_PROBE and len(np.unique(idx)) == len(idx)
    sizes = np.bincount(groups)
    assert sorted(sizes)[:2] == [100, 100]  # loc and log_scale in full
    assert sizes.max() == MAX_PROBE - 200  # the factor takes the rest, evenly spaced

