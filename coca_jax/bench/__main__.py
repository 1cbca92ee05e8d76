"""Runs one benchmark: `python -m coca_jax.bench NAME [args]`, NAME one of BENCHMARKS.

python -m coca_jax.bench step --config=configs/tiny.py --steps=5
python -m coca_jax.bench decode --batch_sizes=1,32
python -m coca_jax.bench NAME --help

The PyTorch comparison (open_clip's CoCa) is not one of them: `python benchmarks/open_clip.py`
from the repository root.
"""

import importlib
import sys

from coca_jax import console

# Name -> what it measures; each is coca_jax/bench/NAME.py with main(argv).
BENCHMARKS = {
  "step": "train-step throughput, model FLOP/s and MFU",
  "decode": "decoding speed: cached vs recompute, open_clip B/32 shapes, bf16, the API",
  "data": "input pipeline throughput",
}


def usage() -> str:
  lines = ["usage: python -m coca_jax.bench NAME [args]", "", "benchmarks:"]
  lines += [f"  {name:<10} {what}" for name, what in BENCHMARKS.items()]
  lines += [
    "",
    "training throughput vs open_clip's CoCa (PyTorch), from the repository root:",
    "  python benchmarks/open_clip.py [args]",
  ]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  console.quiet()
  if not argv or argv[0] in ("-h", "--help"):
    print(usage())
    sys.exit(0 if argv else 2)
  name, rest = argv[0], argv[1:]
  if name not in BENCHMARKS:
    print(
      f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}\n\n{usage()}", file=sys.stderr
    )
    sys.exit(2)
  importlib.import_module(f"coca_jax.bench.{name}").main(rest)


if __name__ == "__main__":
  main(sys.argv[1:])
