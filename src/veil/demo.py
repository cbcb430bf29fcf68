"""Bundled demo models and ``veil demo``: two fits printed beside long-NUTS reference values.

* Eight schools, non-centred (Rubin 1981; Gelman et al., Bayesian Data Analysis, 5.5).
* German credit logistic regression: 24 standardised features plus an intercept, standard
  normal prior on the 25 weights, the model of Inference Gym's
  ``GermanCreditNumericLogisticRegression``. Data: UCI Statlog German Credit (CC BY 4.0; see
  ``veil/data/ATTRIBUTION.md``).
"""

from __future__ import annotations

import json
import os
import time
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from veil.diagnostics import format_khat
from veil.families.gaussian import FullRank
from veil.fit import fit
from veil.result import _flat_columns
from veil.target import Target

__all__ = ["eight_schools", "eight_schools_data", "german_credit", "german_credit_data",
           "load_reference", "run_demo"]

EIGHT_SCHOOLS_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
EIGHT_SCHOOLS_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(sigma, y=None):
    """Non-centred eight schools: ``theta = mu + tau * theta_tilde``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0).expand([len(sigma)]))
    theta = numpyro.deterministic("theta", mu + tau * theta_tilde)
    numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_data():
    """``(sigma, y)`` of the eight schools."""
    return jnp.asarray(EIGHT_SCHOOLS_SIGMA), jnp.asarray(EIGHT_SCHOOLS_Y)


def german_credit(x, y=None):
    """Logistic regression ``y ~ Bernoulli(logit = x @ w)``, ``w ~ N(0, I)``."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]))
    numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)


def german_credit_data():
    """``(x, y)``: standardised features with a trailing intercept column, labels 1 = good."""
    raw = np.loadtxt(resources.files("veil").joinpath("data/german_credit.data-numeric"))
    feats, label = raw[:, :-1], raw[:, -1]
    feats = (feats - feats.mean(0)) / feats.std(0)
    x = np.concatenate([feats, np.ones((len(feats), 1))], axis=1)
    return jnp.asarray(x, jnp.float32), jnp.asarray(2.0 - label, jnp.float32)


MODELS = {
    "eight_schools": (eight_schools, eight_schools_data),
    "german_credit": (german_credit, german_credit_data),
}


def load_reference(name: str) -> dict:
    """The shipped NUTS reference for a demo model: ``{"mean": {...}, "sd": {...}, ...}``."""
    path = resources.files("veil").joinpath(f"data/reference_{name}.json")
    return json.loads(path.read_text())


def run_demo(*, max_steps: int = 20_000, out: str | None = "veil_demo.png", seed: int = 0,
             progress: bool = True) -> dict:
    """Fit both demo models with ``FullRank`` and print veil beside the reference.

    Returns a dict ``name -> VIResult``. Writes a PNG of traces and marginals to ``out``
    (skipped when ``out`` is None).
    """
    if out is not None:  # before any fitting: a path that cannot be written fails now, not after
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise ValueError(f"Cannot write the demo's figure to {out}: the folder {folder} does not exist.")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"Cannot write the demo's figure to {out}: the folder {folder} is not writable.")
    results = {}
    figs = []
    for i, (name, (model, data)) in enumerate(MODELS.items()):
        t0 = time.perf_counter()
        target = Target.from_numpyro(model, *data())
        res = fit(target, FullRank(target.dim), key=jax.random.key(seed + i),
                       max_steps=max_steps, progress=progress)
        wall = time.perf_counter() - t0
        results[name] = res
        print(_comparison(name, res, load_reference(name), wall))
        if out is not None:
            fig = res.plot(max_marginals=None)
            fig.suptitle(name)
            figs.append(fig)
    if out is not None:
        _save_figures(figs, out)
        print(f"Traces and marginals written to {os.path.abspath(out)}")
    return results


def _comparison(name: str, res, ref: dict, wall: float) -> str:

    draws = res.draws(4000, key=jax.random.key(123))
    names, x = _flat_columns(draws)
    mean, sd = x.mean(0), x.std(0, ddof=1)
    lines = [
        f"== {name}: FullRank, {res.num_steps} steps, {wall:.2f} s wall (compile included), "
        f"k-hat {format_khat(res.khat)} ==",
        f"{'':<16}{'veil mean':>11}{'NUTS mean':>11}{'veil sd':>10}{'NUTS sd':>10}{'|err|/sd':>10}",
    ]
    errs = []
    for n, m, s in zip(names, mean, sd):
        if n not in ref["mean"]:
            continue
        rm, rs = ref["mean"][n], ref["sd"][n]
        errs.append(abs(m - rm) / rs)
        lines.append(f"{n:<16}{m:>11.3f}{rm:>11.3f}{s:>10.3f}{rs:>10.3f}{errs[-1]:>10.2f}")
    verdict, _ = res.verdict()
    lines.append(f"max |mean error| / NUTS sd = {max(errs):.2f}; " + verdict[0])
    lines += [line for line in verdict[1:] if not line.startswith("Stopped after")]
    return "\n".join(lines)


def _save_figures(figs, out: str) -> None:
    """Stack the per-model figures vertically into one PNG."""
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    images = []
    for fig in figs:
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        images.append(np.asarray(canvas.buffer_rgba()))
        plt.close(fig)
    width = max(im.shape[1] for im in images)
    padded = [np.pad(im, ((0, 0), (0, width - im.shape[1]), (0, 0)), constant_values=255)
              for im in images]
    plt.imsave(out, np.concatenate(padded, axis=0))
