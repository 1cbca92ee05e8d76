"""Benchmarks: `python -m coca_jax.bench NAME [args]`; each prints a table and asserts nothing about time."""
