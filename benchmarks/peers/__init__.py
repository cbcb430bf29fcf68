"""Benchmarks of veil beside other tools on the same work (the headline rows of BENCHMARKS.md)."""
