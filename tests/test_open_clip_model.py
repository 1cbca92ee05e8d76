"""open_clip's CoCa layout as config options (coca_jax/config.py MODEL_OPTIONS): defaults
leave the paper's models alone, the legacy [CLS] mask by hand, the single pooler, the
token contract (SOT ... EOT rows, stop at pad), cached decoding of the open_clip layout,
parameter counts of open_clip's two models."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coca_jax import config as config_lib
from coca_jax import decode, tokens
from coca_jax import params as params_lib
from coca_jax.data import synthetic
from coca_jax.models import coca, text
from configs import base
from configs.open_clip import coca_vit_b32, coca_vit_l14
from configs.open_clip import tiny as open_clip_tiny

SOT, EOT = 62, 63  # the tiny open_clip config's BOS / EOS (pad 0)


def test_paper_configs_keep_every_default_and_old_configs_read_them():
  model_config = base.get_config().model
  for section, options in [("", config_lib.MODEL_OPTIONS)] + [
    (k, v) for k, v in config_lib.MODEL_OPTIONS.items() if isinstance(v, dict)
  ]:
    for key, default in options.items():
      if isinstance(default, dict):
        continue
      name = f"{section}.{key}" if section else key
      assert config_lib.model_option(model_config, name) == default, name
  # A config written before the options existed (an older export) reads the defaults.
  old = base.get_config().model
  del old["gelu_approximate"]
  del old.vision["class_token"]
  assert config_lib.model_option(old, "gelu_approximate") is True
  assert config_lib.model_option(old, "vision.class_token") is False
  with pytest.raises(KeyError, match="not a model layout option"):
    config_lib.model_option(old, "vision.no_such_option")


@pytest.mark.slow  # eval_shape of two full models (~1-2 s)
def test_open_clip_param_counts_equal_open_clips():
  # open_clip's own counts (sum of numel over model.parameters(), open_clip 3.3.0).
  assert params_lib.total(params_lib.abstract(coca_vit_b32.get_config().model)) == 253_560_065
  assert params_lib.total(params_lib.abstract(coca_vit_l14.get_config().model)) == 638_450_177


def test_legacy_mask_by_hand():
  # T = 5, [CLS] at 5. Row 0: SOT t EOT pad pad. Row 1: full (token 4 not pad). Row 2: a
  # real "!" (id 0 = pad) at 1.
  ids = jnp.asarray([[SOT, 5, EOT, 0, 0], [SOT, 5, 6, 7, EOT], [SOT, 0, 7, EOT, 0]])
  mask = jnp.ones_like(ids)  # not read by the legacy mask
  m = np.asarray(text.unimodal_mask(ids, mask, "open_clip_legacy", pad_id=0))[:, 0]
  # [CLS] (query 5): key 0 and keys j with ids[j - 1] != 0: SOT, t, EOT, the first pad.
  np.testing.assert_array_equal(m[0, 5], [1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(m[1, 5], [1, 1, 1, 1, 1, 1])  # ids[4] = EOT: sees itself
  np.testing.assert_array_equal(m[2, 5], [1, 1, 0, 1, 1, 0])  # key 2 hidden after the "!"
  # Text queries: causal, the same key columns.
  np.testing.assert_array_equal(m[0, 4], [1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(m[2, 2], [1, 1, 0, 0, 0, 0])
  # The paper's mask: causal over the real tokens, [CLS] sees every real token and itself.
  paper_mask = jnp.asarray([[1, 1, 1, 0, 0]])
  p = np.asarray(text.unimodal_mask(ids[:1], paper_mask, "paper", pad_id=0))[0, 0]
  np.testing.assert_array_equal(p[5], [1, 1, 1, 0, 0, 1])
  np.testing.assert_array_equal(p[2], [1, 1, 1, 0, 0, 0])


@pytest.fixture(scope="module")
def config():
  return open_clip_tiny.get_config()


@pytest.fixture(scope="module")
def model(config):
  return coca.build(config.model, seed=2)


@pytest.mark.slow  # builds the tiny model (~10 s)
def test_single_pooler_splits_embedding_and_caption_tokens(model, config):
  image = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  embedding, caption_tokens = model.encode_image(image)
  tokens_ = model.vision(image)
  assert tokens_.shape == (2, 1 + 16, 48)  # class token + 4 x 4 patches, ViT width 48
  pooled = model.caption_pooler(tokens_)
  assert pooled.shape == (2, 8, 32)
  assert model.contrastive_pooler is None
  np.testing.assert_allclose(caption_tokens, pooled[:, 1:], atol=1e-6)
  expected = coca.l2_normalize(model.image_projection(pooled[:, 0]))
  np.testing.assert_allclose(embedding, expected, atol=1e-6)


def test_open_clip_text_rows():
  contract = tokens.Contract(bos_id=SOT, eos_id=EOT, pad_id=0, eos_input=True, stop_at_pad=True)
  rows = tokens.model_text(np.array([[5, 0, 7, 9, 9], [8, 8, 8, 8, 8]]), [3, 5], 6, contract)
  # A real "!" (0) stays; texts are cut to T - 2 = 4 tokens; EOS is an input.
  np.testing.assert_array_equal(rows["ids"], [[SOT, 5, 0, 7, EOT, 0], [SOT, 8, 8, 8, 8, EOT]])
  np.testing.assert_array_equal(rows["labels"], [[5, 0, 7, EOT, 0, 0], [8, 8, 8, 8, EOT, 0]])
  np.testing.assert_array_equal(rows["mask"], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])

  class Vocab:
    vocab_size = 64

    def encode(self, s):
      return [ord(c) - 90 for c in s]

    def decode(self, ids):
      return "".join(chr(i + 90) for i in ids)

  texted = tokens.tokenize(Vocab(), ["abc"], 6, contract)
  np.testing.assert_array_equal(texted["ids"], [[SOT, 7, 8, 9, EOT, 0]])
  # Decoded text stops at EOS, or at pad with stop_at_pad; specials never print.
  out = tokens.detokenize(Vocab(), np.array([[7, 8, EOT, 9], [7, 0, 9, 9]]), contract=contract)
  assert out == ["ab", "a"]
  # The paper's contract is unchanged: BOS = pad 0, EOS 1 a label only.
  paper = tokens.model_text(np.array([[5, 6, 7]]), [2], 4)
  np.testing.assert_array_equal(paper["ids"], [[0, 5, 6, 0]])
  np.testing.assert_array_equal(paper["labels"], [[5, 6, 1, 0]])


def test_synthetic_batches_follow_the_contract(config):
  batch = synthetic.batch(0, 0, range(8), 16, 8, 64, tokens.Contract.from_config(config))
  ids, labels, mask = (batch["text"][k] for k in ("ids", "labels", "mask"))
  assert (ids[:, 0] == SOT).all()
  np.testing.assert_array_equal(ids[:, 1:], labels[:, :-1])  # labels = ids shifted by one
  eos_at = mask.sum(1) - 1
  assert (labels[np.arange(8), eos_at] == EOT).all()
  assert not np.isin(labels * mask, [SOT]).any()


@pytest.mark.slow  # compiles three decoders (~15 s)
def test_cached_decoding_equals_recompute_and_starts_from_bos(model, config):
  images = jnp.asarray(np.random.default_rng(1).normal(size=(3, 16, 16, 3)), jnp.float32)
  graphdef, params = nnx.split(model)
  options = decode.DecodeOptions.from_config(config, method="greedy")
  assert options.contract.bos_id == SOT and options.contract.stop_at_pad
  cached = decode.jit_generate(graphdef, options, cached=True)(params, images)
  full = decode.jit_generate(graphdef, options, cached=False)(params, images)
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_allclose(cached.scores, full.scores, rtol=1e-4, atol=1e-4)
  # The first step reads BOS: its logits equal the model's at position 0 of [SOT].
  _, caption_tokens = model.encode_image(images)
  ids = jnp.full((3, 1), SOT, jnp.int32)
  mask = jnp.ones_like(ids)
  _, unimodal = model.encode_text(ids, mask)
  first = model.caption_logits(unimodal, caption_tokens, mask)[:, 0]
  greedy = decode.DecodeOptions.from_config(config, method="greedy", max_length=1)
  out = decode.jit_generate(graphdef, greedy)(params, images)
  np.testing.assert_array_equal(out.tokens[:, 0], jnp.argmax(first, -1))


@pytest.mark.slow  # three decoding loops (~2.5 s)
def test_decoding_stops_at_eos_or_pad_by_contract():
  # A step "model" whose next token depends on the input token only: BOS(62) -> 5,
  # 5 -> pad 0, 0 -> 7, 7 -> 7.
  table = np.full((64, 64), -10.0, np.float32)
  for a, b in [(62, 5), (5, 0), (0, 7), (7, 7)]:
    table[a, b] = 0.0
  table = jnp.asarray(table)

  def step(ids, cache, context):
    return table[ids], dict(index=cache["index"] + 1)

  step_model = decode.StepModel(
    step, dict(index=jnp.int32(0)), jnp.zeros((1,)), dict(index=None), 0
  )
  stop = tokens.Contract(bos_id=62, eos_id=63, pad_id=0, eos_input=True, stop_at_pad=True)
  go_on = tokens.Contract(bos_id=62, eos_id=63, pad_id=0, eos_input=True, stop_at_pad=False)
  out = decode.sample_loop(step_model, batch=1, max_length=4, contract=stop)
  np.testing.assert_array_equal(out.tokens, [[5, 0, 0, 0]])
  out = decode.sample_loop(step_model, batch=1, max_length=4, contract=go_on)
  np.testing.assert_array_equal(out.tokens, [[5, 0, 7, 7]])
  out = decode.beam_search_loop(step_model, batch=1, max_length=4, beam_size=1, contract=stop)
  np.testing.assert_array_equal(out.tokens, [[5, 0, 0, 0]])
  # A forced prefix token equal to pad (open_clip's "!") does not stop decoding.
  for loop in (decode.sample_loop, functools.partial(decode.beam_search_loop, beam_size=1)):
    out = loop(step_model, batch=1, max_length=4, contract=stop, prefix=[[5, 0]], prefix_length=[2])
    np.testing.assert_array_equal(out.tokens, [[5, 0, 7, 7]])
