"""Evaluation: zero-shot classification, retrieval, captioning, frozen features.

The trainer's entry point is `run(model, config, *, step, workdir, writer)` (see
`suite.py`); `report` and `chance_levels` format the results. They are imported lazily
so that loading a config (which reads `evaluate.config`) does not import JAX.
"""

_SUITE = ("run", "report", "chance_levels", "decode_options", "enabled_evals", "eval_sets")


def __getattr__(name):
  if name in _SUITE:
    from coca_jax.evaluate import suite

    return getattr(suite, name)
  raise AttributeError(f"module 'coca_jax.evaluate' has no attribute {name!r}")
