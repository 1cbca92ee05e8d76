"""cpu_collectives.keep_in_order: the scheduler flag goes into XLA_FLAGS exactly when they
ask for several CPU devices and do not choose the scheduler themselves."""

import os
import subprocess
import sys

import pytest

from coca_jax import accelerators, cpu_collectives


@pytest.mark.parametrize(
  "flags,added",
  [
    ("--xla_force_host_platform_device_count=8", True),
    ("--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=4", True),
    ("--xla_force_host_platform_device_count=1", False),
    # XLA takes the last of a repeated flag (tests/conftest.py appends one).
    ("--xla_force_host_platform_device_count=1 --xla_force_host_platform_device_count=4", True),
    ("", False),
    (
      "--xla_force_host_platform_device_count=8 "
      "--xla_cpu_enable_concurrency_optimized_scheduler=true",
      False,
    ),
  ],
)
def test_flag_added_only_for_several_cpu_devices(monkeypatch, flags, added):
  monkeypatch.setattr(accelerators, "present", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", flags)
  assert cpu_collectives.keep_in_order() == added
  got = os.environ["XLA_FLAGS"]
  assert got == (f"{flags} {cpu_collectives.FLAG}".strip() if added else flags)


@pytest.mark.parametrize(
  "platforms,added",
  [("", False), ("cuda", False), ("tpu,cpu", False), ("cpu", True), ("cpu,cuda", True)],
)
def test_accelerator_hosts_keep_their_flags_unless_jax_runs_on_the_cpu(
  monkeypatch, platforms, added
):
  """A GPU host keeps its flags, except where jax_platforms puts JAX on the CPU first
  ("cpu" alone, the tests' setting, or first of a list: JAX's default backend is then
  the CPU, whose devices' collectives hang as on any CPU host; accelerators.present)."""
  monkeypatch.setattr(accelerators, "jax_platforms", lambda: platforms)
  monkeypatch.setattr(accelerators, "tpu_present", lambda: False)
  monkeypatch.setattr(accelerators, "gpu_files", lambda: ["/dev/nvidia0"])
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert cpu_collectives.keep_in_order() == added


@pytest.mark.parametrize("count,added", [("8", True), ("1", False)])
def test_jax_num_cpu_devices_counts_too(count, added):
  """JAX_NUM_CPU_DEVICES makes the devices without XLA_FLAGS (and wins over them)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=count)
  if count == "1":
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  code = (
    "import os, jax; from coca_jax import cpu_collectives as c; "
    "print(c.keep_in_order(), c.FLAG in os.environ.get('XLA_FLAGS', ''), len(jax.devices()))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120
  ).stdout.split()
  assert out == [str(added), str(added), count]


def test_jax_was_imported_after_the_test_environment():
  """conftest.py sets JAX_* variables that JAX reads when it is imported: an import of
  jax by a coca_jax module conftest loads first (accelerators did, for a while) left the
  tests on every backend and without the compilation cache (CI 20 -> 26 minutes)."""
  import jax

  assert jax.config.jax_platforms == "cpu"
  assert jax.config.jax_compilation_cache_dir == os.environ["JAX_COMPILATION_CACHE_DIR"]
