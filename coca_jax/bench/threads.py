"""`--threads` of the PyTorch comparisons: torch threads within this process's CPUs.

XLA's CPU backend sizes its thread pool by the process's affinity mask (`taskset -c 1`
gives it one thread; measured: one tf_XLAEigen thread pinned, two unpinned, on the
2-core dev machine), not by the machine's core count. The open_clip side must get the
same cores, so the default is the mask's size (os.sched_getaffinity), not os.cpu_count():
`taskset -c 1 python -m coca_jax.bench open_clip_decode` gave torch 2 threads on 1 core.
An explicit `--threads` above the mask is refused: those threads would share cores,
which slows torch's OpenMP side more than XLA's (README, "Decoding speed": open_clip's
threads ran 3-5x slower beside another job) and skews the ratio the benchmark reports.
"""

import argparse
import os


def usable_cpus() -> int:
  """CPUs this process may run on: its affinity mask (taskset, a cgroup cpuset)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1  # macOS, Windows: no affinity mask to read


def threads_arg(text: str) -> int:
  """argparse type of `--threads`: 1 .. usable_cpus()."""
  threads = int(text)
  cpus = usable_cpus()
  if threads < 1:
    raise argparse.ArgumentTypeError(f"{threads}: at least 1")
  if threads > cpus:
    raise argparse.ArgumentTypeError(
      f"{threads} is more than the {cpus} CPU(s) this process may run on (os.sched_getaffinity), "
      f"which XLA's side uses; torch threads beyond them would share cores and skew the "
      f"comparison. Use at most {cpus}, or widen `taskset -c`"
    )
  return threads


def add_flag(parser: argparse.ArgumentParser) -> None:
  """`--threads`: default every CPU of the affinity mask, XLA's side's thread count."""
  parser.add_argument(
    "--threads",
    type=threads_arg,
    default=usable_cpus(),
    help="torch threads: at most, and by default, the CPUs this process may run on "
    "(its affinity mask, e.g. `taskset -c`), as many as XLA's side uses",
  )
