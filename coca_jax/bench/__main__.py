"""Runs one benchmark: `python -m coca_jax.bench NAME [args]`, NAME one of BENCHMARKS.

python -m coca_jax.bench step --config=configs/tiny.py --steps=5
python -m coca_jax.bench decode --batch_sizes=1,32
python -m coca_jax.bench open_clip --width=128,256,512
python -m coca_jax.bench NAME --help

The PyTorch comparisons (SCRIPTS) live outside the package, in the repository's
benchmarks/ folder, because open_clip needs torch; they run from a source checkout.
"""

import importlib
import runpy
import sys
from pathlib import Path

from coca_jax import console, host_memory

# Name -> what it measures; each is coca_jax/bench/NAME.py with main(argv).
BENCHMARKS = {
  "step": "train-step throughput, model FLOP/s and MFU",
  "decode": "decoding speed: cached vs recompute, open_clip B/32 shapes, bf16, the API",
  "data": "input pipeline throughput",
}
# Name -> (script under benchmarks/, what it measures).
SCRIPTS = {
  "open_clip": ("open_clip.py", "training examples/s vs open_clip's CoCa (PyTorch)"),
  "open_clip_decode": ("open_clip_decode.py", "caption decoding vs open_clip's generate"),
}
SCRIPT_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def usage() -> str:
  lines = ["usage: python -m coca_jax.bench NAME [args]", "", "benchmarks:"]
  lines += [f"  {name:<17} {what}" for name, what in BENCHMARKS.items()]
  lines += [f"  {name:<17} {what}" for name, (_, what) in SCRIPTS.items()]
  return "\n".join(lines)


def run_script(name: str, argv: list[str]) -> None:
  """Runs benchmarks/SCRIPT as __main__ with argv (its folder stays off sys.path: its
  open_clip.py would shadow the open_clip package)."""
  path = SCRIPT_DIR / SCRIPTS[name][0]
  if not path.exists():
    raise SystemExit(f"{name}: {path} is missing; run it from a source checkout of coca_jax")
  sys.argv = [str(path), *argv]
  runpy.run_path(str(path), run_name="__main__")


def main(argv: list[str]) -> None:
  console.quiet(start=False)  # backends after tune_for_cpu
  if not argv or argv[0] in ("-h", "--help"):
    print(usage())
    sys.exit(0 if argv else 2)
  name, rest = argv[0], argv[1:]
  if name not in BENCHMARKS and name not in SCRIPTS:
    known = ", ".join([*BENCHMARKS, *SCRIPTS])
    print(f"unknown benchmark {name!r}; known: {known}\n\n{usage()}", file=sys.stderr)
    sys.exit(2)
  host_memory.tune_for_cpu()  # before JAX's CPU client exists
  console.start_backends()
  if name in SCRIPTS:
    run_script(name, rest)
  else:
    importlib.import_module(f"coca_jax.bench.{name}").main(rest)


if __name__ == "__main__":
  main(sys.argv[1:])
