"""In-order collectives for multi-device CPU programs (8 fake CPU devices, CPU processes).

XLA CPU's concurrency-optimised scheduler may start one program's collectives in a
different order on different devices. Each collective is a rendezvous of all of them, so
such a program hangs, and XLA aborts it after 40 s ("Termination timeout for `all
reduce ...`"): seen on 8 fake devices with the open_clip layout on the demo mixture,
device 0 waiting in an all-gather while the other 7 waited in an all-reduce. Which
programs hang depends on the whole graph (a different loss formula was enough). With the
scheduler off the devices keep program order. A one-device CPU run has no collectives
and keeps the default.
"""

import os
import re
import sys

from coca_jax import accelerators

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


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


def keep_in_order() -> bool:
  """Adds FLAG to XLA_FLAGS when JAX will run on a CPU client of several devices (no
  accelerator it would use: `accelerators.present`) and the flags say nothing of the
  scheduler; returns whether it did. Must run before JAX's CPU client exists (XLA reads
  the flags then)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if accelerators.present() or cpu_device_count() < 2:
    return False
  if "xla_cpu_enable_concurrency_optimized_scheduler" in flags:
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
  return True
