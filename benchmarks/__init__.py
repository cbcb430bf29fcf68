"""veil's benchmarks: ``peers/`` compares veil with other tools on the same work, ``studies/``
measures veil against itself (settings, costs, what was tried); ``common`` holds what they share.
Run them from the repository root as modules: ``python -m benchmarks.peers.engine_overhead``."""
