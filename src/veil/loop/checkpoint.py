"""Checkpoint and resume for long fits.

``veil.fit(..., checkpoint="fit.ckpt")`` saves the whole state of the run at chunk boundaries
(at most every ``Checkpoint.every`` seconds, and at the end): the compiled loop's state
(parameters, optimizer state, keys, batch order, counters) and the host's (loss traces, the
stopping rule's stages, iterate-averaging history). Calling the same ``fit`` again with the
same path resumes from it, and the resumed run is bit-identical to one never interrupted: the
chunk schedule and every key come from the saved state, and the stopping rule sees the same
losses in the same chunks.

Format: one ``.npz`` file (NumPy's zip of ``.npy`` arrays, read with ``allow_pickle=False``)
holding every array, with a JSON header for the scalars and a fingerprint of the fit
(target, family, objective, stopping rule, restarts, key, array shapes). Why not orbax:
veil's state is a few arrays on one host, which NumPy writes and reads with no extra
dependency, and a plain ``.npz`` opens anywhere for inspection. The file is written to a
temporary name and moved into place, so an interruption mid-write leaves the previous
checkpoint intact.

A checkpoint from a different fit (other target, family, key, ...) or a damaged file raises a
``ValueError`` that says which, before any step is run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

__all__ = ["Checkpoint"]

FORMAT_VERSION = 2  # 2: fingerprints hash the traced programs, data and starting values


@dataclass
class Checkpoint:
    """Where and how often ``veil.fit`` saves its state.

    Args:
        path: the checkpoint file (``.npz`` is appended if missing). If it exists when the
            fit starts, the fit resumes from it.
        every: seconds between saves (at a chunk boundary); ``0`` saves after every chunk.
            The final state is always saved.

    Examples:
        >>> import jax, jax.numpy as jnp, veil, tempfile, os
        >>> t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)
        >>> path = os.path.join(tempfile.mkdtemp(), "fit")
        >>> a = veil.fit(t, veil.MeanField(2), key=jax.random.key(0), progress=False, checkpoint=path)
        >>> b = veil.fit(t, veil.MeanField(2), key=jax.random.key(0), progress=False, checkpoint=path)
        >>> bool((a.q.loc == b.q.loc).all()) and b.num_steps == a.num_steps
        True
    """

    path: str | os.PathLike
    every: float | int = 60.0
    _last: float = field(default=-np.inf, init=False, repr=False)

    def __post_init__(self):
        self.path = os.fspath(self.path)
        if not self.path.endswith(".npz"):
            self.path += ".npz"
        if not isinstance(self.every, (int, float)) or self.every < 0:
            raise ValueError(f"every must be a number of seconds >= 0, got {self.every!r}.")

    def due(self) -> bool:
        """Whether enough time has passed since the last save."""
        return time.monotonic() - self._last >= self.every

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def save(self, arrays: dict[str, np.ndarray], header: dict[str, Any]) -> None:
        """Write ``arrays`` and the JSON ``header`` atomically."""
        tmp = self.path + ".tmp.npz"
        payload = {"__header__": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
        np.savez(tmp, **payload, **arrays)
        os.replace(tmp, self.path)
        self._last = time.monotonic()

    def load(self, fingerprint: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The saved arrays and header, after checking the file and its fingerprint."""
        try:
            with open(self.path, "rb") as fh:
                f = np.load(fh, allow_pickle=False)
                if not isinstance(f, np.lib.npyio.NpzFile):
                    raise ValueError("not an .npz archive")
                with f:
                    arrays = {k: f[k] for k in f.files}
            header = json.loads(arrays.pop("__header__").tobytes().decode())
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as e:
            raise ValueError(
                f"The checkpoint {self.path} is damaged or not a veil checkpoint ({type(e).__name__}: "
                f"{e}). Delete it (or pass another path) to start the fit afresh."
            ) from e
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"The checkpoint {self.path} has format version {header.get('version')!r}, this veil "
                f"writes version {FORMAT_VERSION}. Delete it to start afresh."
            )
        saved = header.get("fingerprint", {})
        order = {k: i for i, k in enumerate(_PARTS)}
        diff = sorted((k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k)),
                      key=lambda k: (order.get(k, len(order)), k))
        if diff:
            what = "; ".join(_describe(k, saved.get(k), fingerprint.get(k)) for k in diff)
            raise ValueError(
                f"The checkpoint {self.path} was written by a different fit: {what}. Resume only "
                "the same fit (target and its data, family and its starting values, objective, "
                "optimizer, stopping rule, restarts and key); to start afresh, delete the file or "
                "pass another checkpoint path."
            )
        return arrays, header


# What each part of a fit's fingerprint covers, for the error that names a difference.
_PARTS = {
    "target": "the target (its log density's program or its data)",
    "family": "the family (its structure or starting values)",
    "objective": "the objective",
    "optimizer": "the optimizer (its kind or settings, such as the step size)",
    "stop": "the stopping rule",
    "restarts": "num_restarts",
    "key": "the key",
    "state": "the loop state's shapes",
}


def _describe(part: str, saved, now) -> str:
    name = _PARTS.get(part, part)
    if isinstance(saved, str) and isinstance(now, str) and len(saved) + len(now) < 160:
        return f"{name} differs (saved {saved!r}, now {now!r})"
    return f"{name} differs"


# ---------------------------------------------------------------------------- pytree <-> arrays
def tree_to_arrays(prefix: str, tree) -> tuple[dict[str, np.ndarray], list[int]]:
    """Leaves of ``tree`` as ``{prefix/i: array}``; PRNG key leaves as their raw data, their
    indices returned so :func:`arrays_to_tree` can wrap them back."""
    out, keys = {}, []
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            keys.append(i)
            leaf = jax.random.key_data(leaf)
        out[f"{prefix}/{i}"] = np.asarray(leaf)
    return out, keys


def arrays_to_tree(prefix: str, arrays: dict[str, np.ndarray], template, key_leaves=()):
    """Rebuild a pytree shaped like ``template`` from :func:`tree_to_arrays` output, with
    each leaf's saved dtype and shape checked against the template's."""
    leaves, treedef = jax.tree.flatten(template)
    new = []
    for i, leaf in enumerate(leaves):
        a = arrays[f"{prefix}/{i}"]
        if i in key_leaves:
            new.append(jax.random.wrap_key_data(a, impl=jax.random.key_impl(leaf)))
            continue
        if a.shape != leaf.shape or a.dtype != leaf.dtype:
            raise ValueError(f"checkpoint array {prefix}/{i} has {a.dtype}{a.shape}, the fit expects {leaf.dtype}{leaf.shape}")
        new.append(jax.numpy.asarray(a))
    return jax.tree.unflatten(treedef, new)


def digest(fn, *args) -> str:
    """A short hash of what ``fn(*args)`` computes: its traced program (``jax.make_jaxpr``;
    a closed-over Python number is a literal of it), the arrays it closes over and the array
    leaves of ``args`` (data, initial values). Two functions with the same name but other
    code, other captured constants or other data differ; the same computation in a new
    process matches (function addresses are removed from the program's text).

    Memory-mapped arrays (rows on disk) are hashed by file, offset, shape, size and
    modification time, not read whole."""
    closed = jax.make_jaxpr(fn)(*args)
    h = hashlib.sha256(re.sub(r" at 0x[0-9a-fA-F]+", "", str(closed.jaxpr)).encode())
    for leaf in [*closed.consts, *jax.tree.leaves(args)]:
        _hash_array(h, leaf)
    return h.hexdigest()[:16]


def _hash_array(h, leaf) -> None:
    if isinstance(leaf, np.memmap):
        path = getattr(leaf, "filename", None)
        stat = os.stat(path) if path else None
        h.update(repr((path, leaf.offset, leaf.shape, str(leaf.dtype),
                       stat and (stat.st_size, stat.st_mtime_ns))).encode())
        return
    if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        h.update(repr(leaf).encode())
        return
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # rows of several hosts
        h.update(repr((leaf.shape, str(leaf.dtype))).encode())
        for shard in leaf.addressable_shards:
            h.update(np.ascontiguousarray(np.asarray(shard.data)).tobytes())
        return
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(repr((a.shape, str(a.dtype))).encode())
    h.update(a.tobytes())


def shapes(tree) -> str:
    """A short description of a pytree's structure, shapes and dtypes (for fingerprints)."""
    return str(jax.tree.map(lambda x: f"{x.dtype}{tuple(x.shape)}", tree))
