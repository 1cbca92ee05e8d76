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
from coca_jax.data import synthetic
from coca_jax.models import coca
from configs import demo_video, demo_vqa, tiny

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


def small_finetune(config):
  """A finetune config (configs/demo_vqa.py, demo_video.py) on tiny.py's model sizes,
  global batch 8 (one row per host device)."""
  small = tiny.get_config().model
  m = config.model
  for key in ("width", "heads", "embed_dim"):
    m[key] = small[key]
  m.vision.update(layers=1, mlp_dim=64, image_size=16, patch_size=4)
  m.text.update(unimodal_layers=1, multimodal_layers=1, mlp_dim=64, vocab_size=64, max_len=8)
  m.pooler.caption_queries = 8
  config.data.global_batch_size = 8
  return config


def test_batch_spec_of_each_source():
  synthetic_config = tiny.get_config()
  synthetic_config.data.source = "synthetic"
  rows = synthetic.batch(0, 0, range(8), 16, 8, 64)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), aot.batch_spec(synthetic_config)) == (
    jax.tree.map(lambda x: (x.shape, x.dtype), rows)
  )
  vqa = aot.batch_spec(small_finetune(demo_vqa.get_config()))
  assert set(vqa) == {"image", "text", "answer_scores"}
  assert vqa["answer_scores"].shape == (8, 128) and vqa["answer_scores"].dtype == np.float32
  assert vqa["text"]["ids"].shape == (8, 8) and vqa["image"].shape == (8, 16, 16, 3)
  video = aot.batch_spec(small_finetune(demo_video.get_config()))
  assert set(video) == {"video", "label"}
  assert video["video"].shape == (8, 4, 16, 16, 3) and video["video"].dtype == np.float32
  assert video["label"].shape == (8,) and video["label"].dtype == np.int32
  synthetic_config.data.source = "webdataset"
  with pytest.raises(ValueError, match="source='webdataset'; expected one of"):
    aot.batch_spec(synthetic_config)


def lowered_steps(monkeypatch) -> list:
  """The jax.stages.Lowered of every train step that `aot.report` lowers from now on."""
  lowered = []
  make_train_step = aot.step_lib.make_train_step

  def make_and_watch(config, run):
    train_step = make_train_step(config, run)
    lower = train_step.jitted.lower

    def lower_and_keep(*args):
      lowered.append(lower(*args))
      return lowered[-1]

    train_step.jitted = types.SimpleNamespace(lower=lower_and_keep)
    return train_step

  monkeypatch.setattr(aot.step_lib, "make_train_step", make_and_watch)
  return lowered


@pytest.mark.slow  # compiles two train steps (~20 s)
@pytest.mark.parametrize(
  "module, key, shape, metric",
  [
    (demo_vqa, "answer_scores", (8, 128), "vqa_loss"),  # the old report: KeyError
    (demo_video, "video", (8, 4, 16, 16, 3), "video_loss"),  # the old: the image-text step
  ],
  ids=["vqa", "video"],
)
def test_report_compiles_the_step_of_the_data_source(monkeypatch, module, key, shape, metric):
  lowered = lowered_steps(monkeypatch)
  rep = aot.report(small_finetune(module.get_config()), jax.devices())
  assert len(lowered) == 1
  (_, batch), _ = lowered[0].args_info
  assert batch[key].shape == shape
  assert f"tensor<{'x'.join(map(str, shape))}xf32>" in lowered[0].as_text()
  _, metrics = lowered[0].out_info
  assert metric in metrics
  assert rep["memory_per_device"]["total"] > 0 and rep["fits"] is True


@pytest.mark.parametrize(
  "make_config",
  [tiny.get_config, lambda: small_finetune(demo_video.get_config())],
  ids=["image_text", "video"],
)
def test_indivisible_batch_is_named(make_config):
  config = make_config()
  config.data.global_batch_size = 12  # 8 batch shards
  with pytest.raises(
    aot.MeshError, match="global_batch_size=12 is not divisible by 8 batch shards"
  ):
    aot.report(config, jax.devices())


def test_memory_per_device_by_generation(monkeypatch):
  def chip(kind, coords):
    return types.SimpleNamespace(device_kind=kind, coords=coords, platform="tpu")

  megacore = [chip("TPU v4", (x, 0, 0)) for x in range(4)]
  assert aot.memory_per_device(megacore)[0] == 32 * aot.GIB
  two_cores_per_chip = [chip("TPU v4", (x // 2, 0, 0)) for x in range(8)]
  assert aot.memory_per_device(two_cores_per_chip)[0] == 16 * aot.GIB
  assert aot.memory_per_device([chip("TPU v5 lite", (0, 0, 0))])[0] == 16 * aot.GIB
  assert aot.memory_per_device([chip("TPU v5", (0, 0, 0))])[0] == 95 * aot.GIB
  gpu = types.SimpleNamespace(device_kind="NVIDIA A100-SXM4-80GB", platform="gpu")
  # JAX's allocator takes 75% of a GPU's memory unless told otherwise.
  monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  assert aot.memory_per_device([gpu])[0] == int(0.75 * 80 * aot.GIB)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  assert aot.memory_per_device([gpu])[0] == int(0.9 * 80 * aot.GIB)
  assert aot.memory_per_device([gpu], hbm_gib_override=96)[0] == int(0.9 * 96 * aot.GIB)
  gh200 = types.SimpleNamespace(device_kind="NVIDIA GH200 480GB", platform="gpu")
  assert aot.memory_per_device([gh200])[0] is None  # not an H200's 141 GiB
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


def test_missing_libtpu_says_how_to_install(monkeypatch):
  # As on a host without the [tpu] extra (CI installs it, so the path is faked).
  monkeypatch.setattr(aot.xla_bridge, "get_tpu_library_path", lambda: None)
  with pytest.raises(aot.TopologyError, match=r'pip install -e "\.\[tpu\]"'):
    aot.topology_devices("v4:2x2x1")


@pytest.mark.slow  # two processes load libtpu
@pytest.mark.skipif(aot.xla_bridge.get_tpu_library_path() is None, reason="needs libtpu")
def test_two_processes_describe_slices_at_once():
  """libtpu's machine-wide lock (/tmp/libtpu_lockfile) made the second of two reports
  fail ("libtpu cannot describe this slice: ... lockfile") while the first ran."""
  env = {k: v for k, v in os.environ.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
  env["JAX_PLATFORMS"] = "cpu"
  describe = "from coca_jax import aot; print(len(aot.topology_devices({!r})), flush=True); "
  first = subprocess.Popen(
    [sys.executable, "-c", describe.format("v4:2x2x1") + "import time; time.sleep(120)"],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert first.stdout.readline().strip() == "4"  # holds libtpu until killed
    second = subprocess.run(
      [sys.executable, "-c", describe.format("v5e:2x2")],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.strip() == "4"
  finally:
    first.kill()
    first.wait()


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


@pytest.mark.slow  # subprocesses importing jax
def test_the_clis_without_config_name_the_flag():
  """They raised AttributeError on config None."""
  for command in (["coca_jax.aot", "--cpu_devices=8"], ["coca_jax.params"]):
    done = subprocess.run(
      [sys.executable, "-m", *command],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert done.returncode != 0 and "--config=FILE is required" in done.stderr, done.stderr[-2000:]


@pytest.mark.skipif(aot.xla_bridge.get_tpu_library_path() is None, reason="needs libtpu")
@pytest.mark.parametrize(
  "name, chips, processes",
  [
    ("v5e:1x1", 1, 1),  # libtpu's default 2x2 chips per host refused it
    ("v5e:2x2", 4, 1),
    ("v5e:2x4", 8, 1),  # v5litepod-8 is one host; the default described two
    ("v6e:2x4", 8, 1),
    ("v5e:4x4", 16, 4),  # from 16 chips on, hosts of 4 chips
    ("v6e:16x16", 256, 64),
  ],
)
def test_v5e_and_v6e_slices_of_up_to_8_chips_are_one_host(name, chips, processes):
  devices = aot.topology_devices(name)
  assert len(devices) == chips
  assert len({d.process_index for d in devices}) == processes
