"""Rows on disk (issue 5, part 4): memory-mapped data, read ahead a chunk at a time.

The claim under test is exact: an on-disk fit serves the same batches in the same order as
the in-memory fit with the same key, so the two fits agree bit for bit (a plain run) or to
float rounding (a run with the stopping rule, whose chunks run as pieces whose iterate
averages are joined on the host). Nothing here is statistical, so the tolerances are float
rounding, not Monte Carlo error.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import veil
from veil.loop.batching import DiskBatches, Feeder, OnDisk, ROUNDS, ShuffledIndices, epoch_keys, permute, permute_host
from veil.loop.checkpoint import Checkpoint
from veil.target import log_density_rows

from test_checkpoint import _CrashAfter  # a Checkpoint that dies after its n-th save

N, D, B = 3000, 3, 50
W = np.array([1.0, -2.0, 0.5], np.float32)


def _prior(z):
    return -0.5 * jnp.sum(z**2)


def _lik(z, batch):
    x, y = batch
    logits = x @ z
    return jnp.sum(y * logits - jnp.logaddexp(0.0, logits))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = (rng.uniform(size=N) < 1 / (1 + np.exp(-x @ W))).astype(np.float32)
    root = tmp_path_factory.mktemp("rows")
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", y)
    return root, x, y


def _open(root):
    return np.load(root / "x.npy", mmap_mode="r"), np.load(root / "y.npy", mmap_mode="r")


# A feed of 30 steps (50 rows of 16 bytes each): N = 3000 rows are 2 feeds' worth, and a
# 500-step chunk of the stopping rule runs as 17 pieces.
SMALL_FEED = 30 * B * 16


def test_host_permutation_is_the_device_permutation():
    """The host's NumPy Feistel network and the compiled one agree bit for bit (sizes with
    and without cycle-walking: 1000 = 32 x 32 - 24, 1000003 prime)."""
    for n in (7, 1000, 1_000_003):
        pos = np.arange(min(n, 4096))
        keys = jax.random.bits(jax.random.key(n), (3, ROUNDS), jnp.uint32)
        dev = jax.vmap(lambda k: permute(jnp.asarray(pos), k, n))(keys)
        for k, d in zip(np.asarray(keys), np.asarray(dev)):
            np.testing.assert_array_equal(permute_host(pos, k, n), d)


def test_feeder_serves_the_in_memory_order():
    """Steps 0..129 of two restarts over N = 1030, B = 100 (10 batches per epoch, so the
    steps cross 13 epochs): the feeder's rows are those ShuffledIndices gives in the loop."""
    n, b, steps = 1030, 100, 130
    order = ShuffledIndices(n, b)
    keys = jax.random.split(jax.random.key(5), 2)
    want = []
    for key in keys:
        _, idx = jax.lax.scan(lambda s, _: order.next(s)[::-1], order.init(key), None, length=steps)
        want.append(np.asarray(idx))
    store = OnDisk(np.arange(n, dtype=np.float32))
    feeder = Feeder(DiskBatches(store, b), keys, capacity=64)
    got = np.concatenate([feeder.indices(0, 64), feeder.indices(64, 66)], axis=1)
    np.testing.assert_array_equal(got, np.stack(want))
    # The rows themselves, zero-padded to the feed's capacity past the piece's steps.
    feed = np.asarray(feeder.load(64, 40))
    np.testing.assert_array_equal(feed[:, :40], np.stack(want)[:, 64:104].astype(np.float32))
    assert feed.shape == (2, 64, b) and not feed[:, 40:].any()
    feeder.close()
    # The round keys of an epoch depend on the key and the epoch alone.
    np.testing.assert_array_equal(epoch_keys(keys[0], 3), epoch_keys(keys[0], 3))


def test_full_data_density_streams_the_rows(files):
    """log_density, its gradient, log_likelihood and log_density_rows of the on-disk target
    equal the in-memory ones (blocks summed in another order: float32 rounding, rtol 1e-5)."""
    root, x, y = files
    mem = veil.Target.minibatched(_prior, _lik, (x, y), dim=D, batch_size=B)
    disk = veil.Target.minibatched(_prior, _lik, OnDisk(_open(root), chunk_bytes=SMALL_FEED), dim=D, batch_size=B)
    assert disk.store is not None and disk.data is None and disk.num_data == N
    z = jnp.array([0.3, -0.1, 0.2])
    np.testing.assert_allclose(disk.log_density(z), mem.log_density(z), rtol=1e-5)
    np.testing.assert_allclose(disk.log_likelihood(z), mem.log_likelihood(z), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(disk.log_density)(z), jax.grad(mem.log_density)(z), rtol=1e-5)
    zs = jnp.asarray(np.random.default_rng(1).normal(size=(9, D)), jnp.float32)
    np.testing.assert_allclose(jax.jit(log_density_rows)(disk, zs), log_density_rows(mem, zs), rtol=1e-5)


def test_fit_on_disk_equals_fit_in_memory(files):
    """A file of 3000 rows read in feeds of 30 steps (1500 rows): the plain fit (700 steps,
    24 feeds, 12 epochs, two restarts with their own orders) is bit-identical to the
    in-memory fit with the same key."""
    root, x, y = files
    mem = veil.Target.minibatched(_prior, _lik, (x, y), dim=D, batch_size=B)
    disk = veil.Target.minibatched(_prior, _lik, OnDisk(_open(root), chunk_bytes=SMALL_FEED), dim=D, batch_size=B)
    assert disk.batches.steps_per_chunk(1) == 30 < N // B
    kw = {"key": jax.random.key(1), "progress": False}
    a = veil.fit(mem, veil.MeanField(D), max_steps=700, stop=None, num_restarts=2, **kw)
    b = veil.fit(disk, veil.MeanField(D), max_steps=700, stop=None, num_restarts=2, **kw)
    np.testing.assert_array_equal(a.trace, b.trace)
    np.testing.assert_array_equal(a.q.loc, b.q.loc)
    np.testing.assert_array_equal(a.restart_losses, b.restart_losses)


@pytest.mark.slow  # 6 s: two fits to convergence
def test_stop_rule_fit_on_disk_equals_fit_in_memory(files):
    """With the stopping rule, whose 500-step chunks run as 17 fed pieces of 30 steps: the
    same steps and stop as in memory, and the same iterate average to float rounding (the
    pieces' averages are joined on the host). The pieces and the join are also run by the
    default suite's resume test below."""
    root, x, y = files
    mem = veil.Target.minibatched(_prior, _lik, (x, y), dim=D, batch_size=B)
    disk = veil.Target.minibatched(_prior, _lik, OnDisk(_open(root), chunk_bytes=SMALL_FEED), dim=D, batch_size=B)
    kw = {"key": jax.random.key(1), "progress": False}
    a = veil.fit(mem, veil.MeanField(D), **kw)
    b = veil.fit(disk, veil.MeanField(D), **kw)
    assert (a.num_steps, a.stop_reason) == (b.num_steps, b.stop_reason)
    np.testing.assert_array_equal(a.trace, b.trace)
    np.testing.assert_allclose(b.q.loc, a.q.loc, rtol=1e-5, atol=1e-6)


def test_on_disk_fit_resumes_and_leaves_the_files_alone(files, tmp_path):
    """A crashed on-disk fit resumes from its checkpoint to the uninterrupted result, and the
    files on disk are byte for byte what they were. With the stopping rule: its chunks of
    100 and 200 steps run as fed pieces of 25 whose outputs are joined on the host."""
    root, _, _ = files
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}
    disk = veil.Target.minibatched(_prior, _lik, OnDisk(_open(root), chunk_bytes=SMALL_FEED), dim=D, batch_size=B)
    kw = {"key": jax.random.key(2), "progress": False, "max_steps": 400}
    plain = veil.fit(disk, veil.MeanField(D), **kw)
    path = str(tmp_path / "fit")
    with pytest.raises(KeyboardInterrupt):
        veil.fit(disk, veil.MeanField(D), checkpoint=_CrashAfter(path, every=0, n=2), **kw)
    resumed = veil.fit(disk, veil.MeanField(D), checkpoint=Checkpoint(path, every=0), **kw)
    np.testing.assert_array_equal(resumed.trace, plain.trace)
    np.testing.assert_array_equal(resumed.q.loc, plain.q.loc)
    assert resumed.num_steps == plain.num_steps == 400
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()} == digest


def test_bad_on_disk_input(tmp_path):
    x = np.ones((100, 2), np.float32)
    x[37, 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.ones(99, np.float32))
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    with pytest.raises(ValueError, match=r"data \[0\] holds non-finite values .* first at row 37"):
        veil.Target.minibatched(_prior, _lik, (xm, np.ones(100, np.float32)), dim=2, batch_size=10)
    with pytest.raises(ValueError, match=r"share their leading axis .*\[0\]: 100, \[1\]: 99"):
        veil.Target.minibatched(_prior, _lik, (xm, np.load(tmp_path / "y.npy", mmap_mode="r")), dim=2, batch_size=10)
    with pytest.raises(ValueError, match="chunk_bytes must be a positive integer"):
        OnDisk(xm, chunk_bytes=0)
    with pytest.raises(ValueError, match="not an array with a leading axis of rows.*mmap_mode"):
        OnDisk(str(tmp_path / "x.npy"))
    ok = np.load(tmp_path / "y.npy", mmap_mode="r")
    t = veil.Target.minibatched(_prior, lambda z, y: jnp.sum(y) * z[0], ok, dim=2, batch_size=9)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("rows",))
    with pytest.raises(ValueError, match="on disk .* does not shard"):
        t.shard(mesh)
