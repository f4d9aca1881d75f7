"""Coarse-level expert selection: the problem instance, DMO / exhaustive search, and baselines."""
