"""An open_clip-layout model with CLIP's BPE end to end: it trains on the seqio mixture
(the tasks tokenize with CLIP's BPE and the loader builds open_clip's rows: SOT t1..tn EOT
pad, EOT an input, labels shifted by one), and its export serves coca_jax.load and a
public benchmark recipe of `python -m coca_jax.evaluate`."""

import json

import numpy as np
import pytest
from flax import nnx

from coca_jax import export, inference, sharding, train
from coca_jax.convert import open_clip as convert_lib
from coca_jax.data import clip_bpe, loader, prepare
from coca_jax.evaluate import __main__ as evaluate_main
from coca_jax.models import coca
from configs.open_clip import tiny

pytestmark = pytest.mark.slow  # the demo mixture through CLIP's tokenizer, a short run


def clip_tiny():
  """configs/open_clip/tiny.py with CLIP's real vocabulary and ids, on the demo mixture."""
  try:
    bpe = convert_lib.find_vocab(None)
  except FileNotFoundError:
    pytest.skip("open_clip's BPE file ships with the [open_clip] extra")
  c = tiny.get_config()
  c.model.text.update(
    vocab_size=clip_bpe.VOCAB_SIZE, bos_id=clip_bpe.SOT_ID, eos_id=clip_bpe.EOT_ID, max_len=12
  )
  c.data.vocab_path = bpe
  c.data.shuffle_buffer = 64
  c.train.update(steps=2, log_every=1, checkpoint_every=2, eval_every=0)
  return c


def test_mixture_rows_follow_open_clips_contract():
  config = loader.resolve(clip_tiny())
  mesh = sharding.make_mesh(config.mesh, None)
  batch = next(loader.host_batches(config, mesh, "train"))
  ids, labels, mask = (np.asarray(batch["text"][k]) for k in ("ids", "labels", "mask"))
  tokenizer = clip_bpe.ClipTokenizer(config.data.vocab_path)
  assert np.all(ids[:, 0] == clip_bpe.SOT_ID)
  for row in range(len(ids)):
    n = int(mask[row].sum()) - 1  # tokens t1..tn; the mask covers their n + 1 labels
    assert ids[row, n + 1] == clip_bpe.EOT_ID, ids[row]  # EOT is an input (cut: last)
    assert np.all(ids[row, n + 2 :] == 0)
    np.testing.assert_array_equal(labels[row, : n + 1], ids[row, 1 : n + 2])
    text = tokenizer.decode([int(t) for t in ids[row, 1 : n + 1]])
    assert text.strip() and "<start_of_text>" not in text


def test_trains_on_the_mixture(tmp_path):
  final = train.train(clip_tiny(), str(tmp_path / "run"))
  assert final["step"] == 2 and np.isfinite(final["loss"])


def test_export_serves_the_api_and_a_benchmark_recipe(tmp_path, run_main):
  import tensorflow_datasets as tfds

  config = clip_tiny()
  params = nnx.to_pure_dict(nnx.state(coca.build(config.model, seed=0), nnx.Param))
  path = str(tmp_path / "export")
  export.write(params, config, path, "float32", config.data.vocab_path)
  model = inference.load(path, batch_size=4)
  rng = np.random.default_rng(0)
  pictures = rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
  captions = model.caption(pictures, max_length=6)
  assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
  probabilities = model.classify(pictures, ["cat", "dog"]).probabilities
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
  with tfds.testing.mock_data(num_examples=6):
    status, out, err = run_main(
      evaluate_main, f"--export={path}", "--config=configs/eval/cifar.py:cifar10"
    )
  assert status == 0, err
  final = json.loads(out.strip().splitlines()[-1])
  assert final["cifar10/examples"] == 6.0 and 0.0 <= final["cifar10/zero_shot/top1"] <= 1.0
  if prepare.is_prepared():  # the default suite on the demo's eval sets, CLIP's vocabulary
    config_without_vocab = json.loads((tmp_path / "export" / "config.json").read_text())
    config_without_vocab["data"]["vocab_path"] = ""  # as a converted export has it
    (tmp_path / "export" / "config.json").write_text(json.dumps(config_without_vocab))
    status, out, err = run_main(evaluate_main, f"--export={path}", "--config=configs/demo.py")
    assert status == 0, err
    assert "retrieval/image_to_text_r1" in json.loads(out.strip().splitlines()[-1])
