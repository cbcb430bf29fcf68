"""The loop contract (issue 30): the driver runs any veil.loop.kernel.Kernel (init, step,
watched, batches), records what its StepInfo says, and looks nothing else up."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import veil
from veil.loop import driver
from veil.loop.kernel import Kernel, StepInfo, keep_if

SRC = pathlib.Path(veil.__file__).parent


class Halving(Kernel):
    """x <- x - scale * x / 2, each step taken with probability 0.7 (a coin from the step's
    key): after the run, x = x0 / 2^(steps taken), the traced value |x|^2 before each step."""

    def init(self, x):
        return jnp.int32(0)  # steps taken, carried as the kernel's own state

    def step(self, x, taken, key, scale, batch):
        ok = jax.random.uniform(key) < 0.7
        value = jnp.sum(x**2)
        x, taken = keep_if(ok, lambda a: (a[0] - scale * 0.5 * a[0], a[1] + 1), (x, taken))
        return x, taken, StepInfo(value, ok)

    def watched(self, x):
        return {"x": x}


def test_the_driver_runs_any_kernel_and_counts_the_steps_it_did_not_take():
    x0 = jnp.array([[1.0, -2.0], [3.0, 0.5]])  # two restarts
    out = driver.run(Halving(), x0, key=jax.random.key(0), max_steps=40, stop_rule=None, progress=False)
    for r in range(2):
        trace = out.traces[r]
        taken = int(np.isfinite(trace).sum())
        assert out.skipped[r] == 40 - taken and 0 < taken < 40  # a NaN in the trace per step not taken
        # exact: each taken step halves x (powers of two are exact in float32)
        np.testing.assert_array_equal(np.asarray(out.params[r]), np.asarray(x0[r]) / 2.0**taken)
        # the traced value is |x|^2 before each taken step
        np.testing.assert_allclose(trace[np.isfinite(trace)], np.sum(np.asarray(x0[r]) ** 2) / 4.0 ** np.arange(taken),
                                   rtol=1e-6)


def test_the_driver_refuses_what_is_not_a_kernel():
    with pytest.raises(TypeError, match="Kernel"):
        driver.run(lambda p, k: (jnp.sum(p**2), None), jnp.zeros((1, 2)), key=jax.random.key(0),
                   max_steps=5, stop_rule=None, progress=False)


def test_no_fake_gradients_and_no_attribute_discovery_in_the_loop():
    """Methods whose move is not an optax step (FB-GVI, the ensemble Kalman methods) are
    kernels of their own, not a move passed as a gradient through optax.sgd(1.0); the driver
    reads a kernel through its declared methods only."""
    for path in SRC.rglob("*.py"):
        assert "optax.sgd(1.0)" not in path.read_text(), path
    text = (SRC / "loop" / "driver.py").read_text()
    for name in ("value_and_grad", "loss_fn", "getattr(kernel", "getattr(source", "getattr(loss"):
        assert name not in text, name


def test_veils_methods_are_kernels():
    from veil.fit import _VILoss
    from veil.geometry.fbgvi import _FBGVIKernel
    from veil.loop.kernel import GradientKernel, Loss
    from veil.particles.ensemble import _EnsembleLoss
    from veil.particles.runner import _ParticleKernel

    assert issubclass(GradientKernel, Kernel) and issubclass(_FBGVIKernel, Kernel)
    assert issubclass(_ParticleKernel, Kernel)
    assert issubclass(_VILoss, Loss) and issubclass(_EnsembleLoss, Loss)


class CountDown(Kernel):
    """Halves x each step and finishes by itself once |x| < 1 (a deterministic method that knows
    when it is done); from x0 = 100 that is after 7 steps (100 / 2^7 < 1 <= 100 / 2^6)."""

    finishes = True
    finish_reason = "converged: x is below 1"

    def init(self, x):
        return ()

    def step(self, x, state, key, scale, batch):
        new = x / 2.0
        return new, state, StepInfo(jnp.sum(x), jnp.bool_(True), jnp.all(jnp.abs(new) < 1.0))


def test_a_kernel_that_finishes_ends_its_restart_there():
    out = driver.run(CountDown(), jnp.array([[100.0], [3.0]]), key=jax.random.key(0), max_steps=50,
                     stop_rule=None, progress=False)
    # restart 0 finishes after 7 steps, restart 1 (3 -> 1.5 -> 0.75) after 2; no step after that
    assert list(out.num_steps) == [7, 2] and out.stop_reasons == ["converged: x is below 1"] * 2
    np.testing.assert_array_equal(np.asarray(out.params[:, 0]), [100.0 / 2**7, 0.75])
    np.testing.assert_array_equal(out.traces[1], [3.0, 1.5])
    assert list(out.skipped) == [0, 0]
