"""Reproducible measurements, each a script printing a table and writing JSON under
``benchmarks/results/``, run from the repository root (``python benchmarks/<name>.py``),
and the helper modules they share."""
