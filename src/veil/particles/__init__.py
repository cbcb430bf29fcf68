"""Particle methods: a set of points moved together until they stand for the target.

A particle method keeps ``n`` points ``x_1..x_n`` in the target's unconstrained space and moves
them along a direction ``phi(x_i)`` that decreases ``KL(q || p)`` for ``q`` their empirical
distribution. No family is fitted; the particles are the answer.

Two ways in, sharing one update:

- ``state = method.init(key, target, n_particles)``, then ``state, info = method.step(key,
  state)`` in a loop of your own (the BlackJAX shape);
- :func:`run` (``veil.particles.run(target, method, key=..., n_particles=...)``), which runs
  the same update in veil's compiled, chunked driver (:mod:`veil.loop.driver`: progress bar,
  stopping rule, non-finite steps skipped and counted, checkpoints, minibatched targets)
  and returns a :class:`ParticleResult`.

Inside the driver a method is a kernel (:mod:`veil.loop.kernel`) whose step is the method's own
move, exactly as in :meth:`ParticleMethod.step`: the direction ``phi`` and its move (an optax
transformation of ``-phi`` for the gradient methods, ``phi`` itself for the ensemble Kalman
methods); its report is the traced value.
"""


from veil.particles import mirror
from veil.particles.base import OptaxMethod, ParticleMethod, ParticleState, StepInfo, stein_direction, svgd_bandwidth
from veil.particles.ensemble import repulsive_ensemble
from veil.particles.kalman import ALDI, EKI, InverseProblem
from veil.particles.mirrored import SVMD, MirroredSVGD
from veil.particles.result import ParticleResult
from veil.particles.runner import run
from veil.particles.svgd import SVGD, CoinSVGD
from veil.particles.svng import SVNG

__all__ = [
    "ParticleMethod",
    "OptaxMethod",
    "ParticleState",
    "StepInfo",
    "SVGD",
    "CoinSVGD",
    "MirroredSVGD",
    "SVMD",
    "SVNG",
    "InverseProblem",
    "EKI",
    "ALDI",
    "repulsive_ensemble",
    "ParticleResult",
    "run",
    "svgd_bandwidth",
    "stein_direction",
    "mirror",
]
