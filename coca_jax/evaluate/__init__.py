"""Evaluation: zero-shot classification, retrieval, captioning, frozen features.

`run(predictor, config, *, step, workdir, writer)` (suite.py) runs the evals of
config.eval on a model's prediction functions (coca_jax.predict.Predictor); `report` and
`chance_levels` format the results. Evaluators never import the serving API.
"""

from coca_jax.evaluate.suite import chance_levels, enabled_evals, report, run

__all__ = ["chance_levels", "enabled_evals", "report", "run"]
