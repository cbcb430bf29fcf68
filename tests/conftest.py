"""Strict test configuration: warnings are errors (pyproject), and every random test takes its
key from the ``key`` fixture, which prints its seed on failure.

Implicit rank promotion is left on: NumPyro's distributions, which veil reuses, broadcast
by design."""

import os

os.environ.setdefault("VEIL_COMPILATION_CACHE", "0")  # tests measure compilation themselves

import jax  # noqa: E402
import matplotlib  # noqa: E402
import pytest  # noqa: E402

matplotlib.use("Agg")


@pytest.fixture
def key(request):
    seed = 20261126
    request.node.user_properties.append(("seed", seed))
    print(f"test key seed = {seed}")
    return jax.random.key(seed)
