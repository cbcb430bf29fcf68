"""Argument checks shared by veil's entry points, in one module that imports nothing of veil.

Each check raises before any computation with a message that names the argument, what was
given and what to pass instead, and returns the value in its canonical type.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Int", "Real", "Default", "DEFAULT", "check_key", "check_positive_int", "check_dim", "check_positive"]

# What entry points annotate (the test suite checks every call against the annotations): the
# numbers veil's own checks accept. Values (positive, finite) are checked by the functions.
Int = int | np.integer
Real = int | float | np.integer | np.floating


class Default:
    """The type of :data:`DEFAULT`, the value of an argument left out for which veil picks
    (``stop=DEFAULT``: the method's stopping rule; ``stop=None`` is a value: no rule)."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = Default()


def check_key(key) -> None:
    """A single JAX PRNG key: a typed key (``jax.random.key``) or a raw ``uint32[2]`` one."""
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if typed and key.shape != ():
        raise TypeError(
            f"key must be a single JAX PRNG key, got an array of {key.size} keys (shape "
            f"{key.shape}), as jax.random.split returns: pass one of them, e.g. keys[0]."
        )
    raw = isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)
    if not (typed or raw):
        raise TypeError(
            f"key must be a single JAX PRNG key such as jax.random.key(0), got {key!r}."
        )


def check_positive_int(name: str, value) -> int:
    """``value`` as an ``int`` if it is a positive integer (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def check_dim(dim) -> int:
    """A dimension: a positive integer (``TypeError`` for a non-integer)."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"dim must be a positive integer, got {dim!r}.")
    if dim <= 0:
        raise ValueError(f"dim must be a positive integer, got {dim}.")
    return int(dim)


def check_positive(name: str, value, *, allow_none: bool = False) -> None:
    """A finite positive number (``None`` too where ``allow_none``)."""
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
        math.isfinite(value) and value > 0
    ):
        also = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive number{also}, got {value!r}.")
