"""Benchmarks: `python -m coca_jax.bench NAME [args]`.

Each prints a table and asserts nothing about time. The PyTorch (open_clip) comparisons
live outside the package, in benchmarks/ (open_clip needs torch);
`python -m coca_jax.bench open_clip` and `... open_clip_decode` run them from a checkout.
"""
