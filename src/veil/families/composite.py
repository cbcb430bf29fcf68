"""A product of families over consecutive blocks of the unconstrained vector."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg

from veil.family import Family, RejectionSampled
from veil.families.gaussian import MeanField

__all__ = ["Composite"]


class Composite(RejectionSampled):
    """``q(z) = prod_b q_b(z_b)``: independent families on consecutive blocks of ``z``.

    Use it to give each part of a model the family its support calls for, e.g. a
    :class:`~veil.Gamma` for a positive rate and a :class:`~veil.FullRank` for correlated
    regression weights. :meth:`for_target` builds one block per NumPyro site.

    Every estimator works: path-wise ones through each block's draws; :class:`~veil.RSVI`
    through the blocks that draw by acceptance-rejection, the others being plain
    reparameterised blocks (their noise density does not depend on the parameters, so they add
    no correction term).

    Examples:
        >>> import jax, veil
        >>> q = veil.Composite([veil.Gamma(2), veil.FullRank(3)])
        >>> z, lq = q.sample_and_log_prob(jax.random.key(0), 4)
        >>> z.shape, q.dim
        ((4, 5), 5)
    """

    blocks: tuple
    sizes: tuple[int, ...] = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    def __init__(self, blocks):
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError("Composite needs at least one block.")
        for b in blocks:
            if not isinstance(b, Family):
                raise TypeError(f"every block must be a veil family, got {type(b).__name__}.")
        self.blocks = blocks
        self.sizes = tuple(int(b.dim) for b in blocks)
        self.dim = sum(self.sizes)

    @classmethod
    def for_target(cls, target, families: dict, default=None) -> "Composite":
        """One block per site of ``target`` (in the target's order): ``families[name]`` is a
        family class (called with the site's unconstrained size) or a family instance;
        sites not named get ``default`` (a class, default :class:`~veil.MeanField`)."""

        default = MeanField if default is None else default
        unknown = set(families) - {s.name for s in target.sites}
        if unknown:
            raise ValueError(
                f"No site named {sorted(unknown)} in the target; its sites are "
                f"{[s.name for s in target.sites]}."
            )
        blocks = []
        for site in target.sites:
            spec = families.get(site.name, default)
            block = spec if isinstance(spec, Family) else spec(site.size)
            if block.dim != site.size:
                raise ValueError(
                    f"The family for site '{site.name}' has dim={block.dim}, but the site has "
                    f"{site.size} unconstrained values."
                )
            blocks.append(block)
        return cls(blocks)

    @property
    def reparameterized(self) -> bool:  # type: ignore[override]
        return all(b.reparameterized for b in self.blocks)

    def _split(self, z):
        cuts = [sum(self.sizes[:i]) for i in range(1, len(self.sizes))]
        return jnp.split(z, cuts, axis=-1)

    def sample_and_log_prob(self, key, n):
        keys = jax.random.split(key, len(self.blocks))
        outs = [b.sample_and_log_prob(k, n) for b, k in zip(self.blocks, keys)]
        return jnp.concatenate([z for z, _ in outs], -1), sum(lq for _, lq in outs)

    def sample(self, key, n):
        keys = jax.random.split(key, len(self.blocks))
        return jnp.concatenate([b.sample(k, n) for b, k in zip(self.blocks, keys)], -1)

    def log_prob(self, z):
        return sum(b.log_prob(zb) for b, zb in zip(self.blocks, self._split(z)))

    @property
    def mean(self):
        return jnp.concatenate([b.mean for b in self.blocks])

    @property
    def cov(self):
        return jax.scipy.linalg.block_diag(*[b.cov for b in self.blocks])

    @property
    def stddev(self):
        return jnp.concatenate([b.stddev for b in self.blocks])

    @property
    def noise_dim(self) -> int:
        return sum(b.noise_dim for b in self.blocks)

    def transform_and_log_prob(self, eps):
        cuts, acc = [], 0
        for b in self.blocks[:-1]:
            acc += b.noise_dim
            cuts.append(acc)
        outs = [b.transform_and_log_prob(e) for b, e in zip(self.blocks, jnp.split(eps, cuts, -1))]
        return jnp.concatenate([z for z, _ in outs], -1), sum(lq for _, lq in outs)

    def rsvi_draws(self, key, n: int, boost: int = 1):
        keys = jax.random.split(key, len(self.blocks))
        zs, log_pi = [], 0.0
        for b, k in zip(self.blocks, keys):
            if isinstance(b, RejectionSampled):
                z, lp = b.rsvi_draws(k, n, boost)
                log_pi = log_pi + lp
            else:
                z = b.sample(k, n)
            zs.append(z)
        return jnp.concatenate(zs, -1), log_pi + jnp.zeros(n)
