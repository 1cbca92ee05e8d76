"""Beam search keeps finished hypotheses apart from the live ones: a finished caption is
never pushed out of the beam by live extensions, and the search returns the best
hypothesis it found. Toy Markov step models (the next token depends on the last one)
against exhaustive enumeration with GNMT length penalties, prefixes and both stop
contracts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from beam_enumeration import enumerate_best

from coca_jax import decode
from coca_jax import tokens as tokens_lib

# The paper's ids: 0 pad/BOS (not a stop), 1 EOS, 2 "A", 3 "B".
PAPER = tokens_lib.PAPER
# open_clip's layout: pad 0 stops like EOS 1, BOS 4 is never an output.
STOP_AT_PAD = tokens_lib.Contract(bos_id=4, eos_id=1, pad_id=0, eos_input=True, stop_at_pad=True)


def markov(tables: np.ndarray) -> decode.StepModel:
  """tables [B, L, V, V] of log-probabilities, one per example and position, row = the
  previous token (position-dependent, so no two sequences tie by reordering). Beam search
  repeats the tables per beam (context batch axis 0); the cache counts the steps."""

  def step(ids, cache, context):
    return context[jnp.arange(ids.shape[0]), cache, ids], cache + 1

  batch = tables.shape[0]
  return decode.StepModel(
    step, jnp.zeros((batch,), jnp.int32), jnp.asarray(tables, jnp.float32), 0, 0
  )


# ---- the reviewer's case: finished hypotheses lost their beam slots.
# V = 4, 0 BOS/pad, 1 EOS, 2 "a", 3 "b"; the same table at every position. The empty
# caption (EOS first, p 0.3) beats every longer one, but "a" and "b" (0.35 each) take
# both beam slots at step 0.
TOY = np.log(
  np.array(
    [
      [1e-9, 0.30, 0.35, 0.35],  # after BOS
      [1e-9, 0.25, 0.375, 0.375],  # after EOS (never used)
      [1e-9, 0.20, 0.40, 0.40],  # after a
      [1e-9, 0.20, 0.40, 0.40],  # after b
    ]
  )
).astype(np.float32)


@pytest.mark.parametrize("max_length", [2, 3, 5])
def test_a_finished_caption_is_not_pushed_out_by_live_ones(max_length):
  """Two beams, alpha 0: the empty caption (log p -1.20) must win over "a a a a a"
  (-4.71), which the search used to return because EOS was not kept apart."""
  tables = np.stack([TOY] * max_length)
  expected, expected_score, _ = enumerate_best(tables, max_length, 0.0, PAPER, (1, 2, 3))
  assert expected == [1] + [0] * (max_length - 1)
  np.testing.assert_allclose(expected_score, np.log(0.3))
  out = decode.beam_search_loop(
    markov(np.stack([tables] * 2)), batch=2, max_length=max_length, beam_size=2, alpha=0.0
  )
  np.testing.assert_array_equal(np.asarray(out.tokens), [expected] * 2)
  np.testing.assert_allclose(np.asarray(out.scores), expected_score, rtol=1e-5)


# ---- random chains against enumeration, where nothing is pruned.
L, BATCH = 4, 64


def random_tables(contract: tokens_lib.Contract, vocab: int) -> np.ndarray:
  """[BATCH, L, V, V] log-probabilities over the real tokens (0-3 but BOS; ~0 elsewhere):
  a stop (split between the stop ids) with probability 0.1-0.3 at the first position and
  0.002-0.02 later, "A" and "B" near even. So an early end competes with longer captions
  that outscore it half-way (more likely, longer under the penalty) and may fall behind it
  by max_length."""
  rng = np.random.default_rng(0)
  stops = [contract.eos_id] + ([contract.pad_id] if contract.stop_at_pad else [])
  go = [2, 3]
  end = rng.uniform(0.002, 0.02, (BATCH, L, vocab))
  end[:, 0] = rng.uniform(0.1, 0.3, (BATCH, vocab))
  probs = np.full((BATCH, L, vocab, vocab), 1e-9)
  probs[..., go] = (1 - end)[..., None] * rng.dirichlet([200.0] * len(go), (BATCH, L, vocab))
  probs[..., stops] = end[..., None] * rng.dirichlet([1.0] * len(stops), (BATCH, L, vocab))
  return np.log(probs / probs.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("min_length", [0, 3])
@pytest.mark.parametrize("alpha", [0.6, 1.0])
@pytest.mark.parametrize("contract", [PAPER, STOP_AT_PAD], ids=["paper", "stop_at_pad"])
def test_beam_search_equals_enumeration_with_length_penalty(alpha, contract, min_length):
  """Two tokens go on ("A", "B"), so 2^3 = 8 beams hold every live hypothesis up to
  length 3, and the 2K = 16 most likely extensions hold every one that ends before the
  last step: beam search must return the exhaustive optimum, whether it ends early or is
  cut off at max_length. A third of the examples have a forced one-token prefix "A", a
  third a forced pad (with stop_at_pad, a forced pad does not end the caption). With
  min_length 3 no stop id ends a caption (prefix included) before its third token."""
  vocab = 4 if contract is PAPER else 5
  tables = random_tables(contract, vocab)
  real = tuple(t for t in range(4) if t != contract.bos_id)
  prefixes = [[(), (2,), (contract.pad_id,)][b % 3] for b in range(BATCH)]
  out = decode.beam_search_loop(
    markov(tables),
    batch=BATCH,
    max_length=L,
    beam_size=8,
    alpha=alpha,
    prefix=np.array([p or (contract.pad_id,) for p in prefixes], np.int32),
    prefix_length=np.array([len(p) for p in prefixes], np.int32),
    contract=contract,
    min_length=min_length,
  )
  refs = [
    enumerate_best(t, L, alpha, contract, real, p, min_length) for t, p in zip(tables, prefixes)
  ]
  # Float32 search, float64 reference: no near ties at the top.
  assert min(best - second for _, best, second in refs) > 1e-4
  # The winners include captions cut off at max_length, and ones that end early or (with
  # min_length) ones that the minimum kept from ending early.
  stops = {contract.eos_id, contract.pad_id} if contract.stop_at_pad else {contract.eos_id}
  generated = [tokens[len(p) :] for (tokens, _, _), p in zip(refs, prefixes)]
  assert any(not stops & set(g) for g in generated)
  if min_length:
    free = [enumerate_best(t, L, alpha, contract, real, p) for t, p in zip(tables, prefixes)]
    assert any(f[0] != r[0] for f, r in zip(free, refs))
  else:
    assert any(stops & set(g[:-1]) for g in generated)
  np.testing.assert_array_equal(np.asarray(out.tokens), [tokens for tokens, _, _ in refs])
  np.testing.assert_allclose(np.asarray(out.scores), [s for _, s, _ in refs], rtol=1e-5)


# ---- min_length where every stop is likely: the caption ends exactly there.
def likely_stops(contract: tokens_lib.Contract, max_length: int) -> np.ndarray:
  """[L, V, V]: after BOS "a" leads "b" and the stops (with stop_at_pad, pad the
  likelier one); after "a" or "b" a stop is likelier than either, so the best caption is
  the shortest one allowed: "a" up to the minimum, then a stop."""
  vocab = 4 if contract is PAPER else 5
  probs = np.full((vocab, vocab), 1e-9)
  go = {2: 0.36, 3: 0.34} if contract is PAPER else {2: 0.34, 3: 0.31}
  first = {1: 0.30} if contract is PAPER else {0: 0.30, 1: 0.05}
  later = {1: 0.5, 2: 0.26, 3: 0.24} if contract is PAPER else {0: 0.45, 1: 0.1, 2: 0.24, 3: 0.21}
  for token, p in {**go, **first}.items():
    probs[contract.bos_id, token] = p
  for previous in (2, 3):
    for token, p in later.items():
      probs[previous, token] = p
  probs[[t for t in range(vocab) if t not in (2, 3, contract.bos_id)]] = 1.0 / vocab
  return np.log(np.stack([probs / probs.sum(1, keepdims=True)] * max_length))


@pytest.mark.parametrize("min_length", [2, 3, 4])
@pytest.mark.parametrize("contract", [PAPER, STOP_AT_PAD], ids=["paper", "stop_at_pad"])
def test_min_length_is_where_a_likely_stop_ends_the_caption(contract, min_length):
  """Greedy decoding and beam search both end the caption with its min_length-th token
  (every stop id held back before it), as exhaustive enumeration does."""
  length = 5
  tables = likely_stops(contract, length)
  real = tuple(t for t in range(tables.shape[-1]) if t != contract.bos_id)
  expected, score, _ = enumerate_best(tables, length, 0.0, contract, real, (), min_length)
  stop = expected[min_length - 1]
  assert expected[: min_length - 1] == [2] * (min_length - 1) and stop in contract.stop_ids
  batch = np.stack([tables] * 2)
  common = dict(batch=2, max_length=length, contract=contract, min_length=min_length)
  greedy = decode.sample_loop(markov(batch), **common)
  beam = decode.beam_search_loop(markov(batch), beam_size=2, alpha=0.0, **common)
  for out in (greedy, beam):
    np.testing.assert_array_equal(np.asarray(out.tokens), [expected] * 2)
    np.testing.assert_allclose(np.asarray(out.scores), score, rtol=1e-5)


def test_search_stops_once_no_live_hypothesis_can_win():
  """EOS is likely after every token: both finished slots fill within two steps, and the
  live hypotheses, even penalised at max_length, cannot beat them; the loop ends there."""
  probs = np.array(
    [
      [1e-9, 0.7, 0.2, 0.1],
      [1e-9, 0.7, 0.2, 0.1],
      [1e-9, 0.8, 0.1, 0.1],
      [1e-9, 0.8, 0.1, 0.1],
    ]
  )
  table = jnp.asarray(np.log(probs), jnp.float32)
  steps = []

  def step(ids, cache, context):
    jax.debug.callback(lambda: steps.append(1))
    return table[ids], cache

  step_model = decode.StepModel(step, jnp.zeros((1,)), jnp.zeros((1,)), 0, 0)
  out = decode.beam_search_loop(step_model, batch=1, max_length=8, beam_size=2, alpha=0.6)
  jax.effects_barrier()
  assert len(steps) == 2
  tables = np.log(np.stack([probs] * 8))
  expected, expected_score, _ = enumerate_best(tables, 8, 0.6, PAPER, (1, 2, 3))
  np.testing.assert_array_equal(np.asarray(out.tokens), [expected])
  np.testing.assert_allclose(np.asarray(out.scores), [expected_score], rtol=1e-5)
