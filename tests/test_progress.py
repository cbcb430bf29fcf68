"""The progress bar (tqdm, updated once per chunk): what it shows and that it ends complete."""

import jax
import jax.numpy as jnp

import veil
from veil.loop import driver

TARGET = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)


class _Bar:
    """Records what the driver does with its bar."""

    made: list = []

    def __init__(self, total, desc, **kwargs):
        self.total, self.desc, self.n, self.postfix, self.closed = total, desc, 0, {}, False
        _Bar.made.append(self)

    def update(self, k):
        self.n += k

    def set_postfix(self, **kw):
        self.postfix = kw

    def refresh(self):
        pass

    def close(self):
        self.closed = True


def test_the_bar_counts_every_step_and_ends_full_when_the_rule_stops(monkeypatch):
    _Bar.made = []
    monkeypatch.setattr(driver, "tqdm", _Bar)
    res = veil.fit(TARGET, veil.MeanField(2), key=jax.random.key(0), max_steps=20_000, progress=True)
    (bar,) = _Bar.made
    assert res.converged and res.num_steps < 20_000
    # one update per chunk, summing to the steps run; the total set to them at the end (a run
    # the rule ended is complete at its own length, not at a fraction of max_steps)
    assert bar.desc == "fit" and bar.n == res.num_steps and bar.total == res.num_steps and bar.closed
    assert "loss" in bar.postfix


def test_progress_false_makes_no_bar(monkeypatch):
    _Bar.made = []
    monkeypatch.setattr(driver, "tqdm", _Bar)
    veil.fit(TARGET, veil.MeanField(2), key=jax.random.key(0), max_steps=200, stop=None, progress=False)
    assert _Bar.made == []


def test_the_real_bar_writes_to_stderr(capsys):
    veil.particles.run(TARGET, key=jax.random.key(0), n_particles=20, max_steps=150, stop=None, progress=True)
    err = capsys.readouterr().err
    assert "CoinSVGD" in err and "step" in err  # the method names the bar; tqdm counts steps
