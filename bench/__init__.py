"""Benchmarks: ``python -m bench.<name>`` from the repository root; results in
bench/results/. Not part of the test suite."""
