"""veil: variational approximation in JAX.

    >>> import jax, veil
    >>> target = veil.Target.from_logdensity(lambda z: -0.5 * (z @ z), dim=3)
    >>> res = veil.fit(target, veil.FullRank(3), key=jax.random.key(0), progress=False)
    >>> res.q.mean.shape
    (3,)
"""

from veil._config import enable_compilation_cache as _enable_compilation_cache
from veil.diagnostics import StopRule, khat_verdict, psis_khat
from veil.estimators import (
    IID,
    STL,
    DReG,
    Draws,
    Estimator,
    MovingAverage,
    Noise,
    RSVI,
    Reparam,
    ScoreFunction,
    Sobol,
    Stratified,
    Unscented,
)
from veil.families import (
    Beta,
    Composite,
    Delta,
    Dirichlet,
    Family,
    Flow,
    FlowJAX,
    FullRank,
    Gamma,
    Guide,
    HierarchicalGaussian,
    LowRank,
    MAP,
    MeanField,
    MixFlow,
    Mixture,
    Poisson,
    SemiImplicit,
    VonMises,
    flows,
)
from veil.geometry.dadvi import DADVIResult, dadvi
from veil.fit import default_optimizer, fit
from veil.geometry.fbgvi import fbgvi
from veil.geometry.laplace import laplace
from veil.local import Amortized, LocalResult, PerDatum, Structured
from veil.loop.checkpoint import Checkpoint
from veil.mixflow import MixFlowResult, mixflow
from veil.objectives import (
    ELBO,
    IWAE,
    ChiSquare,
    ForwardKL,
    FunctionObjective,
    MMD,
    Objective,
    ObjectiveAux,
    Renyi,
    SumObjective,
    WeightObjective,
    estimate,
    log_mean_exp,
)
from veil.geometry.newton import NewtonResult, variational_newton
from veil.geometry.pathfinder import PathfinderResult, pathfinder
from veil.result import LogEvidence, NotApplicable, Result, Summary, VIResult
from veil.target import Target
from veil import demo, families, fusion, geometry, kernels, loop, optim, particles
from veil.geometry import fbgvi as gaussian  # the module's name before issue 30 (veil.gaussian.fbgvi)
from veil.loop import batching
from veil.particles import mirror

__version__ = "0.1.0"

_enable_compilation_cache()

__all__ = [
    "Target",
    "dadvi",
    "DADVIResult",
    "Family",
    "MeanField",
    "FullRank",
    "LowRank",
    "HierarchicalGaussian",
    "Gamma",
    "Beta",
    "Dirichlet",
    "VonMises",
    "Poisson",
    "Composite",
    "Mixture",
    "SemiImplicit",
    "MixFlow",
    "Delta",
    "MAP",
    "Guide",
    "PerDatum",
    "Amortized",
    "Structured",
    "LocalResult",
    "MixFlowResult",
    "mixflow",
    "Flow",
    "FlowJAX",
    "flows",
    "Objective",
    "ObjectiveAux",
    "WeightObjective",
    "ELBO",
    "IWAE",
    "Renyi",
    "ChiSquare",
    "ForwardKL",
    "log_mean_exp",
    "estimate",
    "FunctionObjective",
    "MMD",
    "SumObjective",
    "kernels",
    "particles",
    "mirror",
    "optim",
    "gaussian",
    "fbgvi",
    "laplace",
    "geometry",
    "loop",
    "Checkpoint",
    "families",
    "fusion",
    "batching",
    "Estimator",
    "Reparam",
    "STL",
    "DReG",
    "ScoreFunction",
    "Stratified",
    "Unscented",
    "RSVI",
    "Noise",
    "IID",
    "MovingAverage",
    "Sobol",
    "Draws",
    "StopRule",
    "fit",
    "pathfinder",
    "PathfinderResult",
    "variational_newton",
    "NewtonResult",
    "default_optimizer",
    "VIResult",
    "Result",
    "NotApplicable",
    "Summary",
    "LogEvidence",
    "psis_khat",
    "khat_verdict",
    "demo",
]
