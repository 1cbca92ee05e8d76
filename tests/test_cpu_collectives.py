"""cpu_collectives.avoid_deadlocks: the scheduler flag goes into XLA_FLAGS, and PJRT_NPROC
gets threads for every device, exactly when they ask for several CPU devices and do not
choose these themselves; a program that deadlocked on 8 fake devices runs."""

import os
import pathlib
import subprocess
import sys

import pytest

from coca_jax import accelerators, cpu_collectives

REPO = pathlib.Path(__file__).parents[1]


@pytest.fixture
def no_pool_size(monkeypatch):
  """conftest.py's call already set PJRT_NPROC for this process."""
  for name in cpu_collectives.POOL_VARIABLES:
    monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
  "flags,added",
  [
    ("--xla_force_host_platform_device_count=8", True),
    ("--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=4", True),
    ("--xla_force_host_platform_device_count=1", False),
    # XLA takes the last of a repeated flag (tests/conftest.py appends one).
    ("--xla_force_host_platform_device_count=1 --xla_force_host_platform_device_count=4", True),
    ("", False),
  ],
)
def test_set_only_for_several_cpu_devices(monkeypatch, no_pool_size, flags, added):
  monkeypatch.setattr(accelerators, "present", lambda: False)
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  monkeypatch.setenv("XLA_FLAGS", flags)
  assert cpu_collectives.avoid_deadlocks() == (["XLA_FLAGS", "PJRT_NPROC"] if added else [])
  assert os.environ["XLA_FLAGS"] == (f"{flags} {cpu_collectives.FLAG}".strip() if added else flags)
  devices = 8 if flags.endswith("=8") else 4
  assert os.environ.get("PJRT_NPROC") == (str(4 * devices) if added else None)


def test_their_own_choices_are_kept(monkeypatch, no_pool_size):
  monkeypatch.setattr(accelerators, "present", lambda: False)
  monkeypatch.setattr(os, "cpu_count", lambda: 64)
  flags = "--xla_force_host_platform_device_count=8"
  monkeypatch.setenv("XLA_FLAGS", f"{flags} --xla_cpu_enable_concurrency_optimized_scheduler=true")
  assert cpu_collectives.avoid_deadlocks() == ["PJRT_NPROC"]
  assert os.environ["PJRT_NPROC"] == "64"  # never fewer threads than cores
  monkeypatch.setenv("XLA_FLAGS", flags)
  monkeypatch.setenv("NPROC", "3")
  monkeypatch.delenv("PJRT_NPROC")
  assert cpu_collectives.avoid_deadlocks() == ["XLA_FLAGS"]
  assert "PJRT_NPROC" not in os.environ


@pytest.mark.parametrize(
  "platforms,added",
  [("", False), ("cuda", False), ("tpu,cpu", False), ("cpu", True), ("cpu,cuda", True)],
)
def test_accelerator_hosts_keep_their_settings_unless_jax_runs_on_the_cpu(
  monkeypatch, no_pool_size, platforms, added
):
  """A GPU host keeps its flags, except where jax_platforms puts JAX on the CPU first
  ("cpu" alone, the tests' setting, or first of a list: JAX's default backend is then
  the CPU, whose devices' collectives hang as on any CPU host; accelerators.present)."""
  monkeypatch.setattr(accelerators, "jax_platforms", lambda: platforms)
  monkeypatch.setattr(accelerators, "tpu_present", lambda: False)
  monkeypatch.setattr(accelerators, "gpu_files", lambda: ["/dev/nvidia0"])
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert bool(cpu_collectives.avoid_deadlocks()) == added


def environment(**variables) -> dict:
  """This process's environment without what conftest.py and avoid_deadlocks set."""
  env = {
    k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", *cpu_collectives.POOL_VARIABLES)
  }
  env.update(JAX_PLATFORMS="cpu", **variables)
  return env


@pytest.mark.parametrize("count,added", [("8", True), ("1", False)])
def test_jax_num_cpu_devices_counts_too(count, added):
  """JAX_NUM_CPU_DEVICES makes the devices without XLA_FLAGS (and wins over them)."""
  env = environment(JAX_NUM_CPU_DEVICES=count)
  if count == "1":
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  code = (
    "import os, jax; from coca_jax import cpu_collectives as c; "
    "print(bool(c.avoid_deadlocks()), c.FLAG in os.environ.get('XLA_FLAGS', ''), "
    "'PJRT_NPROC' in os.environ, len(jax.devices()))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120
  ).stdout.split()
  assert out == [str(added), str(added), str(added), count]


@pytest.mark.slow
def test_the_demo_model_trains_on_8_cpu_devices(tmp_path):
  """configs/demo.py's first steps on 8 fake CPU devices (automatic mesh: fsdp=8), with
  XLA's defaults otherwise: with one pool thread per device two of its collectives held
  them all, and XLA aborted the process at its collective timeout (here 20 s), in the
  first step every time (3 of 3 runs)."""
  env = environment(
    XLA_FLAGS="--xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=20"
  )
  args = [
    "--config=configs/demo.py",
    f"--workdir={tmp_path}",
    "--config.data.source=synthetic",
    "--config.train.steps=2",
    "--config.train.eval_every=0",
    "--config.eval.evals=",
  ]
  result = subprocess.run(
    [sys.executable, "-m", "coca_jax.train", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "fsdp=8" in result.stderr
  assert '"step": 2' in result.stdout.splitlines()[-1]
