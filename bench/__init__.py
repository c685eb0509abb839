"""Benchmarks: run each as ``python -m bench.<name>``; figures are kept in ``bench/RESULTS.md``."""
