"""Benchmarks: `python -m benchmarks.benchmark --help`."""
