"""Strict test configuration: warnings are errors (pyproject), and every random test takes its
key from the ``key`` fixture, which prints its seed on failure.

Implicit rank promotion is left on: NumPyro's distributions, which veil reuses, broadcast
by design."""

import os

os.environ.setdefault("VEIL_COMPILATION_CACHE", "0")  # tests measure compilation themselves
# The suite's time is mostly XLA compiling small CPU programs; LLVM's optimisation of them costs
# more than it saves here (measured: test_fit + test_particles 111 -> 98 s on 2 cores). Set
# before jax is imported; subprocess tests inherit it unless they set XLA_FLAGS themselves.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

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
