"""coca_jax.convert open_clip: the key map covers the model, values land where open_clip's
math puts them, missing / unexpected / mis-shaped keys are named errors, safetensors and
torch files give the same export, open_clip's full B/32 and L/14 key sets convert without
leftovers (shapes only), and a reduced-depth B/32 matches open_clip itself numerically.

open_clip (torch + torchvision) runs in subprocesses: torchvision's ops crash when
imported after TensorFlow, which other tests in the same process import.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import app

from coca_jax import export
from coca_jax.convert import open_clip as convert_lib
from coca_jax.models import vit
from configs.open_clip import tiny

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
needs_open_clip = pytest.mark.skipif(
  not HAS_OPEN_CLIP, reason="open_clip is not installed (the [open_clip] extra)"
)


@pytest.fixture(scope="module")
def config():
  return tiny.get_config()


def random_state(model_config, seed=0) -> dict[str, np.ndarray]:
  """An open_clip state dict of the model's key set with random values."""
  rng = np.random.default_rng(seed)
  return {
    key: rng.standard_normal(source.shape).astype(np.float32)
    for key, source in convert_lib.key_map(model_config).items()
  }


def test_key_map_covers_every_parameter_once(config):
  convert_lib.check_targets(convert_lib.key_map(config.model), config.model)


def test_values_land_where_open_clips_math_puts_them(config):
  state = random_state(config.model)
  params = convert_lib.convert(state, config.model)
  d, h = 32, 2
  k = d // h
  # in_proj rows are (q, k, v) x (head, head dim); ours [D_in, H, K].
  w = state["text.transformer.resblocks.0.attn.in_proj_weight"]
  key = params["text"]["unimodal"]["layers"]["self_attention"]["key"][0]
  np.testing.assert_array_equal(key[:, 1, 3], w[d + 1 * k + 3])
  bias = state["text_decoder.cross_attn.1.attn.in_proj_bias"]
  value_bias = params["text"]["multimodal"]["layers"]["cross_attention"]["value_bias"][1]
  np.testing.assert_array_equal(value_bias.reshape(-1), bias[2 * d :])
  out = state["text_decoder.resblocks.1.attn.out_proj.weight"]  # [D, H*K]
  ours = params["text"]["multimodal"]["layers"]["self_attention"]["out"][1]  # [H, K, D]
  np.testing.assert_array_equal(ours[1, 2], out[:, 1 * k + 2])
  # The patch embedding applied to patches equals open_clip's stride-P convolution.
  conv = state["visual.conv1.weight"]  # [D_v, 3, P, P]
  image = np.random.default_rng(1).standard_normal((1, 16, 16, 3)).astype(np.float32)
  patches = np.asarray(vit.patchify(image, 4))  # [1, 16, 48]
  ours = patches @ params["vision"]["patch_embedding"]["kernel"]
  window = image[0, 4:8, 8:12].transpose(2, 0, 1)  # patch (1, 2), CHW
  np.testing.assert_allclose(ours[0, 1 * 4 + 2], np.einsum("ochw,chw->o", conv, window), rtol=1e-5)
  positions = state["visual.positional_embedding"]
  np.testing.assert_array_equal(params["vision"]["class_pos_embedding"], positions[0])
  np.testing.assert_array_equal(params["vision"]["pos_embedding"], positions[1:])
  np.testing.assert_array_equal(
    params["text"]["vocab_projection"]["kernel"], state["text_decoder.text_projection"]
  )
  np.testing.assert_array_equal(params["log_inv_temperature"], state["logit_scale"])


def test_missing_unexpected_and_mis_shaped_keys_are_named(config):
  state = random_state(config.model)
  missing = dict(state)
  del missing["text_decoder.cross_attn.1.ln_1_kv.bias"]
  with pytest.raises(convert_lib.ConversionError, match=r"1 missing key\(s\): text_decoder"):
    convert_lib.convert(missing, config.model)
  extra = dict(state, **{"visual.transformer.resblocks.2.ln_1.weight": np.ones(48, np.float32)})
  with pytest.raises(convert_lib.ConversionError, match=r"unexpected key\(s\): visual\.trans"):
    convert_lib.convert(extra, config.model)
  wrong = dict(state, **{"visual.proj": np.ones((32, 8), np.float32)})
  with pytest.raises(
    convert_lib.ConversionError, match=r"visual\.proj: checkpoint \(32, 8\) vs model \(32, 16\)"
  ):
    convert_lib.convert(wrong, config.model)
  # A model config without open_clip's layout is refused, naming the options.
  from configs import tiny as paper_tiny

  with pytest.raises(convert_lib.ConversionError, match="not open_clip's layout"):
    convert_lib.key_map(paper_tiny.get_config().model)


@needs_open_clip
@pytest.mark.slow  # two exports and a torch import (~10 s)
def test_cli_safetensors_and_torch_files_give_the_same_export(tmp_path, run_main, repo, config):
  import torch
  from safetensors.numpy import save_file

  state = random_state(config.model, seed=3)
  save_file(state, tmp_path / "open_clip_model.safetensors")
  # A DDP-style pickle: {"state_dict": {"module." + key: tensor}}.
  torch.save(
    {"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in state.items()}},
    tmp_path / "open_clip_pytorch_model.bin",
  )
  expected = convert_lib.convert(state, config.model)
  config_file = os.fspath(repo / "configs" / "open_clip" / "tiny.py")
  for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
    output = tmp_path / f"export_{name.split('.')[-1]}"
    status, out, err = run_main(
      convert_lib,
      "--model=coca_ViT-B-32",
      f"--config={config_file}",
      f"--checkpoint={tmp_path / name}",
      f"--output={output}",
    )
    assert status == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["output"] == os.fspath(output)
    model, exported_config = export.load_model(output)
    assert exported_config.model.text.bos_id == 62
    import jax
    from flax import nnx

    got = nnx.state(model, nnx.Param).to_pure_dict()
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    # open_clip's BPE travels with the export (coca_jax/data/vocab.py loads it); this
    # tiny model's 64 token embeddings cannot take its ids (they embedded as NaN).
    assert export.vocab_file_in(output) is not None
    with pytest.raises(ValueError, match=r"49408 pieces, more than .*vocab_size=64"):
      export.load_vocab(output, exported_config)
  # A broken checkpoint writes nothing (no export, no staging folder).
  del state["logit_scale"]
  save_file(state, tmp_path / "broken.safetensors")
  status, _, _ = run_main(
    convert_lib,
    "--model=coca_ViT-B-32",
    f"--config={config_file}",
    f"--checkpoint={tmp_path / 'broken.safetensors'}",
    f"--output={tmp_path / 'broken_export'}",
  )
  assert status.startswith("error: ") and "missing key(s): logit_scale" in status  # one line
  # Flags of the other mode are an error (they were ignored).
  with pytest.raises(app.UsageError, match="--seed: not used without --random_init"):
    run_main(convert_lib, "--model=coca_ViT-B-32", "--seed=3", f"--checkpoint={tmp_path / 'x'}")
  assert not any(p.name.startswith((".broken_export", "broken_export")) for p in tmp_path.iterdir())


@needs_open_clip  # the package's BPE file; a torch pickle
def test_a_wrong_vocabulary_or_an_unreadable_checkpoint_is_named_and_nothing_written(
  tmp_path, repo, config, sentencepiece_model
):
  """Review helper-87: a SentencePiece model as --vocab converted, and the export loaded
  with it (captions of noise); a truncated merges file failed only at load; a truncated
  or foreign checkpoint file ended in the reader's own error ("KeyError: 101")."""
  import gzip

  from safetensors.numpy import save_file

  save_file(random_state(config.model), str(tmp_path / "ok.safetensors"))
  config_file = os.fspath(repo / "configs" / "open_clip" / "tiny.py")
  output = tmp_path / "export"

  def convert(checkpoint, vocab=None):
    convert_lib.convert_checkpoint(
      "coca_ViT-B-32", str(checkpoint), str(output), vocab=vocab, config_file=config_file
    )

  with pytest.raises(convert_lib.ConversionError, match=r"read CLIP's BPE merges"):
    convert(tmp_path / "ok.safetensors", vocab=sentencepiece_model)
  cut_merges = tmp_path / "cut" / convert_lib.BPE_FILE
  cut_merges.parent.mkdir()
  with gzip.open(cut_merges, "wt", encoding="utf-8") as f:
    f.write("#version: 0.2\ni n\nt h\n")
  with pytest.raises(ValueError, match=r"is not CLIP's BPE merges file: 3 lines"):
    convert(tmp_path / "ok.safetensors", vocab=str(cut_merges))
  data = (tmp_path / "ok.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
  (tmp_path / "notes.bin").write_text("not a checkpoint")
  for name in ("cut.safetensors", "notes.bin"):
    with pytest.raises(
      convert_lib.ConversionError, match=rf"{name} is not a readable open_clip checkpoint"
    ):
      convert(tmp_path / name)
  assert not output.exists()
  # The config files' switches after a colon (they document `:bf16`).
  bf16 = convert_lib.load_config("coca_ViT-B-32", f"{config_file}:bf16")
  assert bf16.model.dtype == "bfloat16"


def test_an_export_whose_vocabulary_lacks_the_models_special_ids_is_refused(
  tmp_path, sentencepiece_model
):
  """An open_clip-layout export (start 49406, end 49407) with a small SentencePiece
  vocabulary loaded, and decoded ids no piece has."""
  import ml_collections

  config = ml_collections.ConfigDict(
    dict(model=dict(text=dict(vocab_size=49408, bos_id=49406, eos_id=49407, pad_id=0)))
  )
  (tmp_path / export.VOCAB_FILE).write_bytes(open(sentencepiece_model, "rb").read())
  with pytest.raises(
    ValueError, match=r"has \d+ pieces, too few for the model's special ids \(start 49406"
  ):
    export.load_vocab(str(tmp_path), config)


def test_a_bfloat16_safetensors_checkpoint_reads_as_float32(tmp_path, repo):
  """safetensors' NumPy reader failed on bfloat16 tensors ("data type 'bfloat16' not
  understood") unless something had imported ml_dtypes; a fresh interpreter shows it."""
  import ml_dtypes
  from safetensors.numpy import save_file

  values = np.array([0.5, -2.0, 3.0], np.float32)
  save_file({"w": values.astype(ml_dtypes.bfloat16)}, str(tmp_path / "bf16.safetensors"))
  code = (
    "from coca_jax.convert import open_clip; "
    f"w = open_clip.read_checkpoint({str(tmp_path / 'bf16.safetensors')!r})['w']; "
    "print(w.dtype, w.tolist())"
  )
  done = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split("\n")[-2] == "float32 [0.5, -2.0, 3.0]"


SHAPES_SCRIPT = """
import json, sys
import open_clip, torch
out = {}
for name in sys.argv[1:]:
  cfg = open_clip.get_model_config(name)
  cfg.pop("custom_text")
  with torch.device("meta"):  # shapes only, no weights
    model = open_clip.CoCa(**cfg)
  out[name] = {
    "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
    "params": sum(p.numel() for p in model.parameters()),
  }
print(json.dumps(out))
"""


@needs_open_clip
@pytest.mark.slow  # torch in a subprocess + shape checks of two full models (~15 s)
def test_full_open_clip_key_sets_convert_without_leftovers():
  models = ["coca_ViT-B-32", "coca_ViT-L-14"]
  result = subprocess.run(
    [sys.executable, "-c", SHAPES_SCRIPT, *models], capture_output=True, text=True, check=True
  )
  reference = json.loads(result.stdout.strip().splitlines()[-1])
  for name in models:
    config = convert_lib.load_config(name)
    shapes = {k: tuple(v) for k, v in reference[name]["shapes"].items()}
    sources = convert_lib.check_keys(shapes, config.model)  # no missing / unexpected / shape
    convert_lib.check_targets(sources, config.model)  # every parameter once, right shape
    from coca_jax import params as params_lib

    total = params_lib.total(params_lib.abstract(config.model))
    assert total == reference[name]["params"], name


@needs_open_clip
@pytest.mark.slow  # open_clip vs coca_jax, B/32 at depth 2, through an export (~60 s)
def test_parity_with_open_clip_at_reduced_depth(tmp_path, repo):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "coca_jax.convert",
      "open_clip",
      "--model=coca_ViT-B-32",
      "--random_init",
      "--seed=0",
      "--layers=2",
      f"--output={tmp_path / 'export'}",
    ],
    capture_output=True,
    text=True,
    cwd=repo,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["layers"] == dict(vision=2, text=2, decoder=2)
  assert summary["exported"]
  for key in (
    "max_abs_diff_image_embedding",
    "max_abs_diff_text_embedding",
    "max_abs_diff_logits",
  ):
    assert summary[key] < 1e-4, summary
  assert summary["text_rows_equal"], summary
  assert summary["greedy_tokens_equal"], summary
  # Not a degenerate decode: the captions differ and use several tokens.
  assert len({tuple(t) for t in summary["greedy_tokens"]}) > 1
  assert summary["parity"]


def test_every_model_config_loads_from_another_working_directory(tmp_path):
  """configs/open_clip/coca_vit_l14.py imports its sibling as `configs.open_clip...`, which
  failed (ModuleNotFoundError) outside the repository root, where checkpoints live."""
  code = (
    "from coca_jax.convert import open_clip as c\n"
    "for m in sorted(c.MODELS): print(m, c.load_config(m).model.width)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "coca_ViT-L-14 768" in out.stdout and "coca_ViT-B-32 512" in out.stdout, out.stdout
