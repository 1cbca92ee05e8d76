"""When the trainer starts JAX's distributed runtime on its own: TPU chips or a SLURM job,
never merely because libtpu is installed (CPU hosts install it to compile for pods)."""

import glob

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
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert multihost._cluster_detected()
  monkeypatch.setenv("SLURM_NTASKS", "1")
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
