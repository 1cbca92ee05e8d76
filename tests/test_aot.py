"""AOT compile report: the trainer's step compiled (not run) for 8 host devices, and its CLI."""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx

from coca_jax import aot
from coca_jax.models import coca
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_report():
  return aot.report(tiny.get_config(), jax.devices())


@pytest.mark.slow  # the tiny report compiles the train step (~30 s)
def test_report_on_eight_host_devices(tiny_report):
  config = tiny.get_config()
  abstract = nnx.eval_shape(lambda: coca.build(config.model))
  expected_params = sum(
    int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))
  )

  assert tiny_report["params"] == expected_params
  assert tiny_report["devices"] == 8
  assert tiny_report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert tiny_report["global_batch"] == config.data.global_batch_size
  assert tiny_report["micro_batch_per_shard"] == config.data.global_batch_size // 8
  # One process feeds the whole batch (multi-host slices: tests/test_host_batches.py).
  assert tiny_report["processes"] == 1
  assert tiny_report["local_batch"] == config.data.global_batch_size
  assert tiny_report["host_batches_ok"] is True and tiny_report["host_batches_error"] is None
  memory = tiny_report["memory_per_device"]
  assert memory["arguments"] > 0 and memory["temps"] > 0
  live = (
    memory["arguments"]
    + memory["outputs"]
    - memory["aliased"]
    + memory["temps"]
    + memory["generated_code"]
  )
  assert memory["total"] == live
  assert tiny_report["xla_flops_per_device"] > 0
  assert tiny_report["xla_bytes_accessed_per_device"] > 0
  assert (
    tiny_report["model_flops_per_step"]
    == tiny_report["model_flops_per_example"] * config.data.global_batch_size
  )
  assert tiny_report["hbm_bytes"] > 0
  assert isinstance(tiny_report["fits"], bool) and tiny_report["fits"]
  json.dumps(tiny_report)  # the CLI prints it as one JSON line


@pytest.mark.slow
def test_table_names_every_number(tiny_report):
  text = aot.table(tiny_report)
  for label in (
    "parameters",
    "host batches",
    "memory: temps",
    "memory: total per device",
    "fits",
    "XLA FLOPs",
    "model FLOPs per step",
  ):
    assert label in text


def test_indivisible_batch_is_named():
  config = tiny.get_config()
  config.data.global_batch_size = 12  # 8 batch shards
  with pytest.raises(
    aot.MeshError, match="global_batch_size=12 is not divisible by 8 batch shards"
  ):
    aot.report(config, jax.devices())


def test_memory_per_device_by_generation():
  def chip(kind, coords):
    return types.SimpleNamespace(device_kind=kind, coords=coords, platform="tpu")

  megacore = [chip("TPU v4", (x, 0, 0)) for x in range(4)]
  assert aot.memory_per_device(megacore)[0] == 32 * aot.GIB
  two_cores_per_chip = [chip("TPU v4", (x // 2, 0, 0)) for x in range(8)]
  assert aot.memory_per_device(two_cores_per_chip)[0] == 16 * aot.GIB
  assert aot.memory_per_device([chip("TPU v5 lite", (0, 0, 0))])[0] == 16 * aot.GIB
  assert aot.memory_per_device([chip("TPU v5", (0, 0, 0))])[0] == 95 * aot.GIB
  gpu = types.SimpleNamespace(device_kind="NVIDIA A100-SXM4-80GB", platform="gpu")
  assert aot.memory_per_device([gpu])[0] == 80 * aot.GIB
  unknown = types.SimpleNamespace(device_kind="Some NPU", platform="npu")
  assert aot.memory_per_device([unknown])[0] is None
  assert aot.memory_per_device([unknown], hbm_gib_override=24)[0] == 24 * aot.GIB


@pytest.mark.parametrize(
  "name, message",
  [("v9:2x2", "unknown TPU generation 'v9'; known: v4"), ("v4-2048", "is not GENERATION:AxB")],
)
def test_unknown_topology_is_named(name, message):
  with pytest.raises(aot.TopologyError, match=message):
    aot.topology_devices(name)


@pytest.mark.skipif(
  aot.xla_bridge.get_tpu_library_path() is not None,
  reason="libtpu is installed: the topology path works",
)
def test_missing_libtpu_says_how_to_install():
  with pytest.raises(aot.TopologyError, match=r'pip install -e "\.\[tpu\]"'):
    aot.topology_devices("v4:2x2x1")


def run_cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "coca_jax.aot", "--config=configs/tiny.py", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.slow
def test_cli_prints_a_final_json_line(tiny_report):
  # The same program as `tiny_report`: the persistent compilation cache (conftest) serves it.
  done = run_cli("--cpu_devices=8")
  assert done.returncode == 0, done.stderr[-3000:]
  final = json.loads(done.stdout.strip().splitlines()[-1])
  assert final["topology"] == "cpu:8" and final["devices"] == 8
  assert final["params"] == tiny_report["params"]
  assert final["memory_per_device"]["total"] > 0 and final["xla_flops_per_device"] > 0
  assert isinstance(final["fits"], bool)
  assert final["processes"] == 1 and final["host_batches_ok"] is True


@pytest.mark.slow
def test_cli_unknown_topology_fails_clearly():
  done = run_cli("--topology=v9:2x2")
  assert done.returncode != 0
  assert "unknown TPU generation 'v9'" in done.stderr


def test_indivisible_parameter_is_named():
  config = tiny.get_config()
  config.model.width = 36  # "embed" is split over fsdp=8
  config.model.vision.patch_size = 4
  config.mesh.data, config.mesh.fsdp = 1, 8  # explicit: the automatic mesh would pick 4
  with pytest.raises(
    aot.MeshError, match=r"dimension \d+ \(36\) is split over mesh axes \('fsdp',\) = 8 ways"
  ):
    aot.report(config, jax.devices())
