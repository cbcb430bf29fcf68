"""Many hosts (issue 5): two processes on localhost, joined by ``jax.distributed``, each
holding only its half of the rows, fit one model with ``veil.fit(..., mesh=...)``.

Each process builds the global arrays from its local rows with JAX's own
``jax.make_array_from_process_local_data`` (nothing home-made) and CPU collectives go through
gloo. The fit must equal the single-process fit of all the rows with the same key, up to the
order of floating-point sums.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

import veil

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, port = int(sys.argv[1]), sys.argv[2]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
    import jax.numpy as jnp, numpy as np, veil
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[3])
    from test_multihost import data, log_lik, log_prior
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    X, y = data()
    mine = slice(pid * 2000, (pid + 1) * 2000)  # this host holds only its own rows
    Xg = jax.make_array_from_process_local_data(rows, X[mine])
    yg = jax.make_array_from_process_local_data(rows, y[mine])
    t = veil.Target.minibatched(log_prior, log_lik, (Xg, yg), dim=3, batch_size=200)
    res = veil.fit(t, veil.MeanField(3), key=jax.random.key(0), progress=False, max_steps=300,
                   stop=None, mesh=mesh)
    print(json.dumps({"pid": pid, "devices": jax.device_count(), "loc": np.asarray(res.q.loc).tolist(),
                      "log_scale": np.asarray(res.q.log_scale).tolist()}))
    """
)


def data():
    r = np.random.default_rng(0)
    X = r.standard_normal((4000, 3)).astype(np.float32)
    y = (r.random(4000) < 1 / (1 + np.exp(-X @ np.array([1.0, -1.0, 0.5])))).astype(np.float32)
    return X, y


def log_prior(z):
    return -0.5 * jnp.sum(z**2)


def log_lik(z, b):
    xb, yb = b
    f = xb @ z
    return jnp.sum(yb * f - jnp.logaddexp(0.0, f))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_hosts_fit_equals_one_host_fit():
    port = str(_free_port())
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    here = os.path.dirname(__file__)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), port, here], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=240)
        finally:
            p.kill()
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    X, y = data()
    one = veil.fit(veil.Target.minibatched(log_prior, log_lik, (X, y), dim=3, batch_size=200), veil.MeanField(3),
                   key=jax.random.key(0), progress=False, max_steps=300, stop=None)
    for out in outs:
        assert out["devices"] == 2
        # Same batches, two partial sums instead of one: float32 rounding only (~1e-7 per step).
        np.testing.assert_allclose(out["loc"], np.asarray(one.q.loc), atol=1e-5)
        np.testing.assert_allclose(out["log_scale"], np.asarray(one.q.log_scale), atol=1e-5)
