"""Process-wide settings veil applies on import: JAX's persistent compilation cache.

A fit compiles its loop once per process; the persistent cache lets a new process reuse that
work. It is on by default in ``~/.cache/veil/jax`` (or ``$XDG_CACHE_HOME/veil/jax``).
Set ``VEIL_COMPILATION_CACHE=0`` to leave JAX's settings alone, or to a directory to use that
directory instead. A cache directory the user already configured in JAX is never overridden.
"""

from __future__ import annotations

import os

import jax


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "veil", "jax")


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache; returns the directory, or None if off."""
    setting = os.environ.get("VEIL_COMPILATION_CACHE", "1").strip()
    if setting.lower() in ("0", "false", "no", "off", ""):
        return None
    if jax.config.jax_compilation_cache_dir:  # the user chose one: respect it
        return jax.config.jax_compilation_cache_dir
    path = default_cache_dir() if setting.lower() in ("1", "true", "yes", "on") else setting
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None  # read-only home: run without a persistent cache rather than fail
    jax.config.update("jax_compilation_cache_dir", path)
    # veil's loops compile in well under JAX's default 1 s threshold; cache them anyway.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def cheap_branches() -> bool:
    """Whether data-dependent control flow (``lax.cond``, a ``while_loop`` with a computed
    predicate) is cheap inside a compiled loop on the default backend.

    On CPU it is: the branch is taken in place. On a GPU each one copies its predicate to
    the host and waits for it, a round trip per step: at n=1e7, d=100 on an H200, three of
    them took a 256-row minibatch step from 12 us to 50 us (docs/benchmarks/minibatch-vi-one-gpu.md). Where
    they are not cheap, veil's loop selects (``jnp.where``) and unrolls instead, computing
    the same values, and runs whole blocks of steps as loops of fixed length.
    """
    return jax.default_backend() == "cpu"
