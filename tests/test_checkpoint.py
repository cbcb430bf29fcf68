"""Checkpoint and resume (issue 5): a resumed fit is bit-identical to an uninterrupted one."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import veil
from unchecked import unchecked
from veil.loop.checkpoint import Checkpoint

COV = jnp.array([[1.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 0.5]])
PREC = jnp.linalg.inv(COV)


def _log_p(z):
    return -0.5 * (z - 1.0) @ PREC @ (z - 1.0)


TARGET = veil.Target.from_logdensity(_log_p, dim=3)
ROWS = np.random.default_rng(0).normal(1.0, 1.0, 1000).astype(np.float32)
MB_TARGET = veil.Target.minibatched(lambda z: -0.5 * jnp.sum(z**2), lambda z, x: jnp.sum(-0.5 * (x - z[0]) ** 2),
                                    ROWS, dim=1, batch_size=50)


@dataclasses.dataclass
class _CrashAfter(Checkpoint):
    """Saves like a Checkpoint, then dies (as a killed process would) after its n-th save."""

    n: int = 2

    def save(self, arrays, header):
        super().save(arrays, header)
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt("simulated crash")


CASES = {
    "fullrank, stop rule": (TARGET, veil.FullRank(3), {}),
    "minibatch, restarts, stop rule": (MB_TARGET, veil.MeanField(1), {"num_restarts": 2}),
    "fixed steps": (TARGET, veil.MeanField(3), {"stop": None, "max_steps": 5000}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_fit_is_bit_identical(tmp_path, case):
    target, q, kw = CASES[case]
    kw = {"key": jax.random.key(3), "progress": False, **kw}
    plain = veil.fit(target, q, **kw)
    path = str(tmp_path / "fit")
    with pytest.raises(KeyboardInterrupt):
        veil.fit(target, q, checkpoint=_CrashAfter(path, every=0, n=2), **kw)
    resumed = veil.fit(target, q, checkpoint=Checkpoint(path, every=0), **kw)
    assert resumed.num_steps == plain.num_steps and resumed.stop_reason == plain.stop_reason
    np.testing.assert_array_equal(resumed.trace, plain.trace)
    for a, b in zip(jax.tree.leaves(resumed.q), jax.tree.leaves(plain.q)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(resumed.restart_losses, plain.restart_losses)
    # A finished checkpoint resumes to the same result without running a step.
    again = veil.fit(target, q, checkpoint=path, **kw)
    np.testing.assert_array_equal(again.trace, plain.trace)


def test_mismatched_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "fit")
    kw = {"progress": False, "max_steps": 300, "stop": None, "checkpoint": path}
    veil.fit(TARGET, veil.MeanField(3), key=jax.random.key(0), **kw)
    with pytest.raises(ValueError, match=r"written by a different fit: the key differs"):
        veil.fit(TARGET, veil.MeanField(3), key=jax.random.key(1), **kw)
    with pytest.raises(ValueError, match=r"different fit: the family .*differs \(saved 'MeanField dim=3 #"):
        veil.fit(TARGET, veil.FullRank(3), key=jax.random.key(0), **kw)
    other = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=3)
    with pytest.raises(ValueError, match="different fit.*target"):
        veil.fit(other, veil.MeanField(3), key=jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="delete the file or pass another checkpoint path"):
        veil.fit(other, veil.MeanField(3), key=jax.random.key(0), **kw)


def _centred(c):
    def log_p(z):  # the same function name for every centre: only the code's constants differ
        return -0.5 * jnp.sum((z - c) ** 2)

    return log_p


def _mean_from(path, target, q, **kw):
    res = veil.fit(target, q, key=jax.random.key(0), progress=False, max_steps=300, stop=None,
                   checkpoint=path, **kw)
    return np.asarray(res.q.mean)


def test_checkpoint_tells_apart_what_names_do_not(tmp_path):
    # Issue 28, item 1: each of these resumed the old fit and returned its answer, because the
    # fingerprint held names, dimensions and the objective's text only.
    cases = {
        # the same inner function name, another centre captured as a Python number
        "target": (lambda: (veil.Target.from_logdensity(_centred(1.0), dim=2), veil.MeanField(2), {}),
                   lambda: (veil.Target.from_logdensity(_centred(-5.0), dim=2), veil.MeanField(2), {})),
        # two lambdas with the same text apart from a closed-over array
        "target ": (lambda: (veil.Target.from_logdensity(lambda z, c=jnp.array(3.0): -0.5 * jnp.sum((z - c) ** 2), dim=2),
                             veil.MeanField(2), {}),
                    lambda: (veil.Target.from_logdensity(lambda z, c=jnp.array(-9.0): -0.5 * jnp.sum((z - c) ** 2), dim=2),
                             veil.MeanField(2), {})),
        "family": (lambda: (TARGET, veil.MeanField(3), {}),
                   lambda: (TARGET, veil.MeanField(3, init_loc=jnp.ones(3)), {})),
        "optimizer": (lambda: (TARGET, veil.MeanField(3), {"optimizer": ADAM_SLOW}),
                      lambda: (TARGET, veil.MeanField(3), {"optimizer": ADAM_FAST})),
    }
    for i, (part, (first, second)) in enumerate(cases.items()):
        path = str(tmp_path / f"fit{i}")
        t1, q1, kw1 = first()
        _mean_from(path, t1, q1, **kw1)
        t2, q2, kw2 = second()
        with pytest.raises(ValueError, match=f"different fit: the {part.strip()}"):
            _mean_from(path, t2, q2, **kw2)
        # and the same fit, built again from scratch, resumes
        t1, q1, kw1 = first()
        _mean_from(path, t1, q1, **kw1)


ADAM_SLOW, ADAM_FAST = optax.adam(0.001), optax.adam(0.1)


def test_checkpoint_tells_apart_a_numpyro_models_data(tmp_path):
    import numpyro
    import numpyro.distributions as dist

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    path = str(tmp_path / "fit")
    twos = veil.Target.from_numpyro(model, jnp.full(20, 2.0))
    assert abs(_mean_from(path, twos, veil.MeanField(1))[0] - 2.0) < 0.3
    with pytest.raises(ValueError, match="different fit: the target"):
        _mean_from(path, veil.Target.from_numpyro(model, jnp.full(20, -4.0)), veil.MeanField(1))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_checkpoint_is_refused(tmp_path, damage):
    path = str(tmp_path / "fit")
    kw = {"key": jax.random.key(0), "progress": False, "max_steps": 300, "stop": None, "checkpoint": path}
    veil.fit(TARGET, veil.MeanField(3), **kw)
    with open(path + ".npz", "rb") as f:
        raw = f.read()
    with open(path + ".npz", "wb") as f:
        f.write(b"not a checkpoint" if damage == "garbage" else raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="damaged or not a veil checkpoint.*Delete it"):
        veil.fit(TARGET, veil.MeanField(3), **kw)


def test_bad_checkpoint_arguments():
    with pytest.raises(TypeError, match="checkpoint must be a path"):  # veil's message, as a user sees it
        unchecked(veil.fit)(TARGET, veil.MeanField(3), key=jax.random.key(0), progress=False, checkpoint=3)
    with pytest.raises(ValueError, match="every must be"):
        Checkpoint("x", every=-1)
