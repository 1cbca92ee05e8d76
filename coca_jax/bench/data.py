"""Input pipeline throughput: examples/s of the seqio mixture alone, host-local batches.

    python -m coca_jax.bench data [--config=configs/demo.py] [--batches=100] [--warmup=10]

Reads the training mixture of the config (the prepared demo data by default; prepares
it on first use) exactly as the trainer does, one host shard of the whole batch, and
times `--batches` batches after `--warmup` (which absorb the shuffle buffer fill and
tf.data's autotuning). Prints a table and a final JSON line; asserts nothing about time.
Compare with `python -m coca_jax.bench step --config=configs/demo.py`: the pipeline
must deliver more examples/s than the train step consumes.
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


def measure(config, batches: int, warmup: int) -> dict:
  """Host batches of the whole global batch on one device: the pipeline alone."""
  mesh = sharding.make_mesh(config_lib.default_mesh(), jax.devices()[:1])
  iterator = loader.host_batches(config, mesh, "train")
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


def main(argv=None):
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py", help="config file, FILE.py[:ARG]")
  parser.add_argument("--batches", type=int, default=100)
  parser.add_argument("--warmup", type=int, default=10)
  args = parser.parse_args(argv)
  config = load_config([f"--config={args.config}"], PROG)
  result = measure(loader.resolve(config), args.batches, args.warmup)
  print(f"{'config':<20} {'batch':>6} {'batches':>8} {'seconds':>8} {'examples/s':>11}")
  print(
    f"{args.config:<20} {result['batch']:>6} {result['batches']:>8}"
    f" {result['seconds']:>8.2f} {result['examples_per_s']:>11.1f}"
  )
  print(json.dumps(dict(bench="data", config=args.config, **result)))


if __name__ == "__main__":
  main()
