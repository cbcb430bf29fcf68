"""Variational families."""

from veil.families.base import Family, stop_gradient
from veil.families.gaussian import FullRank, LowRank, MeanField

__all__ = ["Family", "MeanField", "FullRank", "LowRank", "stop_gradient"]
