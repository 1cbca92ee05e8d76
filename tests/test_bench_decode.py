"""`python -m coca_jax.bench decode` and benchmarks/open_clip_decode.py run on tiny shapes
and print their tables (no torch: the open_clip side is skipped). Nothing is timed."""

import importlib.util

import jax
import numpy as np
import pytest
from flax import nnx

from coca_jax import export, tokens
from coca_jax.bench import decode as decode_bench
from coca_jax.models import coca
from configs import tiny

TINY_OPEN_CLIP = [
  "--open_clip_config=configs/open_clip/tiny.py",
  "--tokens=4",
  "--greedy_batches=2",
  "--beam_batch=2",
  "--repeats=1",
]


def test_token_agreement_counts_up_to_the_longer_caption():
  contract = tokens.Contract(bos_id=5, eos_id=1, pad_id=0)
  a = np.array([[7, 8, 1, 0, 0], [7, 8, 9, 9, 9], [3, 1, 0, 0, 0]])
  b = np.array([[7, 8, 1, 0, 0], [7, 4, 9, 9, 9], [3, 4, 4, 1, 0]])
  got = decode_bench.token_agreement(a, b, contract)
  # Compared positions: 3, 5 and 4 (b's row 2 stops later); equal: 3, 4 and 1.
  assert got["token_agreement"] == pytest.approx(8 / 12)
  assert got["identical"] == pytest.approx(1 / 3)
  assert got["first_divergence"] == pytest.approx((5 + 1 + 1) / 3)


def test_weight_bytes_skip_what_a_step_does_not_read():
  config = decode_bench.load_config_file("configs/open_clip/tiny.py")
  params = nnx.state(nnx.eval_shape(lambda: coca.build(config.model)))
  text = nnx.to_pure_dict(params["text"])
  width, layers = config.model.width, config.model.text.multimodal_layers
  total = sum(x.size for x in jax.tree.leaves(text))
  unread = (
    (config.model.text.vocab_size - 3) * width  # token embedding: 3 rows read at batch 3
    + (text["pos_embedding"].shape[0] - 1) * width  # position embedding: 1 row
    + 2 * layers * (width * width + width)  # cross-attention key, value kernels and biases
    + 2 * layers * width  # cross_kv_norm
    + 3 * width  # [CLS] embedding and its norm
  )
  assert decode_bench.weight_bytes_per_step(params, batch=3) == 4 * (total - unread)


@pytest.mark.slow  # compiles greedy and beam decoders, float32 and bfloat16
def test_open_clip_section_prints_its_table(capsys):
  results = decode_bench.main(
    [
      "--sections=open_clip",
      "--copy_megabytes=8",
      *TINY_OPEN_CLIP,
    ]
  )
  out = capsys.readouterr().out
  assert "weight MB/step" in out and "setup s" in out and "Copy bandwidth" in out
  assert "bfloat16 vs float32 greedy tokens" in out
  rows = results["open_clip"]["rows"]
  assert [(r["dtype"], r["method"], r["batch"]) for r in rows] == [
    (dtype, method, batch)
    for dtype in ("float32", "bfloat16")
    for method, batch in (("greedy", 2), ("beam 3", 2))
  ]
  # bfloat16 weights are half the bytes of float32's.
  assert rows[2]["weight_bytes_per_step"] * 2 == rows[0]["weight_bytes_per_step"]
  # The setup (encoding, layer slices, image keys/values) is timed alone, and the loop's
  # step time and bandwidth exclude it: NaN only where noise put the setup above the call.
  for r in rows:
    assert r["setup_seconds"] > 0
    loop = r["seconds"] - r["setup_seconds"]
    if loop > 0:
      assert r["step_ms"] == pytest.approx(loop / 4 * 1e3)
      assert r["gb_per_s"] == pytest.approx(r["weight_bytes_per_step"] * 4 / loop / 1e9)
    else:
      assert np.isnan(r["step_ms"]) and np.isnan(r["gb_per_s"])
  assert 0 <= results["open_clip"]["bf16_agreement"]["token_agreement"] <= 1


@pytest.mark.slow  # writes an export and compiles its decoders
def test_demo_section_compares_the_api_with_the_loop(tmp_path, sentencepiece_model, capsys):
  config = tiny.get_config()
  config.unlock()
  config.data.vocab_path = sentencepiece_model
  params = nnx.to_pure_dict(nnx.state(coca.build(config.model, seed=0), nnx.Param))
  export.write(params, config, str(tmp_path / "export"), "float32", sentencepiece_model)
  raw = np.random.default_rng(0).integers(0, 255, (8, 20, 24, 4), dtype=np.uint8)
  result = decode_bench.demo_section(str(tmp_path / "export"), raw, repeats=1, batch=4)
  out = capsys.readouterr().out
  assert "benchmark loop" in out and "API caption(raw uint8" in out and "captions/s" in out
  assert all(seconds > 0 for seconds in result["timings"].values())
  assert result["bf16_agreement"]["rows"] == 8


@pytest.mark.slow  # compiles the tiny open_clip-layout decoders
def test_open_clip_decode_script_without_open_clip(repo, capsys):
  spec = importlib.util.spec_from_file_location(
    "benchmarks_open_clip_decode", repo / "benchmarks" / "open_clip_decode.py"
  )
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  summary = script.main([*TINY_OPEN_CLIP, "--skip_open_clip", "--copy_megabytes=8"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert any(line.startswith("method") and "open_clip s" in line for line in lines)
  assert lines[-1].startswith('{"bench": "open_clip_decode"')
  assert [(r["method"], r["batch"]) for r in summary["table"]] == [("greedy", 2), ("beam 3", 2)]
  assert script.WORKER.exists()
