"""Benchmarks of streamtrainer: ``python -m bench.run --quick`` (see bench/README.md)."""
