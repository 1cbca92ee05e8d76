"""glibc malloc settings that stop XLA's CPU backend from page-faulting every step.

XLA's CPU runtime allocates each execution's temporaries as one block (638 MB for the
`benchmarks/open_clip.py` model at batch 32) from its own threads, and glibc serves a
block that large from a fresh mmap and unmaps it on free: every step then touches
~156,000 new 4 KiB pages (measured with /usr/bin/time: 3.75M minor faults in 22 steps),
about 10% of that step. With one arena, no mmap and a high trim threshold, the block is
reused from the heap: 0.82 -> 0.73 s per step on the 2-core dev machine.

glibc reads these settings when a thread first allocates, so `tune_for_cpu` must run
before JAX creates its CPU client (the first `jax.devices()` or computation); importing
jax before is fine. Accelerator hosts keep glibc's defaults: their step temporaries live
in device memory, and one arena would serialise the input pipeline's many threads.
"""

import ctypes
import ctypes.util
import os

from coca_jax import accelerators

# mallopt(3) parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Free heap above this is returned to the OS (mallopt takes an int: at most 2 GiB - 1).
_TRIM_THRESHOLD = 2**31 - 1


def tune_for_cpu() -> bool:
  """Applies the settings above on a CPU-only glibc host; returns whether it did.

  Leaves the allocator alone where the user set any MALLOC_* variable (their choice
  wins), off glibc, and on accelerator hosts.
  """
  if accelerators.present() or any(name.startswith("MALLOC_") for name in os.environ):
    return False
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS)
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(
    mallopt(param, value) == 1
    for param, value in (
      (_M_ARENA_MAX, 1),
      (_M_MMAP_MAX, 0),
      (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
    )
  )


def environment() -> dict[str, str]:
  """The same settings as glibc environment variables, for a child process (mallopt does
  not carry over; `benchmarks/` gives them to the open_clip worker so that both sides of
  a comparison run with one allocator policy); {} where `tune_for_cpu` would not apply."""
  if accelerators.present() or any(name.startswith("MALLOC_") for name in os.environ):
    return {}
  return {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD),
  }
