"""When the trainer starts JAX's distributed runtime on its own: TPU chips or a SLURM job,
never merely because libtpu is installed (CPU hosts install it to compile for pods)."""

from coca_jax import accelerators, multihost


def test_libtpu_alone_starts_no_cluster(tmp_path, monkeypatch):
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  monkeypatch.setattr(accelerators, "TPU_FILES", (str(tmp_path / "accel*"),))
  assert not multihost._cluster_detected()
  (tmp_path / "accel0").touch()  # a TPU VM's chip
  assert multihost._cluster_detected()


def test_slurm_job_or_tpu_worker_list(tmp_path, monkeypatch):
  monkeypatch.setattr(accelerators, "TPU_FILES", (str(tmp_path / "none*"),))
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert multihost._cluster_detected()
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  assert multihost._cluster_detected()


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
