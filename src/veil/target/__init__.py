"""Targets: what veil approximates.

:class:`Target` (``core``) is a log density on unconstrained ``R^dim`` and the map back to
named constrained values, built from a plain function, a NumPyro model, a PyMC model
(``pymc``) or a Stan program (``stan``); ``health`` checks a log density before a fit and a
finished fit's ``q`` against it. The package imports the loop's batch sources and nothing
above them.
"""

from veil.target.core import Site, Target, log_density_rows

__all__ = ["Target", "Site", "log_density_rows"]
