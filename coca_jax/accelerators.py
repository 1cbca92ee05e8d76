"""Which accelerators this host shows, read from sysfs and device files without starting
JAX's backends (they must wait for jax.distributed.initialize and
host_memory.tune_for_cpu)."""

import glob
import os
import sys

GPU_FILES = ("/dev/nvidia[0-9]*",)


def tpu_present() -> bool:
  """Whether a TPU chip is attached. Not from device file names: v4's /dev/accel<n> and
  v5e's /dev/vfio/<n> also exist without a TPU (Linux's accel subsystem puts NPUs under
  /dev/accel/, VFIO passthrough hosts have /dev/vfio/<n>), and a run that took them for a
  TPU VM would start JAX's distributed runtime and fail to find a coordinator.

  JAX's TPU plugin counts chips this way: PCI devices of Google's vendor id whose device
  id names a TPU generation (sysfs only). jax._src is private; jax is pinned. Imported
  here, not with this module: importing jax before a process has set its JAX_*
  variables (tests/conftest.py: the platform, the compilation cache) would ignore them."""
  from jax._src import hardware_utils

  chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  return chips > 0


def gpu_files() -> list[str]:
  """This host's NVIDIA GPU device files (/dev/nvidia0, ...), one per GPU."""
  return [path for pattern in GPU_FILES for path in glob.glob(pattern)]


def jax_platforms() -> str:
  """jax_platforms: jax's setting where jax is imported, else the JAX_PLATFORMS variable
  (not importing jax, see `tpu_present`); "" where unset."""
  jax = sys.modules.get("jax")
  return (jax.config.jax_platforms if jax else os.environ.get("JAX_PLATFORMS")) or ""


def present() -> bool:
  """Whether a TPU or GPU is attached, and JAX will run on it: jax_platforms does not
  name cpu first ("cpu", "cpu,cuda": JAX's default backend is the CPU)."""
  if jax_platforms().split(",")[0].strip().lower() == "cpu":
    return False
  return tpu_present() or bool(gpu_files())
