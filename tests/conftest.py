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

import gc  # noqa: E402

import jax  # noqa: E402
import matplotlib  # noqa: E402
import pytest  # noqa: E402

matplotlib.use("Agg")

# Every XLA CPU executable holds ~3 memory mappings (measured: 300 small programs, +968), and
# Linux allows a process 65,530 (vm.max_map_count). A worker compiles tens of thousands of
# programs over the suite (every eager op is one), and past the limit LLVM's next mapping fails
# and the worker dies inside XLA's compiler (a segfault or abort in whichever test came next:
# 4 full runs in a row once the suite grew). Past 40,000 mappings the compiled programs are
# dropped (jax.clear_caches()), checked every 10 tests (reading the map costs ~5 ms).
_MAX_MAPS = 40_000
_tests_run = [0]


@pytest.fixture(autouse=True)
def _release_compiled_code():
    yield
    _tests_run[0] += 1
    if _tests_run[0] % 10:
        return
    try:
        with open("/proc/self/maps") as f:
            mappings = sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to keep under
        return
    if mappings > _MAX_MAPS:
        jax.clear_caches()
        gc.collect()


@pytest.fixture
def key(request):
    seed = 20261126
    request.node.user_properties.append(("seed", seed))
    print(f"test key seed = {seed}")
    return jax.random.key(seed)


def _grads_match_finite_differences(f, leaves, *, entries=None, h=1e-2, rtol=2e-3):
    """Check ``jax.grad(f)(leaves)`` (``f`` of a list of arrays, scalar) entry by entry against
    central differences at steps ``h`` and ``h / 2`` with Richardson extrapolation: truncation
    O(h^4) ~ 1e-7 relative, float32 round-off O(eps |f| / h) ~ 2e-4, so ``rtol`` 2e-3 (of
    ``max(1, |fd|)``). ``entries`` limits the entries checked per leaf (all by default)."""
    grads = jax.grad(f)(leaves)
    for i, (x, g) in enumerate(zip(leaves, grads)):
        for j in range(x.size if entries is None else min(x.size, entries)):
            def central(step):
                e = jax.numpy.zeros(x.size).at[j].set(step).reshape(x.shape)
                up = [y + e if k == i else y for k, y in enumerate(leaves)]
                dn = [y - e if k == i else y for k, y in enumerate(leaves)]
                return (float(f(up)) - float(f(dn))) / (2 * step)

            fd = (4 * central(h / 2) - central(h)) / 3
            assert abs(fd - float(g.ravel()[j])) <= rtol * max(1.0, abs(fd)), (i, j, fd, g)


@pytest.fixture
def grads_match_finite_differences():
    """:func:`_grads_match_finite_differences`, for tests of a family's gradients."""
    return _grads_match_finite_differences
