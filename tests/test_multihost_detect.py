"""When the trainer starts JAX's distributed runtime on its own: TPU chips or a SLURM job,
never merely because libtpu is installed (CPU hosts install it to compile for pods)."""

import glob

import pytest

from coca_jax import accelerators, multihost


def fake_pci(monkeypatch, root, devices):
  """`devices`, (vendor, device) id pairs, as the sysfs PCI tree JAX's chip count reads."""
  for i, (vendor, device) in enumerate(devices):
    folder = root / f"0000:00:{i:02x}.0"
    folder.mkdir(parents=True)
    (folder / "vendor").write_text(vendor + "\n")
    (folder / "device").write_text(device + "\n")
  real_glob = glob.glob
  monkeypatch.setattr(
    glob, "glob", lambda p, **kw: real_glob(p.replace("/sys/bus/pci/devices", str(root)), **kw)
  )


def test_libtpu_alone_starts_no_cluster(tmp_path, monkeypatch):
  """A GCE VM's Google PCI devices that are not TPUs (gVNIC 0x0042, NVMe 0x001f) and an
  Intel NPU (the /dev/accel/ kind) start nothing; a v4 chip (0x005e) does."""
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  fake_pci(
    monkeypatch, tmp_path / "vm", [("0x1ae0", "0x0042"), ("0x1ae0", "0x001f"), ("0x8086", "0x7d1d")]
  )
  assert not accelerators.tpu_present() and not multihost._cluster_detected()
  fake_pci(monkeypatch, tmp_path / "tpu_vm", [("0x1ae0", "0x0042"), ("0x1ae0", "0x005e")])
  assert accelerators.tpu_present() and multihost._cluster_detected()


def test_slurm_job_or_tpu_worker_list(monkeypatch):
  monkeypatch.setattr(accelerators, "tpu_present", lambda: False)
  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # a process srun started
  assert multihost._cluster_detected()
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  assert multihost._cluster_detected()
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  assert not multihost._cluster_detected()


def test_explicit_flags_under_slurm_keep_every_local_gpu(tmp_path):
  """With --coordinator_address etc. JAX's SLURM detection must not narrow the process to
  GPU SLURM_LOCALID (jax_cuda_visible_devices "3" here; every process saw one GPU)."""
  import os
  import subprocess
  import sys

  from tiny_runs import free_port

  env = dict(os.environ, SLURM_JOB_ID="1", SLURM_LOCALID="3", SLURM_PROCID="0")
  env.update(SLURM_NTASKS="1", SLURM_STEP_NODELIST="localhost", SLURM_NODELIST="localhost")
  code = (
    "from jax._src import config; from coca_jax import multihost; "
    f"multihost.initialize('localhost:{free_port()}', 1, 0); "
    "print('visible', config.config.read('jax_cuda_visible_devices'))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "visible all" in out.stdout, out.stdout


def slurm_env(monkeypatch, **values):
  for name in (
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_NODEID",
    "SLURM_LOCALID",
    "SLURM_GPUS_PER_TASK",
    "CUDA_VISIBLE_DEVICES",
    "PMI_SIZE",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_MCA_orte_hnp_uri",
    "TPU_WORKER_HOSTNAMES",
  ):
    monkeypatch.delenv(name, raising=False)
  for name, value in values.items():
    monkeypatch.setenv(name, value)


def test_a_slurm_allocation_without_srun_runs_one_process(monkeypatch, caplog):
  """In an `salloc -n 4` shell (or an sbatch script running python itself) SLURM_NTASKS
  describes the allocation, not the processes started: JAX's detection then failed with
  "coordinator_address should be defined"."""
  monkeypatch.setattr(accelerators, "tpu_present", lambda: False)
  slurm_env(monkeypatch, SLURM_NTASKS="4")
  with caplog.at_level("WARNING"):
    assert not multihost._cluster_detected()
  assert "srun did not start this process: it runs alone" in caplog.text
  slurm_env(monkeypatch, SLURM_NTASKS="4", SLURM_STEP_NUM_TASKS="4")
  assert multihost._cluster_detected()
  # JAX detects Open MPI 4 itself (test_open_mpi_5_ranks_are_named_not_left_to_jax).
  slurm_env(monkeypatch, OMPI_COMM_WORLD_SIZE="16", OMPI_MCA_orte_hnp_uri="1.0;tcp://a:1")
  assert multihost._cluster_detected()
  slurm_env(monkeypatch, PMI_SIZE="16")  # MPICH: every rank trained alone, same workdir
  with pytest.raises(ValueError, match="16 MPI ranks .* pass --coordinator_address"):
    multihost._cluster_detected()


def test_srun_with_one_task_per_node_keeps_every_gpu(monkeypatch):
  """JAX's SLURM detection narrows a process to GPU SLURM_LOCALID: `srun
  --ntasks-per-node=1` on 8-GPU nodes trained on 1 GPU per node, silently."""
  slurm_env(
    monkeypatch,
    SLURM_STEP_TASKS_PER_NODE="1(x4)",
    SLURM_NODEID="2",
    CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7",
  )
  assert multihost.slurm_local_device_ids() == list(range(8))
  slurm_env(monkeypatch, SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_NODEID="1")
  assert multihost.slurm_local_device_ids() is None  # one task per GPU: JAX's choice
  slurm_env(monkeypatch, SLURM_STEP_TASKS_PER_NODE="2,1", SLURM_NODEID="1")
  monkeypatch.setattr(accelerators, "gpu_files", lambda: [f"/dev/nvidia{i}" for i in range(4)])
  assert multihost.slurm_local_device_ids() == [0, 1, 2, 3]
  slurm_env(monkeypatch)  # not under srun
  assert multihost.slurm_local_device_ids() is None


def test_srun_with_gpus_bound_to_tasks_keeps_the_tasks_gpus(monkeypatch):
  """srun --gpus-per-task gives each task its own GPUs in CUDA_VISIBLE_DEVICES, numbered
  from 0 in the task: JAX's [SLURM_LOCALID] named GPU 3 of a task that has one GPU
  (CUDA_ERROR_INVALID_DEVICE), or drove 1 of a task's 4 (review helper-83)."""
  eight = [f"/dev/nvidia{i}" for i in range(8)]

  def task(tasks_per_node, localid, visible, gpu_files=eight, **more):
    monkeypatch.setattr(accelerators, "gpu_files", lambda: gpu_files)
    slurm_env(
      monkeypatch,
      SLURM_STEP_TASKS_PER_NODE=f"{tasks_per_node}(x2)",
      SLURM_NODEID="1",
      SLURM_LOCALID=str(localid),
      CUDA_VISIBLE_DEVICES=visible,
      **more,
    )
    return multihost.slurm_local_device_ids()

  assert task(8, 3, "3") == [0]  # --ntasks-per-node=8 --gpus-per-task=1
  assert task(2, 1, "4,5,6,7") == [0, 1, 2, 3]  # --ntasks-per-node=2 --gpus-per-task=4
  # Slurm says so itself where the node's GPU files are not visible (a container).
  assert task(2, 1, "4,5,6,7", gpu_files=[], SLURM_GPUS_PER_TASK="4") == [0, 1, 2, 3]
  # No binding (--gpus-per-node=8, every task sees all 8): JAX's one GPU per task.
  assert task(8, 3, "0,1,2,3,4,5,6,7") is None


def test_one_multi_process_flag_alone_is_an_error():
  """--process_id=3 alone was ignored: the process ran as process 0 of 1."""
  with pytest.raises(ValueError, match="go together"):
    multihost.initialize(None, None, 3)


def test_srun_with_slurms_pmi2_plugin_is_a_slurm_launch(monkeypatch):
  """Slurm's pmi2 plugin sets PMI_SIZE on every task srun starts: that was taken for an
  MPI launch JAX does not detect, and the run stopped with an error."""
  monkeypatch.setattr(accelerators, "tpu_present", lambda: False)
  monkeypatch.delenv("OMPI_COMM_WORLD_SIZE", raising=False)
  monkeypatch.setenv("SLURM_NTASKS", "2")
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
  monkeypatch.setenv("PMI_SIZE", "2")
  assert multihost._cluster_detected()
  # MPICH's mpiexec inside a job: one srun helper per node (2), 8 ranks: the error.
  monkeypatch.setenv("PMI_SIZE", "8")
  with pytest.raises(ValueError, match="PMI_SIZE"):
    multihost._cluster_detected()
  monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
  monkeypatch.delenv("SLURM_NTASKS")
  with pytest.raises(ValueError, match="PMI_SIZE"):  # MPICH's mpirun alone: still the error
    multihost._cluster_detected()


def test_open_mpi_5_ranks_are_named_not_left_to_jax(monkeypatch):
  """Open MPI 5's mpirun sets no OMPI_MCA_orte_hnp_uri, which jax 0.10's detection needs:
  the run failed inside JAX with "coordinator_address should be defined"."""
  monkeypatch.setattr(accelerators, "tpu_present", lambda: False)
  for name in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "PMI_SIZE", "OMPI_MCA_orte_hnp_uri"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
  with pytest.raises(ValueError, match="Open MPI 5's mpirun .* --coordinator_address"):
    multihost._cluster_detected()
  monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
  assert multihost._cluster_detected()  # Open MPI 4: JAX's own detection
