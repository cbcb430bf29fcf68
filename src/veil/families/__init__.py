"""Variational families."""

from veil.family import Family, stop_gradient
from veil.families.composite import Composite
from veil.families.empirical import Empirical
from veil.families.constrained import Beta, Dirichlet, Gamma, Poisson, VonMises
from veil.families.gaussian import FullRank, LowRank, MeanField
from veil.families.flows import Flow, FlowJAX
from veil.families.hierarchical import HierarchicalGaussian
from veil.families import flows
from veil.families.mixture import Mixture
from veil.families.semi_implicit import SemiImplicit
from veil.families.mixflows import MixFlow
from veil.families.point import MAP, Delta
from veil.families.program import Guide

__all__ = [
    "Family", "MeanField", "FullRank", "LowRank", "HierarchicalGaussian", "Gamma", "Beta", "Dirichlet", "VonMises", "Poisson",
    "Empirical", "Composite", "Flow", "FlowJAX", "flows", "Mixture", "SemiImplicit", "MixFlow", "Delta", "MAP", "Guide",
    "stop_gradient",
]
