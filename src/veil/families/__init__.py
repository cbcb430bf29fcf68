"""Variational families."""

from veil.families.base import Family, stop_gradient
from veil.families.composite import Composite
from veil.families.constrained import Beta, Dirichlet, Gamma, VonMises
from veil.families.gaussian import FullRank, LowRank, MeanField

__all__ = ["Family", "MeanField", "FullRank", "LowRank", "Gamma", "Beta", "Dirichlet", "VonMises", "Composite", "stop_gradient"]
