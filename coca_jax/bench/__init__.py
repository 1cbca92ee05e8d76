"""Benchmarks: `python -m coca_jax.bench NAME [args]`.

Each prints a table and asserts nothing about time. The PyTorch (open_clip) comparison,
which installs torch into its own virtualenv, lives outside the package:
`python benchmarks/open_clip.py`.
"""
