"""Input pipeline throughput and resume cost: the data pipeline alone, host-local batches.

    python -m coca_jax.bench data [--config=configs/demo.py] [--batches=100] [--warmup=10]
        [--resume_steps=0,10000]

Reads the training mixture of the config (the prepared demo data by default; prepares
it on first use) exactly as the trainer does, one host shard of the whole batch, and
times `--batches` batches after `--warmup` (which absorb the shuffle buffer fill and
tf.data's autotuning). Then, for each of `--resume_steps`, the time from opening the
pipeline at that step to its first batch (what a restart from a checkpoint waits), and
how many rows the pipeline decoded meanwhile (the first batch and tf.data's read-ahead;
the skipped rows are read but not decoded, see coca_jax/data/pipeline.py). Prints tables
and a final JSON line; asserts nothing about time. Compare with
`python -m coca_jax.bench step --config=configs/demo.py`: the pipeline must deliver more
examples/s than the train step consumes.
"""

import argparse
import json
import time

import jax

from coca_jax import config as config_lib
from coca_jax import sharding
from coca_jax.bench.step import load_config
from coca_jax.data import loader

PROG = "python -m coca_jax.bench data"


def _mesh():
  return sharding.make_mesh(config_lib.default_mesh(), jax.devices()[:1])


def measure(config, batches: int, warmup: int) -> dict:
  """Host batches of the whole global batch on one device: the pipeline alone."""
  iterator = loader.host_batches(config, _mesh(), "train")
  batch_size = config.data.global_batch_size
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  seconds = time.perf_counter() - start
  return dict(
    batch=batch_size,
    batches=batches,
    seconds=seconds,
    examples_per_s=batches * batch_size / seconds,
  )


def _decoded() -> int:
  """Rows decoded so far in this process by the mixture's pipeline."""
  from coca_jax.data import preprocess

  return preprocess.CALLS["decode"]


def measure_resume(config, start_step: int) -> dict:
  """Seconds from opening the pipeline at `start_step` to its first batch, and the rows
  decoded meanwhile (None for the synthetic source)."""
  mixture = config.data.source == "mixture"
  before = _decoded() if mixture else None
  start = time.perf_counter()
  iterator = loader.host_batches(config, _mesh(), "train", start_step)
  next(iterator)
  seconds = time.perf_counter() - start
  del iterator  # stops the read-ahead before counting
  decoded = _decoded() - before if mixture else None
  return dict(
    step=start_step,
    skipped_rows=start_step * config.data.global_batch_size,
    seconds=seconds,
    decoded_rows=decoded,
  )


def steps_list(text: str) -> list[int]:
  return [int(s) for s in text.split(",") if s.strip()]


def main(argv=None):
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py", help="config file, FILE.py[:ARG]")
  parser.add_argument("--batches", type=int, default=100)
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument(
    "--resume_steps",
    type=steps_list,
    default=steps_list("0,10000"),
    help="comma-separated steps to time a resume at ('' for none)",
  )
  args = parser.parse_args(argv)
  config = loader.resolve(load_config([f"--config={args.config}"], PROG))
  result = measure(config, args.batches, args.warmup)
  print(f"{'config':<20} {'batch':>6} {'batches':>8} {'seconds':>8} {'examples/s':>11}")
  print(
    f"{args.config:<20} {result['batch']:>6} {result['batches']:>8}"
    f" {result['seconds']:>8.2f} {result['examples_per_s']:>11.1f}"
  )
  resumes = [measure_resume(config, step) for step in args.resume_steps]
  if resumes:
    print(f"\n{'resume at step':>14} {'skipped rows':>13} {'s to 1st batch':>15} {'decoded':>8}")
    for r in resumes:
      decoded = "-" if r["decoded_rows"] is None else str(r["decoded_rows"])
      print(f"{r['step']:>14} {r['skipped_rows']:>13} {r['seconds']:>15.2f} {decoded:>8}")
  print(json.dumps(dict(bench="data", config=args.config, **result, resume=resumes)))


if __name__ == "__main__":
  main()
