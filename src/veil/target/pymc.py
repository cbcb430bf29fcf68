"""PyMC models as veil targets (``veil.Target.from_pymc``).

PyMC writes the joint log density of a model on its unconstrained *value variables* (its
transforms and their log-Jacobians included: ``model.logp()``) and the map from those values
back to the free random variables and the deterministics (``model.replace_rvs_by_values``).
PyTensor's JAX backend turns both graphs into JAX functions; veil rewrites none of it. What
veil adds:

* the data (observed values and ``pm.Data`` arrays) become *inputs* of the compiled graphs
  rather than constants baked into them, so a new data set of the same shapes reuses the
  compiled fit, as for NumPyro targets;
* importing PyTensor's JAX backend switches JAX to 64-bit floats whenever PyTensor's floatX is
  float64 (PyMC's default), for the whole process; veil restores the caller's setting, and
  runs the model in float32 like every other target (a model's float64 constants are rounded
  once, when the graph is compiled).

Works with PyMC 5.16 and later (tested with 5.28.5 and PyTensor 2.38).
"""

from __future__ import annotations

import warnings
import weakref
from typing import NamedTuple

import numpy as np
import jax


class PyMCParts(NamedTuple):
    """What :meth:`veil.Target.from_pymc` needs from a model."""

    log_density: object  # (value arrays..., data arrays...) -> [logp, logp without the Jacobian]
    constrain: object  # (value arrays..., data arrays...) -> [free RVs..., deterministics...]
    sites: list[tuple[str, tuple[int, ...]]]  # value variables: name, shape
    names: tuple[str, ...]  # free RVs, then deterministics
    data: tuple[np.ndarray, ...]
    coords: tuple
    dims: tuple


def _jax_backend():
    """PyTensor's JAX dispatch and rewrite mode, imported without changing JAX's x64 flag."""
    x64 = jax.config.jax_enable_x64
    try:
        from pytensor.compile.mode import JAX
        from pytensor.link.jax.dispatch import jax_funcify
    finally:
        jax.config.update("jax_enable_x64", x64)
    return jax_funcify, JAX


def _jaxify(inputs, outputs):
    from pytensor.graph.fg import FunctionGraph

    jax_funcify, mode = _jax_backend()
    fgraph = FunctionGraph(inputs=inputs, outputs=outputs, clone=True)
    mode.optimizer.rewrite(fgraph)
    with warnings.catch_warnings():
        # PyTensor drops its parameter checks (sigma > 0, ...) under JAX, which cannot raise on
        # values, and says so each time; out-of-support values give a non-finite log density
        # instead, which veil's loop counts and reports.
        warnings.filterwarnings("ignore", message="Skipping .* Op", category=UserWarning)
        return _Float32(jax_funcify(fgraph))


class _Float32:
    """A JAX-funcified PyTensor graph, called in JAX's default precision.

    PyMC builds float64 graphs, and PyTensor's JAX code casts to float64 explicitly in places
    (reductions' accumulators); with 64-bit JAX off, each cast is a float32 one and JAX warns
    at every trace. veil runs in float32 on purpose (the caller's x64 setting is kept), so
    those warnings are silenced here, and only here."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Explicitly requested dtype float64",
                                    category=UserWarning)
            return self.fn(*args)


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_parts(model) -> PyMCParts:
    """``model``'s log density and constraining map compiled to JAX, with its data as inputs.

    The compiled functions are kept per model while its structure (variables, data shapes and
    types) stays the same, so a model whose ``pm.Data`` were changed with ``pm.set_data`` gives
    a target with the same program and the new data: its fit is not compiled again."""
    g = _graphs(model)
    structure = (g["sites"], g["names"], tuple((d.shape, d.dtype.str) for d in g["data"]))
    kept = _COMPILED.get(model)
    if kept is not None and kept[0] == structure:
        return kept[1]._replace(data=g["data"])
    inputs = g["values"] + g["inputs"]
    parts = PyMCParts(_jaxify(inputs, [g["logp"], g["logp_joint"]]), _jaxify(inputs, g["constrained"]), g["sites"],
                      g["names"], g["data"], g["coords"], g["dims"])
    _COMPILED[model] = (structure, parts)
    return parts


def _graphs(model) -> dict:
    """The model's graphs with its data replaced by inputs, and what describes them."""
    import pytensor.tensor as pt
    from pytensor.compile.sharedvalue import SharedVariable
    from pytensor.graph.replace import graph_replace
    from pytensor.graph.traversal import ancestors

    discrete = [rv.name for rv in model.free_RVs if rv.type.dtype.startswith(("int", "uint", "bool"))]
    if discrete:
        raise NotImplementedError(
            f"The PyMC model has discrete free variable(s) {', '.join(map(repr, discrete))}; veil's "
            "families are continuous. Marginalise them out (pymc_extras' marginalize, or by hand)."
        )
    if not model.free_RVs:
        raise ValueError("The PyMC model has no free (unobserved) random variable: nothing to fit.")
    values = list(model.value_vars)
    logp = model.logp(jacobian=True)
    logp_joint = model.logp(jacobian=False)  # veil.MAP()'s; compiled away where unused
    constrained = model.replace_rvs_by_values(list(model.free_RVs) + list(model.deterministics))
    # Data become inputs: observed values, and pm.Data arrays (shared variables with at least one
    # axis; scalar shared variables, such as the lengths of coordinates, stay constants).
    graphs = [logp, logp_joint, *constrained]
    data_vars = [model.rvs_to_values[rv] for rv in model.observed_RVs]
    data_vars += [v for v in ancestors(graphs) if isinstance(v, SharedVariable) and v.ndim > 0
                  and v not in data_vars]
    data = tuple(np.asarray(v.get_value() if isinstance(v, SharedVariable) else v.data) for v in data_vars)
    inputs = [v.type() for v in data_vars]
    replace = dict(zip(data_vars, inputs))
    replace.update({v: pt.constant(v.get_value()) for v in ancestors(graphs)
                    if isinstance(v, SharedVariable) and v not in replace})
    logp, logp_joint, *constrained = graph_replace(graphs, replace, strict=False)
    point = model.initial_point()
    sites = [(v.name, tuple(int(d) for d in np.shape(point[v.name]))) for v in values]
    names = tuple(v.name for v in list(model.free_RVs) + list(model.deterministics))
    coords = tuple((k, tuple(v)) for k, v in (model.coords or {}).items() if v is not None)
    dims = tuple((k, tuple(v)) for k, v in model.named_vars_to_dims.items() if k in names)
    return {"values": values, "inputs": inputs, "logp": logp, "logp_joint": logp_joint, "constrained": constrained,
            "sites": sites, "names": names, "data": data, "coords": coords, "dims": dims}
