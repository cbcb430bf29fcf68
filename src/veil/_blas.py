"""One BLAS thread while veil's compiled loops run on the CPU.

XLA:CPU hands triangular solves and Cholesky factorisations to LAPACK, which in a pip install
is the OpenBLAS that SciPy ships. OpenBLAS then wakes its own thread pool for every call. A
variational step solves against a ``dim x dim`` factor with a handful of right-hand sides (one
per draw), far too little work to share, while XLA is already running the rest of the step on
its own threads: the hand-off costs more than the solve. On a 2-core machine a ``FullRank``
sticking-the-landing step at dim = 501 took 1.8 ms with OpenBLAS's default threads and 0.97 ms
with one (``benchmarks/studies/fullrank_solve.py``; docs/benchmarks/fullrank-solves-time-to-accuracy.md).

:func:`loop_threads` limits BLAS to ``VEIL_BLAS_THREADS`` threads (default 1) for the duration
of a fit's loop and restores the previous setting afterwards, through ``threadpoolctl`` (the
library scikit-learn uses for the same purpose). ``VEIL_BLAS_THREADS=0`` leaves BLAS alone.
Nothing changes on accelerators, or where ``threadpoolctl`` is not installed (veil's
dependencies include it; a ``--no-deps`` install may lack it).
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax
import threadpoolctl


def _threads() -> int:
    setting = os.environ.get("VEIL_BLAS_THREADS", "1").strip()
    try:
        n = int(setting)
    except ValueError:
        raise ValueError(
            f"VEIL_BLAS_THREADS must be a whole number of threads (0 leaves BLAS alone), got {setting!r}."
        ) from None
    if n < 0:
        raise ValueError(f"VEIL_BLAS_THREADS must be >= 0 (0 leaves BLAS alone), got {n}.")
    return n


@functools.cache
def _controller():
    # Built once (it scans the loaded libraries: ~1 ms), at the first fit, when JAX and SciPy's
    # LAPACK are loaded; entering its limit afterwards costs ~25 us.
    return threadpoolctl.ThreadpoolController()


def loop_threads():
    """A context manager: BLAS at ``VEIL_BLAS_THREADS`` threads while a CPU loop runs.

    Examples:
        >>> from veil._blas import loop_threads
        >>> with loop_threads():
        ...     pass
    """
    n = _threads()
    if n == 0 or jax.default_backend() != "cpu":
        return contextlib.nullcontext()
    controller = _controller()
    if controller is None:
        return contextlib.nullcontext()
    return controller.limit(limits=n, user_api="blas")
