"""An open_clip-layout model trains on the seqio mixture with CLIP's BPE: the tasks
tokenize with it and the loader builds open_clip's rows (SOT t1..tn EOT pad, EOT an
input, labels shifted by one), and the trainer runs on them."""

import numpy as np
import pytest

from coca_jax import sharding, train
from coca_jax.convert import open_clip as convert_lib
from coca_jax.data import clip_bpe, loader
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
