"""Entry points' stderr: libtpu's start-up lines on a host without TPU chips are dropped,
everything else passes through."""

import importlib.util
import os
import subprocess
import sys

import pytest

from coca_jax import console

# What libtpu 0.0.x printed at JAX's backend start on this CPU-only machine (2026-11-29).
LIBTPU_LINES = (
  "Failed to find host bounds for accelerator type: WARNING: could not determine TPU "
  "accelerator type, please set env var `TPU_ACCELERATOR_TYPE` manually, otherwise libtpu.so "
  "may not properly initialize.\n"
  "WARNING: Logging before InitGoogle() is written to STDERR\n"
  "E0000 00:00:1795981978.839734    1416 common_lib.cc:554] INVALID_ARGUMENT: Error: unexpected "
  "worker hostname 'WARNING: could not determine TPU worker hostnames or IP addresses' from "
  "env var TPU_WORKER_HOSTNAMES.\n"
  "=== Source Location Trace: === \n"
  "learning/45eac/tfrc/runtime/libtpu_init_utils.cc:327\n"
)


def test_libtpu_lines_are_dropped_and_others_kept(capfd):
  with console._stderr_without(console.LIBTPU_NO_CHIP_NOISE):
    os.write(2, ("a real error\n" + LIBTPU_LINES + "Trace: === kept\n").encode())
  assert capfd.readouterr().err == "a real error\nTrace: === kept\n"


def test_stderr_is_restored_after_an_error(capfd):
  with pytest.raises(RuntimeError):
    with console._stderr_without(console.LIBTPU_NO_CHIP_NOISE):
      os.write(2, b"before\n")
      raise RuntimeError("boom")
  os.write(2, b"after\n")
  assert capfd.readouterr().err == "before\nafter\n"


def _stderr_of(code: str) -> str:
  """stderr of `code` in a fresh interpreter that may try every backend (conftest.py sets
  JAX_PLATFORMS=cpu for the tests)."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  return subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, env=env
  ).stderr


@pytest.mark.slow  # two interpreters starting JAX
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_start_backends_hides_libtpu_start_up_lines():
  plain = _stderr_of("import jax; jax.devices()")
  if "INVALID_ARGUMENT" not in plain:
    pytest.skip("this libtpu starts quietly here (a TPU host, or a newer libtpu)")
  ours = _stderr_of("from coca_jax import console; console.start_backends()")
  assert "INVALID_ARGUMENT" not in ours and "Source Location Trace" not in ours, ours


@pytest.mark.slow  # interpreters loading libtpu
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_the_aot_topology_and_the_python_api_hide_libtpu_start_up_lines():
  """`coca_jax.aot`'s slice description and `coca_jax.load`'s backend start printed the
  lines that the trainer's start dropped."""
  describe = (
    "from jax.experimental import topologies; from coca_jax import aot; "
    "topologies.get_topology_desc('v4:2x2x1', 'tpu', **aot.TPU_GENERATIONS['v4'])"
  )
  if "INVALID_ARGUMENT" not in _stderr_of(describe):
    pytest.skip("this libtpu starts quietly here (a TPU host, or a newer libtpu)")
  for code in (
    "from coca_jax import aot; aot.topology_devices('v4:2x2x1')",
    "import coca_jax; coca_jax.load('/nonexistent/export')",
  ):
    ours = _stderr_of(
      f"try:\n  {code.replace('; ', chr(10) + '  ')}\nexcept FileNotFoundError:\n  pass"
    )
    assert "INVALID_ARGUMENT" not in ours and "Source Location Trace" not in ours, ours


# Runs an entry point's main with the calls that must precede JAX's backends replaced by
# a check that no backend has started yet; the last of them ends the process.
ORDER_CHECK = """
import sys
from absl import app
from jax._src import xla_bridge
from coca_jax import host_memory, multihost
import {module} as entry

def check(name, last):
  def called(*args, **kwargs):
    print(name, "started" if xla_bridge.backends_are_initialized() else "before", flush=True)
    if last:
      sys.exit(0)
  return called

host_memory.tune_for_cpu = check("tune_for_cpu", {tune_last})
multihost.initialize = check("distributed", True)
{run}
"""


@pytest.mark.slow  # interpreters starting JAX
@pytest.mark.parametrize(
  "module,run,expected",
  [
    (
      "coca_jax.train",
      "sys.argv = ['train', '--config=configs/tiny.py', '--workdir=/nonexistent/w']\n"
      "entry.define_flags()\napp.run(entry.main)",
      "tune_for_cpu before\ndistributed before\n",
    ),
    ("coca_jax.bench.__main__", "entry.main(['step'])", "tune_for_cpu before\n"),
  ],
)
def test_backends_start_after_the_allocator_and_the_distributed_runtime(
  module, run, expected, repo
):
  """host_memory.tune_for_cpu (glibc reads its settings at XLA's first allocation) and
  jax.distributed.initialize must run before JAX starts its backends."""
  code = ORDER_CHECK.format(module=module, tune_last=module != "coca_jax.train", run=run)
  done = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout == expected


# The `python -m` entry points. Each calls console.quiet() first in main(), which imports
# TensorFlow with its start-up notices (a CUDA probe's "failed call to cuInit" error on a
# GPU-less host) filtered; a module that imported TensorFlow itself printed them first.
ENTRY_POINTS = (
  "coca_jax.train",
  "coca_jax.evaluate.__main__",
  "coca_jax.export",
  "coca_jax.caption",
  "coca_jax.classify",
  "coca_jax.aot",
  "coca_jax.params",
  "coca_jax.convert.__main__",
  "coca_jax.data.prepare",
  "coca_jax.bench.__main__",
  "coca_jax.bench.step",
  "coca_jax.bench.decode",
  "coca_jax.bench.data",
)


@pytest.mark.slow  # interpreters importing JAX and TensorFlow
def test_entry_points_leave_tensorflow_to_console_quiet(repo):
  """coca_jax.train imported TensorFlow (through data.tasks) at import since 0675174, and
  every training run began with TensorFlow's CUDA notices and a cuInit "error"."""
  code = (
    "import importlib, sys\n"
    f"for module in {ENTRY_POINTS!r}:\n"
    "  importlib.import_module(module)\n"
    "  if 'tensorflow' in sys.modules:\n"
    "    sys.exit(module + ' imports tensorflow')\n"
  )
  done = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=repo
  )
  assert done.returncode == 0, done.stderr[-2000:]
  usage = subprocess.run(
    [sys.executable, "-m", "coca_jax.train"], capture_output=True, text=True, timeout=120, cwd=repo
  )
  assert "--workdir is required" in usage.stderr
  assert not console.TF_IMPORT_NOISE.search(usage.stderr), usage.stderr[:2000]
