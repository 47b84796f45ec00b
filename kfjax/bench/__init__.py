"""Benchmarks: ``python -m kfjax.bench`` (quality suites) and ``python -m kfjax.bench.throughput``."""
