"""Shared by the trainer and multi-process tests (imported by name: pytest puts tests/ on
sys.path, as does running a file of tests/ as a script): the tiny config as they train
it, and the environment of a loopback process."""

import os
import re
import socket

from configs import tiny

# Synthetic data, a checkpoint and a log line every 3 steps, float32 export.
OVERRIDES = dict(
  data=dict(source="synthetic"), train=dict(checkpoint_every=3, log_every=3, export_dtype="float32")
)


def tiny_config(steps, **sections):
  """configs/tiny.py with OVERRIDES, `steps` steps and per-section overrides
  (`mesh=dict(data=8, fsdp=1, tensor=1)`)."""
  c = tiny.get_config()
  for section, values in [*OVERRIDES.items(), *sections.items()]:
    for k, v in values.items():
      c[section][k] = v
  c.train.steps = steps
  return c


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_with_devices(n: int) -> dict:
  """This environment with `n` forced CPU devices and gloo collectives across processes."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  return env
