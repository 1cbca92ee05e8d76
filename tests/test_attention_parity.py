"""benchmarks/attention_parity.py, the GPU check of cuDNN attention's accuracy, run on CPU
with the "xla" kernel: the machinery that a GPU session relies on."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_parity.py"


def load_script():
  spec = importlib.util.spec_from_file_location("attention_parity", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_relative_error_is_over_all_leaves():
  import numpy as np

  parity = load_script()
  reference = {"a": np.array([3.0, 0.0]), "b": np.array([4.0])}  # norm 5
  x = {"a": np.array([3.0, 1e-3]), "b": np.array([4.0])}  # a leaf of ~0 is off by 1e-3
  assert parity.relative_error(x, reference) == pytest.approx(1e-3 / 5)


@pytest.mark.slow  # compiles three small training losses with their gradients
def test_xla_kernel_is_as_accurate_as_einsum_and_zero_slack_fails():
  parity = load_script()
  rows = parity.compare("xla", width=32, heads=2)
  assert [r[0] for r in rows] == ["loss", "logits", "image_embedding", "text_embedding", "grads"]
  assert all(parity.passes(row, tolerance=2.0) for row in rows)
  # bfloat16 rounding shows against the float32 reference, so the check has teeth: with
  # no slack, a kernel as (in)accurate as einsum fails where the error passes 1e-5.
  assert all(einsum > 1e-5 for _, einsum, _ in rows)
  grads = rows[-1]
  assert grads[1] > 1e-3 and not parity.passes(grads, tolerance=0.0)


def test_cudnn_needs_a_gpu(capsys):
  assert load_script().main(["--kernel=cudnn"]) == 2
  assert "needs a GPU" in capsys.readouterr().err
