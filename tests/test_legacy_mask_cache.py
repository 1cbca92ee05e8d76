"""Cached decoding under open_clip's legacy mask (`mask_mode="open_clip_legacy"`): key
j >= 1 of the unimodal stack is hidden from every query when token j - 1 is pad (0, the
real BPE token "!"), so a KV cache must carry that mask too. Cached logits, fed token by
token or in chunks, equal the full forward's on texts with 0 at several positions;
decoding with such a forced prefix equals decoding by full recompute."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coca_jax import decode
from coca_jax.models import coca
from configs.open_clip import tiny as open_clip_tiny

SOT = 62  # the tiny open_clip config's BOS (pad 0)
# Length max_len = 8; 0 right after SOT, twice in a row, and last.
TEXTS = np.array(
  [[SOT, 5, 0, 9, 11, 0, 0, 7], [SOT, 0, 3, 0, 8, 2, 9, 0]],
  np.int32,
)


@pytest.fixture(scope="module")
def config():
  return open_clip_tiny.get_config()


@pytest.fixture(scope="module")
def model(config):
  return coca.build(config.model, seed=3)


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, 16, 3)), jnp.float32)


@pytest.fixture(scope="module")
def full_logits(model, images):
  """The full forward's logits [B, T, V] of TEXTS (mask all ones; the legacy mask reads
  the ids only)."""
  _, caption_tokens = model.encode_image(images)
  ids = jnp.asarray(TEXTS)
  mask = jnp.ones_like(ids)
  _, unimodal = model.encode_text(ids, mask)
  return np.asarray(model.caption_logits(unimodal, caption_tokens, mask))


@pytest.mark.parametrize(
  "chunks",
  # Two chunkings in the quick loop (one token at a time; all at once), two (~5 s each) slow.
  [(1,) * 8, (8,), *(pytest.param(c, marks=pytest.mark.slow) for c in [(3, 1, 4), (2, 5, 1)])],
)
def test_cached_logits_equal_full_forward(model, images, full_logits, chunks):
  """TEXTS through `decode_step` in chunks of the given lengths (one token per step, all
  at once, or mixed) gives the full forward's logits at every position."""
  assert model.text.mask_mode == "open_clip_legacy"
  _, caption_tokens = model.encode_image(images)
  text = model.text
  cache = text.init_cache(TEXTS.shape[0], TEXTS.shape[1])
  layers = text.decoding_layers(caption_tokens)
  logits, start = [], 0
  for size in chunks:
    chunk = jnp.asarray(TEXTS[:, start : start + size])
    step_logits, cache = text.decode_step(chunk, cache, layers)
    logits.append(np.asarray(step_logits))
    start += size
  np.testing.assert_allclose(np.concatenate(logits, axis=1), full_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_decoding_with_a_forced_prefix_containing_pad_equals_recompute(
  model, images, config, method
):
  """A prefix with 0 at several positions (forced, so 0 does not stop decoding): the
  cached decoder's tokens and scores equal full recompute's (beam search also reorders
  the cache's key mask with the beams)."""
  graphdef, params = nnx.split(model)
  options = decode.DecodeOptions.from_config(config, method=method, beam_size=2)
  prefix = jnp.asarray(TEXTS[:, 1:6])  # no BOS: [5, 0, 9, 11, 0], [0, 3, 0, 8, 2]
  lengths = jnp.full((2,), 5, jnp.int32)
  cached = decode.jit_generate(graphdef, options, cached=True)(params, images, prefix, lengths)
  full = decode.jit_generate(graphdef, options, cached=False)(params, images, prefix, lengths)
  np.testing.assert_array_equal(cached.tokens[:, :5], prefix)
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_allclose(cached.scores, full.scores, rtol=1e-5, atol=1e-5)
