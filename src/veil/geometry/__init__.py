"""Methods that move a Gaussian ``q`` by the geometry of the target rather than by stochastic
gradients of an objective alone: Pathfinder's quasi-Newton path (``pathfinder``), variational
Newton (``newton``), forward-backward Gaussian VI in the Wasserstein geometry (``fbgvi``) and
deterministic ADVI's sample-average Newton solve (``dadvi``). They share the Gaussian family
helpers of ``veil.families.gaussian`` and return results built on ``veil.result``.

The package re-exports nothing: each function shares its module's name, and the public
spellings are ``veil.pathfinder``, ``veil.variational_newton``, ``veil.fbgvi`` and
``veil.dadvi``, ``veil.laplace``.
"""
