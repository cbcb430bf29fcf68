"""Studies of veil against itself: settings, costs, alternatives tried (docs/benchmarks/)."""
