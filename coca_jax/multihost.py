"""Multi-process start-up: `jax.distributed.initialize()` once, when the run spans processes."""

import os
import re

import jax
from absl import logging

from coca_jax import accelerators, console


def _int_env(name: str) -> int:
  return int(os.environ.get(name, "0") or 0)


def _cluster_detected() -> bool:
  """True on a TPU VM (TPU chips present), in a SLURM step of several tasks (srun) or an
  Open MPI job of several ranks: JAX's own auto-detection then finds the peers (TPU VM
  metadata, SLURM or Open MPI variables); on a single-host TPU VM initialize() finds one
  process. libtpu alone proves nothing: it is installed on CPU hosts too, to compile for
  TPU slices (coca_jax.aot). A SLURM allocation of several tasks whose process srun did
  not start (python run in an `salloc` shell or an sbatch script) is one process, said
  in a warning (JAX's detection failed there with "coordinator_address should be
  defined"); MPICH-style launchers, which JAX does not detect, need the three flags."""
  tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  step_tasks, ompi = _int_env("SLURM_STEP_NUM_TASKS"), _int_env("OMPI_COMM_WORLD_SIZE")
  if _int_env("SLURM_NTASKS") > 1 and not step_tasks:
    logging.warning(
      "SLURM allocation of %s tasks, but srun did not start this process: it runs alone "
      "(start the processes with srun or launch/gpu_multinode.sh)",
      os.environ["SLURM_NTASKS"],
    )
  # srun with Slurm's pmi2 plugin sets PMI_SIZE to the step's task count; JAX's SLURM
  # detection covers it. MPICH's mpiexec inside a job runs its ranks under a step of one
  # helper per node: PMI_SIZE differs from that step's task count.
  pmi = _int_env("PMI_SIZE")
  if pmi > 1 and not ompi and pmi != step_tasks:
    raise ValueError(
      f"launched as one of {pmi} MPI ranks (PMI_SIZE), which JAX does not "
      "detect: pass --coordinator_address, --num_processes and --process_id (every rank "
      "would otherwise train alone into the same workdir)"
    )
  # jax 0.10's Open MPI detection reads OMPI_MCA_orte_hnp_uri, which only Open MPI 4 and
  # earlier (ORTE) set: Open MPI 5's mpirun failed in JAX with "coordinator_address should
  # be defined".
  if ompi > 1 and "OMPI_MCA_orte_hnp_uri" not in os.environ and not step_tasks:
    raise ValueError(
      f"launched as one of {ompi} Open MPI ranks (OMPI_COMM_WORLD_SIZE) without "
      "OMPI_MCA_orte_hnp_uri, as Open MPI 5's mpirun starts them, which JAX detects only "
      "for Open MPI 4 and earlier: pass --coordinator_address, --num_processes and "
      "--process_id (OMPI_COMM_WORLD_RANK)"
    )
  return len(tpu_hosts) > 1 or step_tasks > 1 or ompi > 1 or accelerators.tpu_present()


def slurm_local_device_ids() -> list[int] | None:
  """The GPUs a process started by srun keeps, where JAX's SLURM detection (GPU
  SLURM_LOCALID alone) would be wrong: every GPU of its node when it is the only task
  there (`srun --ntasks-per-node=1` trained on 1 of 8 GPUs per node, silently); every GPU
  the task sees when srun bound GPUs to tasks (`--gpus-per-task`: CUDA_VISIBLE_DEVICES
  lists the task's own, numbered from 0 inside it, so GPU SLURM_LOCALID did not exist,
  CUDA_ERROR_INVALID_DEVICE, or was 1 of the task's 4). None (JAX's choice) otherwise,
  or without GPUs."""
  per_node = []
  for part in os.environ.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if match:
      per_node += [int(match.group(1))] * int(match.group(2) or 1)
  node = _int_env("SLURM_NODEID")
  if node >= len(per_node):
    return None
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  visible = [g for g in visible.split(",") if g.strip()] if visible else None
  if per_node[node] != 1:
    bound = visible and (
      "SLURM_GPUS_PER_TASK" in os.environ or len(visible) < len(accelerators.gpu_files())
    )
    return list(range(len(visible))) if bound else None
  gpus = len(accelerators.gpu_files()) if visible is None else len(visible)
  return list(range(gpus)) if gpus > 1 else None


def initialize(
  coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
  """Initialises JAX's distributed runtime from flags, or by auto-detection on TPU/SLURM."""
  given = [coordinator_address, num_processes, process_id]
  if any(flag is not None for flag in given):  # one alone was ignored
    if any(flag is None for flag in given):
      raise ValueError("--coordinator_address, --num_processes and --process_id go together")
    # Explicit flags say everything: no cluster detection. Under SLURM it would also set
    # local_device_ids = [SLURM_LOCALID], one GPU per process whatever the launcher's
    # CUDA_VISIBLE_DEVICES (launch/gpu_multinode.sh gives each process its GPUs).
    jax.distributed.initialize(
      coordinator_address, num_processes, process_id, cluster_detection_method="deactivate"
    )
  elif _cluster_detected():
    jax.distributed.initialize(local_device_ids=slurm_local_device_ids())
  console.start_backends()
  logging.info(
    "process %d of %d; %d local devices, %d global devices (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
