"""Shared by the benchmark recipe configs of this folder (not a config file itself)."""

import ml_collections

from coca_jax import config as config_lib


def benchmark_config(datasets: str, known: tuple[str, ...]) -> ml_collections.ConfigDict:
  """A config whose `eval` section runs the benchmarks `datasets` (comma-separated, each
  one of `known`) on whole splits."""
  names = [n.strip() for n in datasets.split(",") if n.strip()]
  unknown = sorted(set(names) - set(known))
  if not names or unknown:
    raise ValueError(f"config argument {datasets!r}: expected one or more of {', '.join(known)}")
  c = ml_collections.ConfigDict()
  c.eval = config_lib.eval_config()
  c.eval.evals = ",".join(names)
  c.eval.num_examples = 0  # the whole split
  c.eval.batch_size = 256
  return c
