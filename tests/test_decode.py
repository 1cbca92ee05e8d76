"""Decoding: cached == full recompute, beam-1 == greedy, top-k=1 == greedy, EOS, prefix,
beam search on a hand-made model whose best sequence is known, sharded batch."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coca_jax import decode, tokens
from coca_jax.models import coca
from configs import tiny

B, L = 4, 8  # tiny config: max_len 8


def make_options(method, **overrides):
  """DecodeOptions from the tiny config's eval.decode (where the defaults live)."""
  return decode.DecodeOptions.from_config(tiny.get_config(), method=method, **overrides)


@pytest.fixture(scope="module")
def model():
  return coca.build(tiny.get_config().model, seed=1)


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(0).normal(size=(B, 16, 16, 3)).astype(np.float32))


@pytest.fixture(scope="module")
def graphdef_params(model):
  graphdef, params = nnx.split(model)
  return graphdef, params


@functools.lru_cache(maxsize=None)
def jitted(graphdef, options, cached=True):
  """One compiled decoder per options for the whole module (compiles dominate runtime)."""
  return decode.jit_generate(graphdef, options, cached=cached)


@functools.lru_cache(maxsize=None)
def reference_last_logits(graphdef):
  @jax.jit
  def last_logits(params, images, ids):
    m = nnx.merge(graphdef, params)
    _, caption_tokens = m.encode_image(images)
    mask = jnp.ones_like(ids)
    _, unimodal = m.encode_text(ids, mask)
    return m.caption_logits(unimodal, caption_tokens, mask)[:, -1]

  return last_logits


def reference_greedy(model, images, length, prefix=None):
  """Greedy by full recompute: at each length t the whole text [BOS, tokens so far]
  (unpadded, mask all ones) goes through encode_text + caption_logits and the argmax of
  the last position is the next token. prefix: a list of forced tokens per example."""
  graphdef, params = nnx.split(model)
  last_logits = reference_last_logits(graphdef)

  batch = images.shape[0]
  prefix = prefix or [[]] * batch
  out = np.zeros((batch, length), np.int64)
  done = np.zeros(batch, bool)
  for t in range(length):
    ids = np.concatenate([np.zeros((batch, 1), np.int64), out[:, :t]], axis=1)
    chosen = np.argmax(
      np.asarray(last_logits(params, images, jnp.asarray(ids, jnp.int32))), axis=-1
    )
    for b in range(batch):
      if t < len(prefix[b]):
        chosen[b] = prefix[b][t]
    out[:, t] = np.where(done, 0, chosen)
    done |= out[:, t] == tokens.EOS_ID
  return out


@pytest.mark.slow  # ~16 s; the quick loop keeps the cached beam search == full recompute
def test_cached_greedy_equals_full_recompute(model, images, graphdef_params):
  graphdef, params = graphdef_params
  options = make_options("greedy", max_length=L)
  cached = jitted(graphdef, options)(params, images)
  expected = reference_greedy(model, images, L)
  np.testing.assert_array_equal(np.asarray(cached.tokens), expected)
  # The benchmark's baseline (recompute inside the while_loop) agrees as well.
  recomputed = jitted(graphdef, options, cached=False)(params, images)
  np.testing.assert_array_equal(np.asarray(recomputed.tokens), expected)
  np.testing.assert_allclose(np.asarray(recomputed.scores), np.asarray(cached.scores), rtol=1e-4)


def test_cached_beam_search_equals_full_recompute(graphdef_params, images):
  """The cached decoder folds each image's beams into cross-attention's query axis (one
  copy of the image keys/values); the recompute baseline repeats the image tokens per
  beam. Same hypotheses, same scores."""
  graphdef, params = graphdef_params
  options = make_options("beam", max_length=L, beam_size=3)
  cached = jitted(graphdef, options)(params, images)
  recomputed = jitted(graphdef, options, cached=False)(params, images)
  np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(recomputed.tokens))
  np.testing.assert_allclose(np.asarray(cached.scores), np.asarray(recomputed.scores), rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_cached_decoding_with_several_layers_per_stack_equals_full_recompute(images, method):
  """Two unimodal and three multimodal layers: each unrolled layer must read its own
  weights, image keys/values and KV cache buffer (tiny has one layer per stack)."""
  config = tiny.get_config()
  config.model.text.update(unimodal_layers=2, multimodal_layers=3)
  graphdef, params = nnx.split(coca.build(config.model, seed=2))
  options = make_options(method, max_length=L, beam_size=3)
  cached = jitted(graphdef, options)(params, images)
  recomputed = jitted(graphdef, options, cached=False)(params, images)
  np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(recomputed.tokens))
  np.testing.assert_allclose(np.asarray(cached.scores), np.asarray(recomputed.scores), rtol=1e-4)


def test_beam_one_and_top_k_one_equal_greedy(graphdef_params, images):
  """top-k 1 sampling is greedy. Beam search with one beam follows greedy's path, and a
  stop token among the 2 most likely tokens (t5x's 2K candidates) joins its finished set
  even where greedy goes on: it returns greedy's caption or one that scores better under
  the length penalty, and greedy's where neither stops."""
  graphdef, params = graphdef_params
  greedy = jitted(graphdef, make_options("greedy", max_length=L))(params, images)
  options = make_options("beam", max_length=L, beam_size=1)
  beam = jitted(graphdef, options)(params, images)
  sample = jitted(graphdef, make_options("sample", max_length=L, top_k=1, temperature=0.7))(
    params, images, rng=jax.random.key(3)
  )
  np.testing.assert_array_equal(np.asarray(sample.tokens), np.asarray(greedy.tokens))
  greedy_tokens, beam_tokens = np.asarray(greedy.tokens), np.asarray(beam.tokens)
  stops = greedy_tokens == tokens.EOS_ID
  lengths = np.where(stops.any(1), stops.argmax(1) + 1, L)
  greedy_scores = np.asarray(greedy.scores) / ((5 + lengths) / 6) ** options.length_penalty
  assert np.all(np.asarray(beam.scores) >= greedy_scores - 1e-5)
  neither_stops = ~stops.any(1) & ~(beam_tokens == tokens.EOS_ID).any(1)
  assert neither_stops.sum() >= 2
  np.testing.assert_array_equal(beam_tokens[neither_stops], greedy_tokens[neither_stops])


@pytest.mark.slow  # ~15 s
def test_prefix_is_forced_and_continued(model, images, graphdef_params):
  graphdef, params = graphdef_params
  prefixes = [[5, 6, 7], [9], [], [4, 4]]
  prefix = np.zeros((B, 3), np.int32)
  for b, p in enumerate(prefixes):
    prefix[b, : len(p)] = p
  lengths = np.array([len(p) for p in prefixes], np.int32)
  options = make_options("greedy", max_length=L)
  out = jitted(graphdef, options)(params, images, jnp.asarray(prefix), jnp.asarray(lengths))
  np.testing.assert_array_equal(
    np.asarray(out.tokens), reference_greedy(model, images, L, prefixes)
  )
  beam = jitted(graphdef, make_options("beam", max_length=L, beam_size=3))(
    params, images, jnp.asarray(prefix), jnp.asarray(lengths)
  )
  for b, p in enumerate(prefixes):
    assert list(np.asarray(beam.tokens)[b, : len(p)]) == p


# ---- a hand-made Markov "model": the next-token distribution depends on the last token.
# Tokens: 0 pad/BOS, 1 EOS, 2 "A", 3 "B".
TRANSITIONS = np.log(
  np.array(
    [
      [1e-9, 0.1, 0.5, 0.4],  # after BOS: greedy takes A
      [1.0, 1e-9, 1e-9, 1e-9],  # after EOS (never used)
      [1e-9, 0.3, 0.4, 0.3],  # after A: A again is most likely, EOS 0.3
      [1e-9, 0.9, 0.05, 0.05],  # after B: EOS almost surely
    ]
  )
).astype(np.float32)


def markov_step_model(batch, table=TRANSITIONS):
  table = jnp.asarray(table)

  def step(ids, cache, context):
    return table[ids] + context, dict(index=cache["index"] + 1, count=cache["count"] + 1)

  cache = dict(index=jnp.int32(0), count=jnp.zeros((batch,), jnp.int32))
  context = jnp.zeros((batch, 1), jnp.float32)
  return decode.StepModel(step, cache, context, dict(index=None, count=0), 0)


def best_sequence_by_enumeration(max_length):
  """Exhaustive search over every sequence of tokens {1, 2, 3} up to max_length."""
  best, best_score = None, -np.inf
  for n in range(1, max_length + 1):
    for seq in itertools.product([1, 2, 3], repeat=n):
      # A hypothesis ends with EOS, or without one at max_length.
      if 1 in seq[:-1] or (seq[-1] != 1 and n < max_length):
        continue
      previous, score = 0, 0.0
      for token in seq:
        score += TRANSITIONS[previous, token]
        previous = token
      if score > best_score:
        best, best_score = list(seq), score
  return best + [0] * (max_length - len(best)), best_score


def test_beam_search_finds_the_known_best_sequence_where_greedy_fails():
  length = 5
  expected, expected_score = best_sequence_by_enumeration(length)
  assert expected[:2] == [3, 1]  # B EOS: 0.4 * 0.9 = 0.36
  greedy = decode.sample_loop(markov_step_model(2), batch=2, max_length=length)
  assert list(np.asarray(greedy.tokens)[0]) == [2, 2, 2, 2, 2]  # A A A A A, never EOS
  beam = decode.beam_search_loop(
    markov_step_model(2), batch=2, max_length=length, beam_size=2, alpha=0.0
  )
  np.testing.assert_array_equal(np.asarray(beam.tokens), [expected, expected])
  np.testing.assert_allclose(np.asarray(beam.scores), expected_score, rtol=1e-5)


def test_eos_stops_each_example():
  # Example-dependent offsets (through `context`) make example 0 end at step 1 and
  # example 1 run on: after BOS, example 0 prefers EOS.
  step_model = markov_step_model(2)
  context = jnp.asarray([[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], jnp.float32)
  step_model = step_model._replace(context=context)
  out = decode.sample_loop(step_model, batch=2, max_length=5)
  np.testing.assert_array_equal(np.asarray(out.tokens), [[1, 0, 0, 0, 0], [2, 2, 2, 2, 2]])


def test_min_length_holds_back_every_stop_until_it_is_reached():
  """Example 0 prefers EOS at every step (the context offset): with min_length 3 greedy
  decoding takes the best other token twice, then EOS, the third token; example 1
  never ends. Scores stay the model's log p of the chosen tokens (numpy by hand)."""
  step_model = markov_step_model(2)
  offset = np.array([[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  step_model = step_model._replace(context=jnp.asarray(offset))
  out = decode.sample_loop(step_model, batch=2, max_length=5, min_length=3)
  np.testing.assert_array_equal(np.asarray(out.tokens), [[2, 2, 1, 0, 0], [2, 2, 2, 2, 2]])
  logits = TRANSITIONS.astype(np.float64) + offset[0]
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  np.testing.assert_allclose(
    float(out.scores[0]), log_p[0, 2] + log_p[2, 2] + log_p[2, 1], rtol=1e-5
  )
  # min_length 0 and 1 hold nothing back.
  for m in (0, 1):
    out = decode.sample_loop(step_model, batch=2, max_length=5, min_length=m)
    np.testing.assert_array_equal(np.asarray(out.tokens)[0], [1, 0, 0, 0, 0])


def test_ids_past_the_tokenizer_are_never_chosen():
  """A model vocabulary padded past the tokenizer's (1,024 rows, 1,000 pieces in the demo):
  sampling drew a padding id about once in 4,000 tokens, a hole in the caption. Here "B"
  (id 3) leads every step; with num_tokens=3 no method chooses it."""
  step_model = markov_step_model(64)
  boost = np.zeros((64, 4), np.float32)
  boost[:, 3] = 3.0
  step_model = step_model._replace(context=jnp.asarray(boost))
  free = decode.sample_loop(step_model, batch=64, max_length=4)
  assert np.all(np.asarray(free.tokens)[:, 0] == 3)  # the case has teeth
  outs = [
    decode.sample_loop(step_model, batch=64, max_length=4, num_tokens=3),
    decode.sample_loop(
      step_model, batch=64, max_length=4, num_tokens=3, temperature=2.0, rng=jax.random.key(0)
    ),
    decode.beam_search_loop(step_model, batch=64, max_length=4, beam_size=3, num_tokens=3),
  ]
  for out in outs:
    assert not np.any(np.asarray(out.tokens) == 3)


def test_the_configs_min_length_is_capped_at_max_length():
  """A config's min_length above a call's max_length was an error about an option the
  caller never set; one given with the call still is. An older config has none."""
  config = tiny.get_config()
  config.eval.decode.min_length = 6
  assert decode.DecodeOptions.from_config(config, method="greedy", max_length=3).min_length == 3
  assert decode.DecodeOptions.from_config(config, method="greedy").min_length == 6
  with pytest.raises(ValueError, match=r"min_length=4 must be in 0..max_length=3"):
    decode.DecodeOptions.from_config(config, method="greedy", max_length=3, min_length=4)
  older = tiny.get_config()
  older.eval.decode = {k: v for k, v in older.eval.decode.items() if k != "min_length"}
  assert decode.DecodeOptions.from_config(older, method="greedy").min_length == 0


def test_filter_logits_top_k_and_top_p_by_hand():
  logits = jnp.log(jnp.asarray([[0.1, 0.5, 0.15, 0.25]]))
  kept = np.asarray(decode.filter_logits(logits, top_k=2)) > decode.NEG / 2
  np.testing.assert_array_equal(kept, [[False, True, False, True]])
  # Sorted: 0.5, 0.25, 0.15, 0.1 -> mass before: 0, 0.5, 0.75, 0.9; p=0.7 keeps 0.5, 0.25.
  kept = np.asarray(decode.filter_logits(logits, top_p=0.7)) > decode.NEG / 2
  np.testing.assert_array_equal(kept, [[False, True, False, True]])
  kept = np.asarray(decode.filter_logits(logits, top_p=0.8)) > decode.NEG / 2
  np.testing.assert_array_equal(kept, [[False, True, True, True]])


def test_sampling_at_a_tiny_temperature_never_draws_a_filtered_token():
  """Logits of -0.5 to -2 over a temperature of 1e-12 reach -2e12, below any finite
  filler value: the filtered tokens must still be impossible, so top-k 1 is argmax."""
  table = jnp.asarray([[-2.0, -1.5, -0.5, -1.0]], jnp.float32)

  def step(ids, cache, context):
    return jnp.broadcast_to(table, (ids.shape[0], 4)), cache

  rows = 256
  model = decode.StepModel(step, jnp.zeros((rows,)), jnp.zeros((rows,)), 0, 0)
  out = decode.sample_loop(
    model, batch=rows, max_length=1, temperature=1e-12, top_k=1, rng=jax.random.key(0)
  )
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], np.full(rows, 2))


@pytest.mark.slow  # ~7 s
def test_decoding_a_batch_sharded_over_eight_devices(graphdef_params):
  graphdef, params = graphdef_params
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  images = np.random.default_rng(1).normal(size=(8, 16, 16, 3)).astype(np.float32)
  sharded = jax.device_put(
    images, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  )
  for options in (
    make_options("greedy", max_length=L),
    make_options("beam", max_length=L, beam_size=3),
  ):
    fn = jitted(graphdef, options)
    expected = fn(params, jnp.asarray(images))
    with jax.set_mesh(mesh):
      got = fn(params, sharded)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(expected.tokens))
