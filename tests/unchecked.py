"""The suite runs veil under a run-time type checker (jaxtyping + beartype, pyproject's
``addopts``), which rejects an argument of the wrong type before veil's own check can say what
to pass instead. Users run without it and see veil's message: :func:`unchecked` gives the
function as they call it, so a test can check that message too."""

import functools
import inspect


def unchecked(fn):
    """``fn`` without the suite's type-checking wrapper (a bound classmethod keeps its class)."""
    raw = inspect.unwrap(fn)
    if inspect.ismethod(fn):
        return functools.partial(raw, fn.__self__)
    return raw
