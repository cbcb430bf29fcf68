"""Local latents: one latent per data row, fitted beside the global family on minibatches.

A NumPyro model whose subsampled plate holds latent sites (``with numpyro.plate("data", N,
subsample_size=B): z = numpyro.sample("z", ...)``) has *local* latents ``z_1..z_N`` beside its
global ones ``beta`` (``Target.local_sites``). veil fits

    q(beta, z_1..N) = q_global(beta) prod_i q_i(z_i)

by the ELBO on minibatches: a step draws ``beta`` and the batch's ``z_i`` and estimates

    ELBO = E[ log p(beta) + (N/B) sum_{i in B} (log p(x_i, z_i | beta) - log q_i(z_i)) - log q(beta) ]

without bias (NumPyro scales the plate's terms by ``N/B``; veil scales the local ``log q`` the
same way). Two guides for the local part:

* :class:`PerDatum`: a copy of a small family per row, its parameters a table of ``N`` rows.
  A step updates only the rows of its batch, by a row-wise Adam whose moments and step counts
  are per row (a dense optimizer would move every row each step by its decaying momentum,
  rows the step never saw; optax has no row-sparse Adam, hence the few lines here).
* :class:`Amortized`: an encoder (an ``equinox`` module) maps a row's data, and optionally the
  global draw, to the family's parameters (a variational autoencoder's encoder). Its weights
  are global parameters, moved by the fit's optax optimizer.

:class:`Structured` pairs a global family with a local guide; a model without global latents
(PPCA with ``W`` and ``sigma`` as ``numpyro.param``) takes the local guide alone. A guide written
as a NumPyro program (:class:`veil.Guide`) runs on each batch's rows too (``_GuideSpec``), and a
model without global latents can be fitted by the per-row importance-weighted bound
(``veil.IWAE(k)``, ``_IWAESpec``).

References:
    Hoffman, Blei, Wang & Paisley (2013), Stochastic Variational Inference;
    Kingma & Welling (2014), Auto-Encoding Variational Bayes;
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders;
    Tucker, Lawson, Gu & Maddison (2019), Doubly Reparameterized Gradient Estimators for Monte
    Carlo Objectives.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.infer.util import log_density as numpyro_log_density

from veil._checks import check_key as _check_key
from veil.diagnostics import format_khat, khat_ok, khat_verdict, psis_khat
from veil.estimators import DReG, Reparam
from veil.families.program import Guide
from veil.family import Family
from veil.loop import driver
from veil.loop.checkpoint import digest
from veil.loop.kernel import Kernel, StepInfo, all_finite, keep_if
from veil.objectives import IWAE
from veil.result import NotApplicable, Result
from veil.target import Target
from veil.target.core import _constrained, _with_rows

__all__ = ["PerDatum", "Amortized", "Structured", "LocalResult", "fit_local"]

# Row evaluations the result's ELBO and k-hat may spend (each joint draw reads every row), and
# the fewest joint draws a k-hat is computed from.
_JOINT_ROW_BUDGET = 500_000
_KHAT_MIN_DRAWS = 200


def _family_params(family: Family):
    return eqx.partition(family, eqx.is_inexact_array)


class PerDatum(eqx.Module):
    """Per-row variational parameters: ``family`` (over one row's local latents, e.g.
    ``veil.FullRank(k)``) copied once per data row, every row starting where ``family`` does.

    Only the rows in a step's batch move, by a row-wise Adam (step ``step_size``, the
    stopping rule's decays applied).

    Examples:
        >>> import veil
        >>> guide = veil.PerDatum(veil.MeanField(2))
    """

    family: Family
    step_size: float = eqx.field(static=True, default=0.05)

    def __check_init__(self):
        if not isinstance(self.family, Family):
            raise TypeError(f"PerDatum needs a veil family for one row's local latents, got {self.family!r}.")

    def init_params(self, num_rows: int, global_dim: int):
        del global_dim
        params, _ = _family_params(self.family)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_rows, *x.shape)), params)

    def row_params(self, params, rows, z_global):
        """The family parameters of the rows ``rows`` (leading axis the rows)."""
        del z_global
        return jax.tree.map(lambda x: x[rows], params)


class Amortized(eqx.Module):
    """An encoder that maps a data row to the parameters of ``family`` (over one row's local
    latents): ``encoder(x_i)``, or ``encoder(x_i, beta)`` with ``context=True`` (the global
    draw ``beta`` conditions the local guide).

    The encoder returns a flat vector of the family's parameter count (``veil.MeanField(k)``:
    ``2 k``, its ``loc`` then its unconstrained scale), read in the order of the family's
    parameter leaves (``jax.flatten_util.ravel_pytree`` of them), as an offset from the
    family's own starting parameters (an encoder that outputs zeros gives ``family``).

    Args:
        encoder: an ``equinox`` module (its arrays are trained).
        family: the family of one row's local latents.
        data: the encoder's input, rows along the leading axis (``N`` of them, the plate's).
        context: whether the encoder also takes the global draw.

    Examples:
        >>> import equinox as eqx, jax, jax.numpy as jnp, veil
        >>> x = jnp.zeros((100, 5))
        >>> enc = eqx.nn.MLP(5, 4, 16, 1, key=jax.random.key(0))
        >>> guide = veil.Amortized(enc, veil.MeanField(2), data=x)
    """

    encoder: Any
    family: Family
    data: Any
    context: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not isinstance(self.family, Family):
            raise TypeError(f"Amortized needs a veil family for one row's local latents, got {self.family!r}.")
        if not callable(self.encoder):
            raise TypeError(f"encoder must be a callable equinox module, got {type(self.encoder).__name__}.")

    def _unravel(self):
        params, _ = _family_params(self.family)
        flat, unravel = ravel_pytree(params)
        return flat, unravel

    def check(self, num_rows: int, global_dim: int) -> None:
        """Raise ``ValueError`` (before any compilation) if the data's rows are not the
        plate's or the encoder's output does not fit the family."""
        lead = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(self.data)}
        if lead != {num_rows}:
            raise ValueError(
                f"Amortized's data must have the plate's {num_rows} rows along their leading axis, got "
                f"leading sizes {sorted(map(str, lead))}.")
        row = jax.tree.map(lambda x: x[0], self.data)
        args = (row, jnp.zeros(global_dim)) if self.context else (row,)
        try:
            out = eqx.filter_eval_shape(self.encoder, *args)
        except Exception as e:  # the encoder's own shape error, with what veil passed it
            raise ValueError(
                f"The encoder could not be called on one row of the data ({jax.tree.map(jnp.shape, row)})"
                f"{' and the global draw (' + str(global_dim) + ',)' if self.context else ''}: {e}") from e
        flat, _ = self._unravel()
        if getattr(out, "shape", None) != flat.shape:
            raise ValueError(
                f"The encoder's output has shape {getattr(out, 'shape', type(out).__name__)}, but "
                f"{type(self.family).__name__}(dim={self.family.dim}) has {flat.size} parameters: the "
                f"encoder must return a vector of {flat.size} numbers.")

    def init_params(self, num_rows: int, global_dim: int):
        self.check(num_rows, global_dim)
        return eqx.filter(self.encoder, eqx.is_inexact_array)

    def row_params(self, params, rows, z_global):
        encoder = eqx.combine(params, eqx.filter(self.encoder, eqx.is_inexact_array, inverse=True))
        flat, unravel = self._unravel()
        x = jax.tree.map(lambda d: d[rows], self.data)
        if self.context:
            out = jax.vmap(lambda r: encoder(r, z_global))(x)
        else:
            out = jax.vmap(encoder)(x)
        return jax.vmap(lambda o: unravel(flat + o))(out)


class Structured(eqx.Module):
    """A global family and a local guide: ``q(beta) prod_i q_i(z_i)``.

    Examples:
        >>> import veil
        >>> guide = veil.Structured(veil.FullRank(3), veil.PerDatum(veil.MeanField(2)))
    """

    global_family: Family | None
    local: PerDatum | Amortized

    def __check_init__(self):
        if self.global_family is not None and not isinstance(self.global_family, Family):
            raise TypeError(f"Structured's global part must be a veil family, got {self.global_family!r}.")
        if not isinstance(self.local, (PerDatum, Amortized)):
            raise TypeError(f"Structured's local part must be veil.PerDatum or veil.Amortized, got {self.local!r}.")


# ---------------------------------------------------------------------- the loss and kernel
def _row_draws(local_family: Family, row_params, key):
    """One draw of each row's local latents and its ``log q``."""
    _, rest = _family_params(local_family)
    rows = jax.tree.leaves(row_params)[0].shape[0]

    def one(p, k):
        z, lq = eqx.combine(p, rest).sample_and_log_prob(k, 1)
        return z[0], lq[0]

    return jax.vmap(one)(row_params, jax.random.split(key, rows))


class _Spec(eqx.Module):
    """What the local loss needs besides the parameters: the target, the guide's static parts."""

    target: Target
    global_rest: Any
    local: Any

    def draw(self, params, key, row_ids, row_params=None):
        """One joint draw on the rows ``row_ids``: ``(z, log q(z), z_local, log q_i(z_i))``.
        ``row_params`` are those rows' local parameters where the caller has them already
        (a per-datum table's slice), else the guide gives them."""
        g_key, l_key = jax.random.split(key)
        if "q" in params:
            z, log_qg = eqx.combine(params["q"], self.global_rest).sample_and_log_prob(g_key, 1)
            z, log_qg = z[0], log_qg[0]
        else:
            z, log_qg = jnp.zeros(0), 0.0
        if row_params is None:
            row_params = self.local.row_params(params["local"], row_ids, z)
        z_local, log_ql = _row_draws(self.local.family, row_params, l_key)
        return z, log_qg, z_local, log_ql

    def constrained(self, params, key, rows):
        """One joint draw on the rows ``rows``, constrained: ``name -> value`` (local sites with
        the rows' axis first)."""
        z, _, z_local, _ = self.draw(params, key, rows)
        return self.target.on_batch(rows).to_constrained_local(z, z_local)

    def elbo(self, params, key, rows, row_params=None):
        """One-draw estimate of the ELBO on the rows ``rows`` (all rows when ``None``): scaled
        by ``N / B`` on a batch, NumPyro's and veil's scales agreeing."""
        target = self.target if "theta" not in params else self.target.with_params(params["theta"])
        row_ids = jnp.arange(target.num_data) if rows is None else rows
        z, log_qg, z_local, log_ql = self.draw(params, key, row_ids, row_params)
        if rows is not None:
            target = target.on_batch(rows)
        scale = target.num_data / row_ids.shape[0]
        return target.log_density_local(z, z_local) - log_qg - scale * jnp.sum(log_ql)


def _row_draws_k(local_family: Family, row_params, key, k: int, stopped: bool):
    """``k`` draws of each row's local latents, ``[k, rows, d]``, and ``log q`` of each, ``[k, rows]``;
    with ``stopped``, ``log q`` at stopped parameters (the path gradient through the draws only)."""
    _, rest = _family_params(local_family)
    rows = jax.tree.leaves(row_params)[0].shape[0]

    def one(p, key):
        q = eqx.combine(p, rest)
        return q.sample_with_stopped_log_prob(key, k) if stopped else q.sample_and_log_prob(key, k)

    z, log_q = jax.vmap(one)(row_params, jax.random.split(key, rows))
    return jnp.swapaxes(z, 0, 1), log_q.T


class _IWAESpec(_Spec):
    """The importance-weighted bound per row, for a model without global latents (a VAE):
    ``sum_i log (1/k) sum_j p(x_i, z_ij) / q(z_ij | x_i)``, scaled by ``N / B`` on a batch.

    Each row's ``log p(x_i, z_ij)`` is the model on that row alone (NumPyro's plate scale ``N``
    undone). With ``dreg``, the guide's gradient is the doubly reparameterised one (Tucker et
    al., 2019: ``sum_j w~_ij^2`` times the path derivative of ``log w_ij`` with ``log q`` at
    stopped parameters), the model parameters' the plain one (``sum_j w~_ij grad log p``)."""

    k: int = eqx.field(static=True, default=8)
    dreg: bool = eqx.field(static=True, default=True)

    def _log_p(self, target, row_ids, z_local):
        """``log p(x_i, z_ij)`` of each draw ``[k, rows]`` for the rows ``row_ids``."""
        n = target.num_data

        def one(i, z_row):
            return target.on_batch(i[None]).log_density_local(jnp.zeros(0), z_row[None]) / n

        return jax.vmap(lambda z: jax.vmap(one)(row_ids, z))(z_local)

    def elbo(self, params, key, rows, row_params=None):
        target = self.target if "theta" not in params else self.target.with_params(params["theta"])
        row_ids = jnp.arange(target.num_data) if rows is None else rows
        if row_params is None:
            row_params = self.local.row_params(params["local"], row_ids, jnp.zeros(0))
        scale = target.num_data / row_ids.shape[0]
        z, log_q = _row_draws_k(self.local.family, row_params, key, self.k, stopped=self.dreg)
        if not self.dreg:
            log_w = self._log_p(target, row_ids, z) - log_q
            return scale * jnp.sum(jax.nn.logsumexp(log_w, axis=0) - math.log(self.k))
        # The guide's part: the model's parameters held, the draws carry the path gradient, the
        # weights squared and stopped.
        held = target if "theta" not in params else self.target.with_params(jax.lax.stop_gradient(params["theta"]))
        log_w = self._log_p(held, row_ids, z) - log_q
        w = jax.lax.stop_gradient(jax.nn.softmax(log_w, axis=0))
        guide_part = jnp.sum(w**2 * log_w)
        # The model's parameters: the plain gradient sum_j w~_ij grad log p(x_i, z_ij), draws held.
        model_part = jnp.sum(w * self._log_p(target, row_ids, jax.lax.stop_gradient(z))) if "theta" in params else 0.0
        surrogate = guide_part + model_part
        value = jnp.sum(jax.nn.logsumexp(log_w, axis=0) - math.log(self.k))
        return scale * (jax.lax.stop_gradient(value) + surrogate - jax.lax.stop_gradient(surrogate))


class _GuideSpec(eqx.Module):
    """The ELBO of a user-written NumPyro guide program on a model with local latents, by
    NumPyro's own machinery, as its ``Trace_ELBO`` computes it: the guide traced on the batch's
    rows (veil sets its plate's indices as it does the model's), the model's joint density at
    the guide's draws, both in constrained space (the change of variables cancels) and both
    scaled by their plates."""

    target: Target
    local: Guide

    def _trace(self, params, key, rows):
        guide = self.local
        fn = _with_rows(guide.guide, self.target.plate, self.target.num_data, rows)
        values = {**params["local"], **params.get("rows", {})}  # the guide's dense parameters and its tables
        fn = handlers.substitute(fn, data=_constrained(guide.param_sites, values))
        args, kwargs = self.target.data
        return handlers.trace(handlers.seed(fn, rng_seed=key)).get_trace(*args, **kwargs)

    def _latent(self, tr) -> dict:
        names = [s.name for s in (*self.target.sites, *self.target.local_sites)]
        return {n: tr[n]["value"] for n in names}

    def constrained(self, params, key, rows):
        return self._latent(self._trace(params, key, rows))

    def elbo(self, params, key, rows, row_params=None):
        target = self.target if "theta" not in params else self.target.with_params(params["theta"])
        tr = self._trace(params, key, rows)
        log_q = sum(jnp.sum(site["fn"].log_prob(site["value"])) * (1.0 if site["scale"] is None else site["scale"])
                    for site in tr.values() if site["type"] == "sample" and not site["is_observed"])
        batch = target if rows is None else target.on_batch(rows)
        args, kwargs = target.data
        return numpyro_log_density(batch._model(), args, kwargs, self._latent(tr))[0] - log_q


class _LocalKernel(Kernel):
    """The optax optimizer on the global parameters (``q``, ``theta``, an encoder's weights);
    for per-row tables (a :class:`PerDatum`'s, under ``params["local"]``; a guide program's, under
    ``params["rows"]``), a row-wise Adam on the batch's rows only."""

    spec: Any  # a _Spec, _IWAESpec or _GuideSpec: the loss is -spec.elbo
    optimizer: Any = eqx.field(static=True)
    row_key: str | None = eqx.field(static=True, default=None)  # params' entry of per-row tables
    row_step: float = eqx.field(static=True, default=0.05)  # the row-wise Adam's step
    beta1: float = eqx.field(static=True, default=0.9)
    beta2: float = eqx.field(static=True, default=0.999)

    def _dense(self, params):
        return {k: v for k, v in params.items() if k != self.row_key}

    def init(self, params):
        dense_state = self.optimizer.init(self._dense(params))
        if self.row_key is None:
            return dense_state, None
        tables = params[self.row_key]
        zeros = jax.tree.map(jnp.zeros_like, tables)
        count = jnp.zeros(jax.tree.leaves(tables)[0].shape[0], jnp.int32)
        return dense_state, (zeros, zeros, count)

    def step(self, params, state, key, scale, batch):
        dense_state, row_state = state
        rows = batch
        if self.row_key == "local":  # a PerDatum table: the loss sees the batch's slice alone
            row_slice = jax.tree.map(lambda t: t[rows], params["local"])
            value, (g_dense, g_rows) = jax.value_and_grad(
                lambda dense, sl: -self.spec.elbo(dense, key, rows, row_params=sl), argnums=(0, 1)
            )(self._dense(params), row_slice)
        else:
            value, grads = jax.value_and_grad(lambda p: -self.spec.elbo(p, key, rows))(params)
            g_dense, g_rows, row_slice = grads, None, None
            if self.row_key is not None:  # a guide program's tables: their gradient is the rows'
                g_dense = self._dense(grads)
                g_rows = jax.tree.map(lambda g: g[rows], grads[self.row_key])
                row_slice = jax.tree.map(lambda t: t[rows], params[self.row_key])
        ok = all_finite(value, (g_dense, g_rows))

        def move(args):
            params, dense_state, row_state = args
            dense = self._dense(params)
            updates, dense_state = self.optimizer.update(g_dense, dense_state, dense)
            dense = eqx.apply_updates(dense, jax.tree.map(lambda u: scale * u, updates))
            if self.row_key is None:
                return dense, dense_state, row_state
            # Adam on the batch's rows alone, each row with its own step count for the bias
            # corrections.
            m, v, count = row_state
            t = count[rows] + 1
            lr = self.row_step * scale

            def per_row(x):  # t as a column that broadcasts over a leaf's per-row axes
                return t.reshape((-1,) + (1,) * (x.ndim - 1))

            m_rows = jax.tree.map(lambda m, g: self.beta1 * m[rows] + (1 - self.beta1) * g, m, g_rows)
            v_rows = jax.tree.map(lambda v, g: self.beta2 * v[rows] + (1 - self.beta2) * g**2, v, g_rows)
            moved = jax.tree.map(
                lambda x, mr, vr: x - lr * (mr / (1 - self.beta1 ** per_row(x)))
                / (jnp.sqrt(vr / (1 - self.beta2 ** per_row(x))) + 1e-8),
                row_slice, m_rows, v_rows)

            def put(table, values):
                return jax.tree.map(lambda a, b: a.at[rows].set(b), table, values)

            return ({**dense, self.row_key: put(params[self.row_key], moved)}, dense_state,
                    (put(m, m_rows), put(v, v_rows), count.at[rows].set(t)))

        params, dense_state, row_state = keep_if(ok, move, (params, dense_state, row_state))
        return params, (dense_state, row_state), StepInfo(value, ok)

    def watched(self, params):
        # The stopping rule's drift test watches what is identified: the global family and the
        # model parameters that are single arrays. Not a table's rows (they move only when their
        # batch comes round), nor networks' weights (an encoder's, a decoder's registered by
        # eqx_module): like a flow's, they wander along the network's symmetries while what they
        # compute stays put. A model whose learned parameters are all networks (a VAE) is judged
        # by its loss alone (a constant watched).
        out = {} if "q" not in params else {"q": params["q"]}
        theta = {k: v for k, v in params.get("theta", {}).items() if eqx.is_array(v)}
        if theta:
            out["theta"] = theta
        return out or jnp.zeros(())

    @property
    def batches(self):
        return self.spec.target.batches


# ---------------------------------------------------------------------- the result
@dataclasses.dataclass
class LocalResult(Result):
    """The outcome of :func:`veil.fit` on a model with local latents.

    Attributes:
        target: the target, its model parameters at their fitted values (``params``).
        q: the fitted global family (``None`` for a model without global latents).
        local: the fitted local guide (a :class:`PerDatum` table or an :class:`Amortized`
            encoder, with its data).
        trace: the loss (negative ELBO estimate on the step's batch) per step.
        num_steps, stop_reason, num_skipped, final_loss, wall_time: as for :class:`veil.VIResult`.
        diagnostic_key: the key the diagnostics draw with.
    """

    target: Any
    q: Any
    local: Any
    local_params: Any
    trace: np.ndarray
    num_steps: int
    stop_reason: str
    num_skipped: int
    final_loss: float
    wall_time: float
    diagnostic_key: jax.Array = dataclasses.field(repr=False)

    _subject = "this fit"

    @property
    def params(self) -> Any:
        """The model parameters the fit learned (constrained)."""
        return self.target.constrained_params()

    @property
    def converged(self) -> bool:
        return self.stop_reason.startswith("converged")

    def _spec(self):
        # (the ELBO's, whatever the fit's objective: the result reports the ELBO)
        if isinstance(self.local, Guide):
            return _GuideSpec(self.target, self.local)
        rest = None if self.q is None else _family_params(self.q)[1]
        return _Spec(self.target, rest, self.local)

    def _all_params(self):
        p = {"local": self.local_params}
        if self.q is not None:
            p["q"] = _family_params(self.q)[0]
        return p

    @property
    def _num_joint_draws(self) -> int:
        """Joint draws for the ELBO and k-hat: each reads every row, so 1,000 where the rows are
        few and fewer where they are many (500,000 row evaluations in all, at least 10)."""
        return int(np.clip(_JOINT_ROW_BUDGET // self.target.num_data, 10, 1000))

    @functools.cached_property
    def _joint_log_weights(self) -> np.ndarray:
        """``log p(beta, z_1..N, x) - log q(beta, z_1..N)`` of the joint draws, all rows."""
        spec, params = self._spec(), self._all_params()
        keys = jax.random.split(jax.random.fold_in(self.diagnostic_key, 3), self._num_joint_draws)
        lw = jax.lax.map(lambda k: spec.elbo(params, k, None), keys, batch_size=10)
        return np.asarray(lw, np.float64)

    @property
    def elbo(self) -> float:
        """The full-data ELBO of the fitted guide (from up to 1,000 joint draws; every row)."""
        return float(np.mean(self._joint_log_weights))

    @property
    def khat(self) -> float:
        """PSIS k-hat of the joint guide ``q(beta) prod_i q_i(z_i)`` against the full-data
        joint density, from 1,000 joint draws: how far the whole approximation is from the
        posterior of every latent (``-inf``: exact).

        Raises:
            NotApplicable: the rows are too many for 200 joint draws within the budget of
                500,000 row evaluations (over 2,500 rows): a k-hat from fewer draws would be noise.
        """
        if self._num_joint_draws < _KHAT_MIN_DRAWS:
            raise NotApplicable(
                f"k-hat of the joint guide over {self.target.num_data} rows is not computed: each joint draw "
                f"reads every row, and {_KHAT_MIN_DRAWS} of them would cost {_KHAT_MIN_DRAWS * self.target.num_data:,} "
                "row evaluations. The ELBO (res.elbo) is estimated from fewer draws.")
        lw = self._joint_log_weights
        return psis_khat(lw) if np.all(np.isfinite(lw)) else math.nan

    def draws(self, n: int, *, key: jax.Array) -> dict[str, jax.Array]:
        """``n`` joint draws, constrained: global sites ``[n, ...]``, local sites ``[n, N, ...]``."""
        spec, params = self._spec(), self._all_params()
        rows = jnp.arange(self.target.num_data)

        return jax.lax.map(lambda k: spec.constrained(params, k, rows), jax.random.split(key, n),
                           batch_size=min(n, 64))

    def verdict(self) -> tuple[list[str], bool]:
        try:
            khat = self.khat
        except NotApplicable as e:
            return self._run_lines([str(e)], True, self._subject)
        lines = [f"PSIS k-hat of the joint guide (every row) = {format_khat(khat)}: "
                 f"{khat_verdict(khat, 'the guide')}"]
        return self._run_lines(lines, khat_ok(khat), self._subject)

    def _summary_header(self) -> str:
        return (f"veil fit with local latents ({', '.join(s.name for s in self.target.local_sites)}, "
                f"{self.target.num_data} rows): {self.num_steps} steps, {self.wall_time:.2f} s, ELBO {self.elbo:.2f}")

    def _summary_draws(self) -> dict:
        # The table holds the global sites and the learned parameters (as constants, sd 0); the
        # local sites are N per draw (res.draws has them), so the globals are drawn with one
        # row's locals beside them, not all N.
        n = 1000
        spec, params, row = self._spec(), self._all_params(), jnp.arange(1)
        keep = {s.name for s in self.target.sites}

        def one(k):
            return {k: v for k, v in spec.constrained(params, k, row).items() if k in keep}

        out = jax.lax.map(one, jax.random.split(jax.random.fold_in(self.diagnostic_key, 1), n), batch_size=100)
        out.update({k: jnp.broadcast_to(v, (n, *jnp.shape(v))) for k, v in self.params.items()
                    if hasattr(v, "shape")})
        return out

    def _plot_trace(self):
        return self.trace, "loss (−ELBO estimate on the batch)", "step"

    def _plot_title(self) -> str:
        return f"stop: {self.stop_reason}"


# ---------------------------------------------------------------------- fit
def _fingerprint(spec, params, optimizer, stop, key) -> dict:
    """What a checkpoint of a local fit must match (see ``veil.fit``'s): the ELBO's program with
    the target's data and the guide's starting values, the optimizer, the rule and the key."""
    rows = jnp.arange(spec.target.batch_size)
    return {
        # (the target closed over: its arrays are hashed as the program's constants)
        "local fit": digest(lambda p, k: spec.elbo(p, k, rows), params, jax.random.key(0)),
        "optimizer": digest(lambda p: optimizer.update(p, optimizer.init(p), p), params),
        "stop": re.sub(r" at 0x[0-9a-fA-F]+", "", repr(stop)),
        "key": np.asarray(jax.random.key_data(key)).tolist(),
    }


def _spec_for(objective, target: Target, global_rest, local) -> _Spec:
    """The loss of a local fit: the one-draw ELBO (``objective`` None), or ``veil.IWAE(k)`` per
    row for a model without global latents (DReG or plain path-wise gradients)."""
    if objective is None:
        return _Spec(target, global_rest, local)
    if isinstance(objective, IWAE) and isinstance(objective.estimator, (DReG, Reparam)):
        if target.dim:
            raise NotImplementedError(
                "veil.IWAE on local latents is the per-row bound of a model without global latents (a VAE); "
                f"this model has global ones ({', '.join(s.name for s in target.sites)}): drop objective.")
        return _IWAESpec(target, None, local, k=objective.k, dreg=isinstance(objective.estimator, DReG))
    raise NotImplementedError(
        f"A model with local latents is fitted by the one-draw ELBO (objective=None) or veil.IWAE(k) with DReG or "
        f"Reparam gradients (a model without global latents); {objective!r} is not supported there yet: drop objective.")


def fit_local(target: Target, guide, *, key, optimizer, max_steps: int, stop, progress: bool,
              checkpoint=None, objective=None) -> LocalResult:
    """``veil.fit`` for a target with local latents (see the module docstring)."""
    _check_key(key)
    if isinstance(guide, Guide):
        return _fit_guide_program(target, guide, key=key, optimizer=optimizer, max_steps=max_steps, stop=stop,
                                  progress=progress, checkpoint=checkpoint, objective=objective)
    if isinstance(guide, (PerDatum, Amortized)):
        guide = Structured(None, guide)
    if not isinstance(guide, Structured):
        raise ValueError(
            f"The model has local latents ({', '.join(repr(s.name) for s in target.local_sites)}, one per row "
            f"of the plate '{target.plate}') that {type(guide).__name__} does not cover: fit it with "
            "veil.Structured(global_family, veil.PerDatum(family)) or veil.Amortized(encoder, family, data=x) "
            f"for the local part (the family over one row's {target.local_dim} local dimensions).")
    if guide.global_family is None and target.dim:
        raise ValueError(
            f"The model has global latents ({', '.join(s.name for s in target.sites)}, dim {target.dim}) that "
            "the guide does not cover: give veil.Structured(veil.MeanField(target.dim), local).")
    if guide.global_family is not None and guide.global_family.dim != target.dim:
        raise ValueError(f"The global family has dim={guide.global_family.dim} but the target's global "
                         f"latents have dim={target.dim}.")
    local = guide.local
    if local.family.dim != target.local_dim:
        raise ValueError(
            f"The local family has dim={local.family.dim} but one row's local latents "
            f"({', '.join(s.name for s in target.local_sites)}) have dim={target.local_dim}.")
    params = {"local": local.init_params(target.num_data, target.dim)}
    global_rest = None
    if guide.global_family is not None:
        params["q"], global_rest = _family_params(guide.global_family)
    if target.has_params:
        params["theta"] = target.params
    spec = _spec_for(objective, target, global_rest, local)
    kernel = (_LocalKernel(spec, optimizer, "local", local.step_size) if isinstance(local, PerDatum)
              else _LocalKernel(spec, optimizer))
    final, run = _run(kernel, params, key=key, max_steps=max_steps, stop=stop, progress=progress,
                      checkpoint=checkpoint, optimizer=optimizer)
    q = None if guide.global_family is None else eqx.combine(final["q"], global_rest)
    local_fitted = local if isinstance(local, PerDatum) else eqx.tree_at(
        lambda g: g.encoder, local,
        eqx.combine(final["local"], eqx.filter(local.encoder, eqx.is_inexact_array, inverse=True)))
    return LocalResult(q=q, local=local_fitted, local_params=final["local"], **run)


def _run(kernel: _LocalKernel, params, *, key, max_steps: int, stop, progress: bool, checkpoint, optimizer):
    """Run a local fit's kernel: its final parameters (one restart) and the result's fields that
    every local fit shares (the target with its learned parameters, the run's record)."""
    start = time.perf_counter()
    run_key, diag_key = jax.random.split(key)
    spec, target = kernel.spec, kernel.spec.target
    out = driver.run(kernel, jax.tree.map(lambda x: x[None], params), key=run_key, max_steps=max_steps,
                     stop_rule=stop, progress=progress, checkpoint=checkpoint,
                     fingerprint=None if checkpoint is None else _fingerprint(spec, params, optimizer, stop, key))
    final = jax.tree.map(lambda x: x[0], out.params)
    if target.has_params:
        target = target.with_params(final["theta"])
    return final, dict(
        target=target, trace=out.traces[0], num_steps=int(out.num_steps[0]), stop_reason=out.stop_reasons[0],
        num_skipped=int(out.skipped[0]), final_loss=float(out.final_loss[0]),
        wall_time=time.perf_counter() - start, diagnostic_key=diag_key)


def _row_tables(spec: _GuideSpec, params) -> tuple[str, ...]:
    """The guide's parameters that are per-row tables: a leading axis of the plate's size, and a
    gradient, on a first batch, only at that batch's rows (the guide indexes them by the plate's
    indices). Those take the row-wise Adam, as a :class:`PerDatum` table does; the rest (and a
    table the guide reads whole) the dense optimizer."""
    n = spec.target.num_data
    candidates = [k for k, v in params["local"].items() if eqx.is_array(v) and v.ndim >= 1 and v.shape[0] == n]
    if not candidates:
        return ()
    rows = jnp.arange(spec.target.batch_size)
    grads = jax.jit(jax.grad(lambda p: spec.elbo(p, jax.random.key(0), rows)))(params)["local"]  # one program
    outside = np.ones(n, bool)
    outside[: spec.target.batch_size] = False
    return tuple(k for k in candidates
                 if np.any(np.asarray(grads[k])[~outside] != 0) and not np.any(np.asarray(grads[k])[outside] != 0))


def _fit_guide_program(target: Target, guide: Guide, *, key, optimizer, max_steps: int, stop, progress: bool,
                       checkpoint, objective) -> LocalResult:
    """``fit_local`` with a NumPyro guide program (:class:`veil.Guide`) as the whole guide."""
    if guide.num_data != target.num_data:
        raise ValueError("The veil.Guide was built for another target: build it with this one.")
    if objective is not None:
        raise NotImplementedError("A guide program on a model with local latents is fitted by the one-draw ELBO "
                                  "for now: drop objective.")
    params = {"local": guide.params}
    if target.has_params:
        params["theta"] = target.params
    spec = _GuideSpec(target, guide)
    tables = _row_tables(spec, params)
    if tables:
        params = {**params, "local": {k: v for k, v in guide.params.items() if k not in tables},
                  "rows": {k: guide.params[k] for k in tables}}
    kernel = _LocalKernel(spec, optimizer, "rows" if tables else None)
    final, run = _run(kernel, params, key=key, max_steps=max_steps, stop=stop, progress=progress,
                      checkpoint=checkpoint, optimizer=optimizer)
    fitted = {**final["local"], **final.get("rows", {})}
    return LocalResult(q=None, local=eqx.tree_at(lambda g: g.params, guide, fitted), local_params=fitted, **run)
