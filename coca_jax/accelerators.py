"""Which accelerators this host shows, read from device files without starting JAX (its
backends must wait for jax.distributed.initialize and host_memory.tune_for_cpu)."""

import glob
import os

# TPU VMs: /dev/accel* (v2-v4), /dev/vfio/<n> (v5e and later).
TPU_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")
GPU_FILES = ("/dev/nvidia[0-9]*",)


def _any(patterns) -> bool:
  return any(glob.glob(pattern) for pattern in patterns)


def tpu_present() -> bool:
  """Whether a TPU chip's device file exists."""
  return _any(TPU_FILES)


def present() -> bool:
  """Whether a TPU or GPU device file exists, and JAX_PLATFORMS does not say cpu."""
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return False
  return _any(TPU_FILES + GPU_FILES)
