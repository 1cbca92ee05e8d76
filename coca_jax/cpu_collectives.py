"""Collectives that cannot deadlock on multi-device CPU clients (8 fake CPU devices, CPU
processes).

Two things hung such programs, and XLA aborts a hung collective after 40 s ("Termination
timeout for `all gather` ..."):
- XLA CPU's concurrency-optimised scheduler may start one program's collectives in a
  different order on different devices. Each collective is a rendezvous of all of them:
  seen on 8 fake devices with the open_clip layout on the demo mixture, device 0 waiting
  in an all-gather while the other 7 waited in an all-reduce. With the scheduler off
  (FLAG) the devices keep program order.
- Too few threads. XLA's thunk executor runs a collective that may block on a thread of
  the client's pool when other work of the same device is ready, and one device can have
  several collectives in flight (one in a `while` body, one outside it). The pool has
  max(cores, devices) threads, one per device on this 2-core machine; once the blocked
  collectives hold them all, the devices they wait for never get one. The demo config on
  8 fake devices (automatic fsdp=8 mesh) stopped in its first step, every time; with
  PJRT_NPROC (which XLA's CPU client reads for the size of its pools) at 9 it still did,
  at 12 it ran. THREADS_PER_DEVICE leaves a margin over that: idle threads cost nothing,
  and 32 threads on 2 cores ran the test suite and the demo's steps as fast as 8.
Which programs hang depends on the whole graph (a different loss formula was enough). A
one-device CPU run has no collectives and keeps XLA's defaults.
"""

import os
import re
import sys

from coca_jax import accelerators

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
# XLA's CPU client sizes its thread pools from the first of these that is set, else from
# the core count (DefaultThreadPoolSize in xla/pjrt/cpu).
POOL_VARIABLES = ("PJRT_NPROC", "NPROC")
THREADS_PER_DEVICE = 4


def cpu_device_count() -> int:
  """How many CPU devices JAX's CPU client will make: jax_num_cpu_devices (the
  JAX_NUM_CPU_DEVICES variable) where set, which wins over XLA_FLAGS'
  --xla_force_host_platform_device_count, else that flag, else 1. Reads the variable
  itself while jax is not imported (importing it here would fix the process's JAX_*
  settings before its caller made them)."""
  jax = sys.modules.get("jax")
  configured = (
    jax.config.jax_num_cpu_devices if jax else int(os.environ.get("JAX_NUM_CPU_DEVICES", -1))
  )
  if configured >= 0:
    return configured
  # The last occurrence counts, as for XLA (tests/conftest.py appends one).
  counts = re.findall(
    r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", "")
  )
  return int(counts[-1]) if counts else 1


def avoid_deadlocks() -> list[str]:
  """When JAX will run on a CPU client of several devices (no accelerator it would use:
  `accelerators.present`): adds FLAG to XLA_FLAGS unless they say something of the
  scheduler, and sets PJRT_NPROC to THREADS_PER_DEVICE threads per device (at least one
  per core) unless PJRT_NPROC or NPROC is set. Returns the names of the variables it
  changed. Must run before JAX's CPU client exists (XLA reads both then)."""
  devices = cpu_device_count()
  if accelerators.present() or devices < 2:
    return []
  changed = []
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    changed.append("XLA_FLAGS")
  if not any(os.environ.get(name) for name in POOL_VARIABLES):
    os.environ["PJRT_NPROC"] = str(max(os.cpu_count() or 1, THREADS_PER_DEVICE * devices))
    changed.append("PJRT_NPROC")
  return changed
