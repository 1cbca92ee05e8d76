"""benchmarks/open_clip.py lives outside the package: it still runs (also as
`python -m coca_jax.bench open_clip`), and installs nothing here.

Only the coca_jax side runs (--skip_open_clip); torch and open_clip are never installed.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "open_clip.py"
# A tiny model, so the test compiles one small train step.
TINY = [
  "--width=32",
  "--heads=2",
  "--vision_layers=1",
  "--unimodal_layers=1",
  "--multimodal_layers=1",
  "--image_size=16",
  "--patch_size=4",
  "--text_len=8",
  "--vocab_size=64",
  "--caption_queries=8",
  "--batch_size=8",
  "--warmup_steps=1",
  "--steps=1",
]


def load_benchmark():
  """The script as a module, without putting benchmarks/ on sys.path."""
  spec = importlib.util.spec_from_file_location("benchmarks_open_clip", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_help_installs_nothing(tmp_path, capsys):
  bench = load_benchmark()
  with pytest.raises(SystemExit) as exit_info:
    bench.main(["--help", f"--bench_venv={tmp_path / 'venv'}"])
  assert exit_info.value.code == 0
  assert "python -m coca_jax.bench open_clip" in capsys.readouterr().out
  assert not (tmp_path / "venv").exists()
  assert bench.WORKER.exists()


def test_no_install_names_the_command(tmp_path, monkeypatch):
  bench = load_benchmark()
  # As on a machine without the [open_clip] extra.
  monkeypatch.setattr(bench, "imports_open_clip", lambda python: False)
  venv = tmp_path / "venv"
  with pytest.raises(SystemExit, match="pip install torch=="):
    bench.main([*TINY, "--no_install", f"--bench_venv={venv}"])
  assert not venv.exists()


@pytest.mark.slow  # end to end: compiles and runs the benchmark's train steps
def test_coca_jax_side_runs(capsys):
  summary = load_benchmark().main(
    [*TINY, "--width=32,16", "--precision=float32", "--skip_open_clip"]
  )
  assert set(summary) == {"bench", "batch_size", "rows"}
  assert [(r["width"], r["precision"], r["layers"]) for r in summary["rows"]] == [
    (32, "float32", "unrolled"),
    (16, "float32", "unrolled"),
  ]
  assert {r["layout"] for r in summary["rows"]} == {"open_clip"}  # the default
  scanned = load_benchmark().main(
    [*TINY, "--width=16", "--precision=bfloat16", "--layers=scan", "--skip_open_clip"]
  )
  assert [(r["precision"], r["layers"]) for r in scanned["rows"]] == [("bfloat16", "scan")]
  summary["rows"] += scanned["rows"]
  for row in summary["rows"]:
    assert "open_clip" not in row and "ratio" not in row
    side = row["coca_jax"]
    assert side["params"] > 0 and side["examples_per_s"] > 0
    assert np.isfinite(side["first_loss"]) and np.isfinite(side["last_loss"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[-1].startswith('{"bench": "open_clip"')


def test_the_sides_take_turns_going_first(monkeypatch):
  bench = load_benchmark()
  calls = []

  def side(name, step_s, **versions):
    def run(*args):
      calls.append(name)
      timing = dict(step_s=step_s, best_step_s=step_s, examples_per_s=8 / step_s)
      return dict(params=1e6, first_loss=1.0, last_loss=0.5, **timing, **versions)

    return run

  monkeypatch.setattr(bench, "ensure_bench_venv", lambda venv, install: Path(sys.executable))
  monkeypatch.setattr(
    bench, "run_open_clip", side("open_clip", 1.0, torch="t", open_clip="o", threads=2)
  )
  monkeypatch.setattr(bench, "run_coca_jax", side("coca_jax", 0.5, jax="j", device="cpu"))
  summary = bench.main([*TINY, "--width=32,16", "--precision=float32,bfloat16"])
  assert calls == ["coca_jax", "open_clip", "open_clip", "coca_jax"] * 2
  assert [r["first"] for r in summary["rows"]] == ["coca_jax", "open_clip"] * 2
  assert {r["ratio"] for r in summary["rows"]} == {2.0}


def test_bad_width_is_named():
  with pytest.raises(SystemExit, match="2"):
    load_benchmark().main([*TINY, "--width=31", "--skip_open_clip"])


@pytest.mark.slow  # a subprocess that imports jax
def test_bench_entry_point_runs_the_script():
  result = subprocess.run(
    [sys.executable, "-m", "coca_jax.bench", "open_clip", "--help"],
    capture_output=True,
    text=True,
    cwd=SCRIPT.parents[1],
  )
  assert result.returncode == 0, result.stderr
  assert "--precision" in result.stdout and "--width" in result.stdout


def test_the_open_clip_layout_is_open_clips_model():
  """Like for like: open_clip 3.3.0's CoCa at the benchmark's sizes holds 3,177,857 /
  10,484,481 / 37,484,033 parameters at widths 128 / 256 / 512 (as its worker counted
  them in a benchmark run); the paper layout has 6-9% fewer."""
  import argparse

  from coca_jax import params as params_lib

  bench = load_benchmark()
  defaults = dict(heads=4, vision_layers=4, unimodal_layers=2, multimodal_layers=2)
  defaults.update(image_size=64, patch_size=8, text_len=32, vocab_size=4096)
  defaults.update(caption_queries=64, batch_size=32, warmup_steps=2, steps=2, layers="unrolled")
  for width, open_clip_params in ((128, 3_177_857), (256, 10_484_481), (512, 37_484_033)):
    for layout, close in (("open_clip", True), ("paper", False)):
      args = argparse.Namespace(layout=layout, **defaults)
      config = bench.bench_config(args, width, "float32")
      params = params_lib.count(params_lib.abstract(config.model))["total"]
      assert (abs(params / open_clip_params - 1) < 1e-4) == close, (width, layout, params)


def test_the_open_clip_worker_gets_its_faster_allocator_settings(monkeypatch, tmp_path):
  """coca_jax's side runs with coca_jax.host_memory's glibc settings (mallopt, which a
  child process does not inherit); the float32 worker gets them as environment variables
  (faster for torch too), the bfloat16 one glibc's defaults (faster for torch there)."""
  from coca_jax import accelerators

  monkeypatch.setattr(accelerators, "present", lambda: False)
  for name in [n for n in __import__("os").environ if n.startswith("MALLOC_")]:
    monkeypatch.delenv(name)
  seen = {}

  def fake_run(command, **kwargs):
    seen.update(kwargs["env"])
    return subprocess.CompletedProcess(command, 0, stdout='{"ok": 1}\n', stderr="")

  bench = load_benchmark()
  monkeypatch.setattr(bench.subprocess, "run", fake_run)
  batch = dict(image=np.zeros(1), text=dict(ids=np.zeros(1), labels=np.zeros(1)))
  spec = dict(threads=2, precision="fp32")
  assert bench.run_open_clip(Path(sys.executable), spec, batch) == {"ok": 1}
  assert seen["OMP_NUM_THREADS"] == "2"
  assert seen["MALLOC_MMAP_MAX_"] == "0" and seen["MALLOC_ARENA_MAX"] == "1"
  seen.clear()  # bfloat16: glibc's defaults, under which torch ran 1.7x faster here
  bench.run_open_clip(Path(sys.executable), dict(threads=2, precision="amp_bf16"), batch)
  assert seen["OMP_NUM_THREADS"] == "2" and "MALLOC_MMAP_MAX_" not in seen
