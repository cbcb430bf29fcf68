"""BLAS threads during a fit's loop (veil/_blas.py): limited while it runs, restored after."""

import jax
import jax.numpy as jnp
import pytest

import veil
from veil import _blas

threadpoolctl = pytest.importorskip("threadpoolctl")


def _blas_threads():
    return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}


def test_loop_limits_blas_threads_and_restores_them(monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("the limit applies on the CPU backend only")
    before = _blas_threads()
    if not before:
        pytest.skip("no BLAS library loaded")
    seen = []

    def log_density(z):
        # A host callback inside the compiled loop records the threads BLAS has right then.
        jax.debug.callback(lambda: seen.append(_blas_threads()))
        return -0.5 * jnp.sum(z**2)

    monkeypatch.setenv("VEIL_BLAS_THREADS", "1")
    target = veil.Target.from_logdensity(log_density, dim=2)
    veil.fit(target, veil.MeanField(2), key=jax.random.key(0), max_steps=3, stop=None, progress=False)
    # The last calls are the loop's (fit's start checks evaluate the density before it).
    assert seen and set(seen[-1].values()) == {1}
    assert _blas_threads() == before


def test_zero_leaves_blas_alone_and_bad_settings_are_named(monkeypatch):
    monkeypatch.setenv("VEIL_BLAS_THREADS", "0")
    with _blas.loop_threads():
        pass
    for bad in ("two", "-1"):
        monkeypatch.setenv("VEIL_BLAS_THREADS", bad)
        with pytest.raises(ValueError, match="VEIL_BLAS_THREADS"):
            _blas.loop_threads()
