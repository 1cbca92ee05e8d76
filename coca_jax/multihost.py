"""Multi-process start-up: `jax.distributed.initialize()` once, when the run spans processes."""

import os

import jax
from absl import logging

from coca_jax import accelerators, console


def _cluster_detected() -> bool:
  """True on a TPU VM (TPU chips present) or in a multi-task SLURM job: JAX's own
  auto-detection then finds the peers (TPU VM metadata, SLURM variables); on a
  single-host TPU VM initialize() finds one process. libtpu alone proves nothing: it is
  installed on CPU hosts too, to compile for TPU slices (coca_jax.aot)."""
  tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
  return len(tpu_hosts) > 1 or slurm_tasks > 1 or accelerators.tpu_present()


def initialize(
  coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
  """Initialises JAX's distributed runtime from flags, or by auto-detection on TPU/SLURM."""
  if coordinator_address or (num_processes or 1) > 1:
    if coordinator_address is None or num_processes is None or process_id is None:
      raise ValueError("--coordinator_address, --num_processes and --process_id go together")
    # Explicit flags say everything: no cluster detection. Under SLURM it would also set
    # local_device_ids = [SLURM_LOCALID], one GPU per process whatever the launcher's
    # CUDA_VISIBLE_DEVICES (launch/gpu_multinode.sh gives each process its GPUs).
    jax.distributed.initialize(
      coordinator_address, num_processes, process_id, cluster_detection_method="deactivate"
    )
  elif _cluster_detected():
    jax.distributed.initialize()
  console.start_backends()
  logging.info(
    "process %d of %d; %d local devices, %d global devices (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
