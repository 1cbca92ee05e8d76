"""When the trainer starts JAX's distributed runtime on its own: TPU chips or a SLURM job,
never merely because libtpu is installed (CPU hosts install it to compile for pods)."""

from coca_jax import multihost


def test_libtpu_alone_starts_no_cluster(tmp_path, monkeypatch):
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  monkeypatch.setattr(multihost, "TPU_DEVICE_FILES", (str(tmp_path / "accel*"),))
  assert not multihost._cluster_detected()
  (tmp_path / "accel0").touch()  # a TPU VM's chip
  assert multihost._cluster_detected()


def test_slurm_job_or_tpu_worker_list(tmp_path, monkeypatch):
  monkeypatch.setattr(multihost, "TPU_DEVICE_FILES", (str(tmp_path / "none*"),))
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert multihost._cluster_detected()
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  assert multihost._cluster_detected()
