"""cpu_collectives.keep_in_order: the scheduler flag goes into XLA_FLAGS exactly when they
ask for several CPU devices and do not choose the scheduler themselves."""

import os

import pytest

from coca_jax import accelerators, cpu_collectives


@pytest.mark.parametrize(
  "flags,added",
  [
    ("--xla_force_host_platform_device_count=8", True),
    ("--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=4", True),
    ("--xla_force_host_platform_device_count=1", False),
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


def test_accelerator_hosts_keep_their_flags(monkeypatch):
  monkeypatch.setattr(accelerators, "present", lambda: True)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert not cpu_collectives.keep_in_order()
