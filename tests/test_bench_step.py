"""`python -m coca_jax.bench step` times the step the trainer runs for the config: a video
config's video step on clips, a VQA config's step with answer scores, not an image-text
step. The batches' shapes are worked out by hand from the config files."""

import numpy as np
import pytest

from coca_jax import flops
from coca_jax.bench import step as step_bench

# The demo model with one layer per tower, so each test compiles one small step.
SMALL = [
  "--config.model.vision.layers=1",
  "--config.model.text.unimodal_layers=1",
  "--config.model.text.multimodal_layers=1",
]
RUN = ["--batch=8", "--steps=1", "--warmup=0"]  # 8: one row per forced CPU device


def small_config(name: str):
  config = step_bench.load_config([f"--config=configs/{name}.py", *SMALL])
  config.data.global_batch_size = 8
  return config


def test_host_batches_have_the_sources_format():
  # configs/demo.py: 32px images, text length 24; demo_video: 4 frames, 10 classes;
  # demo_vqa: 128 answers.
  video = step_bench.host_batch(small_config("demo_video"), 0, range(4))
  assert {k: (v.shape, v.dtype) for k, v in video.items()} == {
    "video": ((4, 4, 32, 32, 3), np.float32),
    "label": ((4,), np.int32),
  }
  assert ((0 <= video["label"]) & (video["label"] < 10)).all()
  vqa = step_bench.host_batch(small_config("demo_vqa"), 0, range(4))
  assert vqa["image"].shape == (4, 32, 32, 3) and vqa["text"]["ids"].shape == (4, 24)
  assert vqa["answer_scores"].shape == (4, 128) and vqa["answer_scores"].dtype == np.float32
  np.testing.assert_array_equal(vqa["answer_scores"].sum(axis=1), np.ones(4))
  pairs = step_bench.host_batch(small_config("demo"), 0, range(4))
  assert set(pairs) == {"image", "text"} and pairs["image"].shape == (4, 32, 32, 3)
  # Row r is the same whichever rows a process asks for (multi-process data shards).
  rows = step_bench.host_batch(small_config("demo_video"), 0, [2, 3])
  np.testing.assert_array_equal(rows["video"], video["video"][2:])
  np.testing.assert_array_equal(rows["label"], video["label"][2:])


def shapes(batch) -> dict:
  """{"video": [8, 4, 32, 32, 3], ...}, nested keys joined by "/"."""
  flat = {}
  for key, value in batch.items():
    if isinstance(value, dict):
      flat.update({f"{key}/{k}": v for k, v in shapes(value).items()})
    else:
      flat[key] = list(value.shape)
  return flat


class RecordingStep:
  """Stands in for the trainer's compiled step: records the batches it is lowered for and
  called with (nothing compiles)."""

  def __init__(self):
    self.lowered, self.called = [], []
    self.jitted = self

  def lower(self, abstract_state, batch):
    self.lowered.append(shapes(batch))
    return self

  def compile(self):
    return self

  def __call__(self, state, batch):
    self.called.append(shapes(batch))
    return state, {"loss": np.float32(0.0)}


# configs/demo.py: 32px images, text length 24; demo_video: clips of 4 frames;
# demo_vqa: 128 answers. The batch of 8 is --batch.
PAIRS = {"image": [8, 32, 32, 3], "text/ids": [8, 24], "text/labels": [8, 24], "text/mask": [8, 24]}


@pytest.mark.parametrize(
  "name, batch",
  [
    ("demo_video", {"video": [8, 4, 32, 32, 3], "label": [8]}),
    ("demo_vqa", {**PAIRS, "answer_scores": [8, 128]}),
    ("demo", PAIRS),
  ],
)
def test_the_step_runs_on_the_configs_batches(monkeypatch, name, batch):
  step = RecordingStep()
  monkeypatch.setattr(step_bench.step_lib, "make_train_step", lambda config, run: step)
  monkeypatch.setattr(step_bench.state_lib, "create", lambda config, run: {})
  result = step_bench.main([f"--config=configs/{name}.py", *SMALL, "--batch=8", "--steps=2"])
  assert step.lowered == [batch] and step.called == [batch] * 3  # 1 warm-up + 2 timed
  assert result["batch"] == batch


@pytest.mark.slow  # compiles the video train step
def test_video_config_times_the_video_step(capsys):
  result = step_bench.main(["--config=configs/demo_video.py", *SMALL, *RUN])
  assert result["source"] == "video"
  assert result["batch"] == {"video": [8, 4, 32, 32, 3], "label": [8]}
  # The FLOPs of 8 clips of 4 frames (the encoder frozen: forward only), not of 8 images.
  assert result["model_flops_per_step"] == 8 * flops.train_flops_per_example(
    small_config("demo_video")
  )
  clip = flops.video_forward_macs(small_config("demo_video").model, 4)
  assert result["model_flops_per_step"] > 8 * 2 * clip  # forward and the head's backward
  assert np.isfinite(result["loss"])
  assert "video [8, 4, 32, 32, 3]" in capsys.readouterr().out


@pytest.mark.slow  # compiles the VQA train step
def test_vqa_config_times_the_vqa_step():
  result = step_bench.main(["--config=configs/demo_vqa.py", *SMALL, *RUN])
  assert result["source"] == "vqa"
  assert result["batch"]["answer_scores"] == [8, 128]
  assert np.isfinite(result["loss"])


def test_video_source_without_a_head_is_named():
  config = small_config("demo_video")
  config.model.video.num_classes = 0
  with pytest.raises(ValueError, match="config.model.video.num_classes"):
    step_bench.host_batch(config, 0, range(2))


def test_vqa_source_without_a_head_is_named_before_anything_is_built(monkeypatch):
  """numpy's bare 'high <= 0' at the first batch before; now the trainer's own check."""
  monkeypatch.setattr(step_bench, "run", lambda *a, **k: pytest.fail("built the step"))
  with pytest.raises(ValueError, match=r"needs config.model.vqa.num_answers > 0 \(it is 0\)"):
    step_bench.main(["--config=configs/demo_vqa.py", "--config.model.vqa.num_answers=0"])


def test_trace_records_steps_after_the_timed_ones(monkeypatch, tmp_path, capsys):
  step = RecordingStep()
  monkeypatch.setattr(step_bench.step_lib, "make_train_step", lambda config, run: step)
  monkeypatch.setattr(step_bench.state_lib, "create", lambda config, run: {})
  started = []
  start_trace = step_bench.jax.profiler.start_trace
  monkeypatch.setattr(
    step_bench.jax.profiler,
    "start_trace",
    lambda d: started.append(len(step.called)) or start_trace(d),
  )
  trace = tmp_path / "trace"
  result = step_bench.main(["--config=configs/demo.py", *SMALL, *RUN, f"--trace={trace}"])
  # The profiler starts after the timed step (its overhead is not timed) and records one.
  assert started == [1] and len(step.called) == 2
  assert len(list(trace.glob("**/*.xplane.pb"))) == 1  # TensorBoard's profile plugin reads it
  # A CPU trace has no device plane (tests/test_bench_trace.py reads GPU and TPU ones).
  assert result["top_ops"] == []
  out = capsys.readouterr().out
  assert "no device kernels in the trace" in out
  # The CPU backend keeps no memory statistics: no peak, and no table row for it.
  assert result["peak_memory_bytes"] is None
  assert "peak device memory" not in out


def test_peak_memory_row_where_the_backend_keeps_statistics():
  class Device:
    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      return self.stats

  assert step_bench.peak_memory_bytes(Device(None)) is None
  assert step_bench.peak_memory_bytes(Device({"peak_bytes_in_use": 3 * 2**30})) == 3 * 2**30
  result = dict(
    model="m", params=1, devices=1, device_kind="gpu", mesh={}, global_batch=8, batch={},
    source="synthetic", frozen=[], compile_s=1.0, step_s=0.5, steps=2, warmup=1,
    examples_per_s=16.0, model_flops_per_step=1e9, achieved_flops_per_s=2e9, mfu=0.25,
    peak_flops_per_s=8e9, peak_of="dense TF32 peak", peak_memory_bytes=int(1.5 * 2**30),
  )  # fmt: skip
  rows = dict(line.split("  ", 1) for line in step_bench.table(result).splitlines())
  assert rows["peak device memory"].strip() == "1.5 GiB"
  assert rows["MFU"].strip() == "25.0% (of 8e+09 FLOP/s, the dense TF32 peak)"
