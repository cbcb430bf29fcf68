"""Stan programs as veil targets (``veil.Target.from_stan``).

A Stan program is translated to C++ by ``stanc`` and compiled by the machine's C++ compiler
against the Stan, Stan Math, Eigen, Boost, SUNDIALS and TBB that the PyPI ``httpstan`` wheel
ships (CmdStan and BridgeStan need downloads; ``pip install httpstan`` does not). What veil
compiles with it is a small Python extension (``_stan_bridge.cpp``) that keeps one model
instance alive, its data read once, and evaluates on a *batch* of unconstrained points:

* ``log_density_grad(z)``: Stan's ``log_prob`` with normalising constants and the
  log-Jacobian of the constraining transforms, and its reverse-mode gradient;
* ``log_density(z)``: the same value without the gradient (the diagnostics need only values);
* ``constrain(z)``: parameters and transformed parameters (``write_array``).

In JAX the log density is a ``pure_callback`` with a custom VJP whose gradient is Stan's. Under
``vmap`` one callback receives every point of a step, so a step costs one round trip to C++,
not one per draw. Higher derivatives (Hessians) are not available: Stan's gradient is opaque
to JAX.

Builds are cached on disk under ``$VEIL_CACHE`` (default ``~/.cache/veil``) by a hash of the
program, the bridge source, the compiler flags and the httpstan version: a program is compiled
once per machine (about 20-60 s), then loads in milliseconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import numpy as np
import jax

_BRIDGE = Path(__file__).with_name("_stan_bridge.cpp")
_DEFINES = ["BOOST_DISABLE_ASSERTS", "BOOST_PHOENIX_NO_VARIADIC_EXPRESSION", "STAN_THREADS", "_REENTRANT",
            # httpstan's bundled TBB and SUNDIALS are built with the pre-C++11 string ABI
            "_GLIBCXX_USE_CXX11_ABI=0"]
_FLAGS = ["-O2", "-std=c++17", "-fPIC", "-shared", "-Wno-sign-compare", "-Wno-ignored-attributes",
          "-Wno-deprecated-declarations"]
_LOADED: dict[str, object] = {}


def _httpstan_dir() -> Path:
    try:
        import httpstan
    except ImportError as e:
        raise ImportError(
            "Target.from_stan needs the Stan compiler and headers that PyPI's httpstan ships: "
            "pip install 'veil[stan]' (and a C++ compiler, g++ or clang++, on the PATH)."
        ) from e
    return Path(httpstan.__file__).parent


def cache_dir() -> Path:
    return Path(os.environ.get("VEIL_CACHE", Path.home() / ".cache" / "veil")) / "stan"


def build_key(program: str) -> str:
    """The cache key of a program's build: everything that changes the compiled module."""
    import httpstan

    h = hashlib.sha256()
    for part in (program, _BRIDGE.read_text(), " ".join(_DEFINES + _FLAGS), httpstan.__version__,
                 sys.version, sysconfig.get_config_var("EXT_SUFFIX") or ""):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _run_stanc(program: str, *args: str) -> tuple[str, str]:
    """stanc's output and warnings for ``program``; ``ValueError`` with stanc's message if it fails. The
    program is named ``program.stan`` in messages (and in the model's error locations)."""
    binary = _httpstan_dir() / "stanc"
    with tempfile.TemporaryDirectory(prefix="veil_stanc_") as tmp:
        (Path(tmp) / "program.stan").write_text(program)
        done = subprocess.run([str(binary), *args, "program.stan"], capture_output=True, timeout=120, cwd=tmp)
    if done.returncode != 0:
        raise ValueError(f"The Stan program does not compile. stanc says:\n{done.stderr.decode().strip()}")
    return done.stdout.decode(), done.stderr.decode().strip()


def stanc(program: str, name: str) -> tuple[str, str]:
    """C++ for ``program`` and stanc's warnings."""
    return _run_stanc(program, "--name", name, "--print-cpp")


def stanc_info(program: str) -> dict:
    """stanc's description of the program: its data (``inputs``), parameters, ..."""
    return json.loads(_run_stanc(program, "--info")[0])


def _compiler() -> str:
    for cxx in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if cxx and subprocess.run(["which", cxx], capture_output=True).returncode == 0:
            return cxx
    raise RuntimeError("Target.from_stan needs a C++ compiler (g++ or clang++) on the PATH, or $CXX set.")


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (two processes building the same program wait for one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(program: str):
    """The compiled extension module for ``program``, from the cache or built now."""
    key = build_key(program)
    if key in _LOADED:
        return _LOADED[key]
    module_name = f"_veil_stan_{key}"
    where = cache_dir() / key
    library = where / f"{module_name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    with _locked(where / "lock"):
        if not library.exists():
            _compile(program, where, module_name, library)
    spec = importlib.util.spec_from_file_location(module_name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _LOADED[key] = module
    return module


def _compile(program: str, where: Path, module_name: str, library: Path) -> None:
    cpp, warning = stanc(program, "veil_model")
    if warning:
        warnings.warn(f"stanc: {warning}", stacklevel=4)
    (where / "model.cpp").write_text(cpp)
    (where / "model.stan").write_text(program)
    hs = _httpstan_dir()
    partial = where / f"{module_name}.partial.so"
    cmd = [_compiler(), *_FLAGS, *(f"-D{d}" for d in _DEFINES),
           f'-DMODEL_CPP="{where / "model.cpp"}"', f"-DVEIL_MODULE={module_name}",
           f"-I{hs / 'include'}", f"-I{sysconfig.get_paths()['include']}",
           str(_BRIDGE), "-o", str(partial),
           f"-L{hs / 'lib'}", "-lsundials_cvodes", "-lsundials_idas", "-lsundials_nvecserial", "-ltbb",
           f"-Wl,-rpath,{hs / 'lib'}"]
    done = subprocess.run(cmd, capture_output=True)
    if done.returncode != 0:
        tail = done.stderr.decode()[-4000:]
        raise RuntimeError(f"Compiling the Stan model's C++ failed (the program passed stanc):\n{tail}")
    os.replace(partial, library)  # appears whole or not at all for a concurrent reader


# ----------------------------------------------------------------------------- inputs
def read_program(program) -> str:
    """Stan code from a string of code or a path to a ``.stan`` file."""
    if isinstance(program, Path) or (isinstance(program, str) and "\n" not in program
                                      and program.strip().endswith(".stan")):
        path = Path(program)
        if not path.is_file():
            raise FileNotFoundError(f"No Stan program at {str(path)!r}.")
        return path.read_text()
    if not isinstance(program, str):
        raise TypeError(f"program must be Stan code (a string) or a path to a .stan file, got "
                        f"{type(program).__name__}.")
    if not program.strip():
        raise ValueError("The Stan program is empty.")
    return program


def data_json(data) -> str:
    """Stan's JSON data format from a dict of arrays and numbers, a JSON string or a path."""
    if data is None:
        return "{}"
    if isinstance(data, Path) or (isinstance(data, str) and data.strip().endswith(".json")
                                  and not data.lstrip().startswith("{")):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"No Stan data file at {str(path)!r}.")
        data = path.read_text()
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"The Stan data are not valid JSON: {e}.") from e
    if not isinstance(data, dict):
        raise TypeError(f"data must be a dict of name -> array or number (or JSON), got {type(data).__name__}.")
    out = {}
    for name, value in data.items():
        a = np.asarray(value)
        if a.dtype.kind == "b":
            a = a.astype(int)
        if a.dtype.kind not in "iuf":
            raise TypeError(f"Stan data {name!r} must be numbers, got dtype {a.dtype}.")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise ValueError(f"Stan data {name!r} holds NaN or inf; Stan data must be finite.")
        out[name] = a.tolist()
    return json.dumps(out)


class StanModel:
    """One model instance (program + data) and what a :class:`veil.Target` needs of it."""

    def __init__(self, program, data=None, seed: int = 0):
        self.program = read_program(program)
        self.data = data_json(data)
        self.info = stanc_info(self.program)  # stanc only: the program is checked before a build
        missing = [n for n in self.info["inputs"] if n not in json.loads(self.data)]
        if missing:
            declared = ", ".join(f"{n} ({self.info['inputs'][n]['type']}, {self.info['inputs'][n]['dimensions']} "
                                 "dimensions)" for n in missing)
            raise ValueError(f"The Stan data miss variable(s) that the program's data block declares: "
                             f"{declared}. Pass them in data.")
        if not self.info["parameters"]:
            raise ValueError("The Stan program has no parameters: nothing to fit.")
        module = build(self.program)
        try:
            self.model = module.Model(self.data, int(seed))
        except Exception as e:  # Stan's own message names the variable and what is wrong
            raise ValueError(f"The data do not fit the Stan program: {e}") from e
        self.dim = int(self.model.dim())
        # What the log density depends on beyond its (opaque) callback: for checkpoints
        self.fingerprint = hashlib.sha256(f"{build_key(self.program)}|{self.data}".encode()).hexdigest()[:16]
        names, dims = self.model.variables()
        self.variables = [(n, tuple(int(d) for d in s)) for n, s in zip(names, dims)]
        self.sites = _group(self.model.unconstrained_names())
        self.num_constrained = sum(int(np.prod(s)) for _, s in self.variables)

    # host-side functions, batched over leading axes; they count the points they evaluate
    num_grad_evals = 0
    num_evals = 0

    def host_log_density_grad(self, z):
        z = np.asarray(z)
        self.num_grad_evals += int(np.prod(z.shape[:-1]))
        lp, g = self.model.log_density_grad(np.asarray(z, np.float64).reshape(-1, self.dim))
        with np.errstate(over="ignore"):  # beyond float32's range is -inf (or inf) there too
            return lp.reshape(z.shape[:-1]).astype(z.dtype), g.reshape(z.shape).astype(z.dtype)

    def host_log_density(self, z):
        z = np.asarray(z)
        self.num_evals += int(np.prod(z.shape[:-1]))
        lp = self.model.log_density(np.asarray(z, np.float64).reshape(-1, self.dim))
        with np.errstate(over="ignore"):
            return lp.reshape(z.shape[:-1]).astype(z.dtype)

    def host_constrain(self, z):
        z = np.asarray(z)
        c = self.model.constrain(np.asarray(z, np.float64).reshape(-1, self.dim))
        with np.errstate(over="ignore"):
            return c.reshape(z.shape[:-1] + (self.num_constrained,)).astype(z.dtype)


def _group(flat_names) -> list[tuple[str, int]]:
    """Unconstrained coordinates grouped by variable: ``[(name, count), ...]`` in order."""
    groups: list[tuple[str, int]] = []
    for n in flat_names:
        base = n.split(".")[0]
        if groups and groups[-1][0] == base:
            groups[-1] = (base, groups[-1][1] + 1)
        else:
            groups.append((base, 1))
    return groups


# ----------------------------------------------------------------------------- JAX side
def _callback(fn, shapes, *args):
    try:
        return jax.pure_callback(fn, shapes, *args, vmap_method="expand_dims")
    except TypeError:  # jax < 0.4.34 spells it vectorized=True
        return jax.pure_callback(fn, shapes, *args, vectorized=True)


def jax_functions(sm: StanModel):
    """``log_density(z)`` (differentiable once, by Stan) and ``constrain(z) -> flat values``."""
    def value_and_grad(z):
        shapes = (jax.ShapeDtypeStruct((), z.dtype), jax.ShapeDtypeStruct(z.shape, z.dtype))
        return _callback(sm.host_log_density_grad, shapes, z)

    @jax.custom_vjp
    def log_density(z):
        return _callback(sm.host_log_density, jax.ShapeDtypeStruct((), z.dtype), z)

    def forward(z):
        return value_and_grad(z)

    def backward(grad, cotangent):
        return (cotangent * grad,)

    log_density.defvjp(forward, backward)

    def constrain(z):
        flat = _callback(sm.host_constrain, jax.ShapeDtypeStruct((sm.num_constrained,), z.dtype), z)
        out, offset = {}, 0
        for name, shape in sm.variables:
            size = int(np.prod(shape))
            # Stan writes every container column-major (first index fastest)
            out[name] = flat[offset:offset + size].reshape(shape[::-1]).T
            offset += size
        return out

    return log_density, constrain
