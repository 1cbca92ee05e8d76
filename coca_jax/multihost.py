"""Multi-process start-up: `jax.distributed.initialize()` once, when the run spans processes."""

import importlib.util
import os

import jax
from absl import logging


def _cluster_detected() -> bool:
  """True on a TPU VM (libtpu installed) or in a multi-task SLURM job: JAX's own
  auto-detection then finds the peers (TPU VM metadata, SLURM variables). On a TPU VM
  the worker list lives in the instance metadata, not always in the environment, so the
  presence of libtpu decides; on a single-host TPU VM initialize() finds one process."""
  tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
  return len(tpu_hosts) > 1 or slurm_tasks > 1 or importlib.util.find_spec("libtpu") is not None


def initialize(
  coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
  """Initialises JAX's distributed runtime from flags, or by auto-detection on TPU/SLURM."""
  if coordinator_address or (num_processes or 1) > 1:
    if coordinator_address is None or num_processes is None or process_id is None:
      raise ValueError("--coordinator_address, --num_processes and --process_id go together")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _cluster_detected():
    jax.distributed.initialize()
  logging.info(
    "process %d of %d; %d local devices, %d global devices (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
