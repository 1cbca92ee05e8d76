"""Decoding loops against exact references on toy models: beam search with a GNMT length
penalty against exhaustive enumeration, and sampling frequencies (temperature, top-k,
top-p) against the exact distribution, token by token and over whole sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from beam_enumeration import enumerate_best

from coca_jax import decode
from coca_jax import tokens as tokens_lib

pytestmark = pytest.mark.slow  # ~12 s of compiles and 40,000-row draws

# Tokens: 0 pad/BOS, 1 EOS, 2 "A", 3 "B", 4 "C". Row = the previous token.
PROBS = np.array(
  [
    [1e-9, 0.05, 0.6, 0.2, 0.15],  # after BOS
    [1.0, 1e-9, 1e-9, 1e-9, 1e-9],  # after EOS (never used)
    [1e-9, 0.3, 0.6, 0.05, 0.05],  # after A: "A EOS" (0.18) vs "A A A A" (0.13, longer)
    [1e-9, 0.6, 0.1, 0.2, 0.1],  # after B
    [1e-9, 0.1, 0.3, 0.3, 0.3],  # after C
  ]
)
TABLE = np.log(PROBS / PROBS.sum(1, keepdims=True)).astype(np.float32)
REAL = (1, 2, 3, 4)  # tokens a hypothesis can hold (pad has probability ~0)


def markov(batch: int) -> decode.StepModel:
  """Next-token logits depend on the last token only; no cache, no context."""
  table = jnp.asarray(TABLE)

  def step(ids, cache, context):
    return table[ids], cache

  return decode.StepModel(step, jnp.zeros((batch,)), jnp.zeros((batch,)), 0, 0)


def chain_best(max_length: int, alpha: float):
  """The exhaustive optimum of the chain above (beam_enumeration.enumerate_best, with
  the same table at every position): (tokens [max_length], score, second best score)."""
  tables = np.broadcast_to(TABLE, (max_length, *TABLE.shape))
  return enumerate_best(tables, max_length, alpha, tokens_lib.PAPER, REAL)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_beam_search_with_length_penalty_equals_enumeration(alpha):
  length = 4
  expected, expected_score, _ = chain_best(length, alpha)
  # Beams wide enough to hold every hypothesis (4^4 = 256 live at most): nothing is
  # pruned, so the search must return the exhaustive optimum under the same penalty.
  out = decode.beam_search_loop(markov(2), batch=2, max_length=length, beam_size=256, alpha=alpha)
  np.testing.assert_array_equal(np.asarray(out.tokens), [expected, expected])
  np.testing.assert_allclose(np.asarray(out.scores), expected_score, rtol=1e-5)


def test_length_penalty_changes_the_winner():
  """The case above has teeth: the penalty decides between a short and a long caption."""
  assert chain_best(4, 0.0)[0] == [2, 1, 0, 0]  # A EOS: p 0.18
  assert chain_best(4, 1.0)[0] == [2, 2, 2, 2]  # p 0.13, but 4 tokens long


def exact_next(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """The distribution the sampler should draw from, computed independently in float64:
  softmax(logits / T), restricted to the k most likely and to the smallest most-likely
  set whose mass reaches p (tokens tied with the least likely kept one are kept too, as
  decode.filter_logits documents), renormalised."""
  p = np.exp((logits - logits.max()) / temperature)
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  keep = np.zeros_like(p, bool)
  mass = 0.0
  for rank, token in enumerate(order):
    if (top_k and rank >= top_k) or mass >= top_p:
      break
    keep[token] = True
    mass += p[token]
  keep |= p >= p[keep].min()
  q = np.where(keep, p, 0.0)
  return q / q.sum()


SETTINGS = [
  (1.0, 0, 1.0),
  (0.5, 0, 1.0),
  (2.0, 0, 1.0),
  (1.0, 0, 0.7),
  (1.5, 3, 0.9),
  (1.0, 2, 1.0),
]
N = 40_000


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_sampling_frequencies_match_the_exact_distribution(temperature, top_k, top_p):
  """First token after BOS, N independent rows: total variation to the exact
  distribution within 3.5 standard errors, and no draw outside the kept set."""
  out = decode.sample_loop(
    markov(N),
    batch=N,
    max_length=1,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    rng=jax.random.key(0),
  )
  drawn = np.bincount(np.asarray(out.tokens)[:, 0], minlength=5) / N
  want = exact_next(TABLE[0].astype(np.float64), temperature, top_k, top_p)
  assert np.all(drawn[want == 0] == 0), (drawn, want)
  # Per-token standard error sqrt(q (1 - q) / N) <= 0.0025; TV sums half of |errors|.
  tv = 0.5 * np.abs(drawn - want).sum()
  assert tv < 3.5 * 0.5 * np.sqrt(want * (1 - want) / N).sum(), (tv, drawn, want)


def test_sampled_sequences_follow_the_chain():
  """Two tokens per row: the joint frequency of each (first, second) pair matches
  p(first | BOS) p(second | first) at temperature 0.8, top-p 0.9 (each step
  filtered on its own conditional), and rows that drew EOS first end with pad."""
  temperature, top_p = 0.8, 0.9
  out = decode.sample_loop(
    markov(N), batch=N, max_length=2, temperature=temperature, top_p=top_p, rng=jax.random.key(1)
  )
  tokens = np.asarray(out.tokens)
  first = exact_next(TABLE[0].astype(np.float64), temperature, 0, top_p)
  joint = np.zeros((5, 5))
  for a in range(5):
    if first[a] == 0:
      continue
    if a == 1:  # EOS: the row stops, the second token is pad
      joint[a, 0] = first[a]
    else:
      joint[a] = first[a] * exact_next(TABLE[a].astype(np.float64), temperature, 0, top_p)
  drawn = np.zeros((5, 5))
  np.add.at(drawn, (tokens[:, 0], tokens[:, 1]), 1.0 / N)
  assert np.all(drawn[joint == 0] == 0)
  tv = 0.5 * np.abs(drawn - joint).sum()
  assert tv < 3.5 * 0.5 * np.sqrt(joint * (1 - joint) / N).sum(), tv


@pytest.mark.parametrize("temperature,top_p", [(1.2, 1.0), (1.0, 0.62)])
def test_min_length_samples_from_the_model_without_its_stops(temperature, top_p):
  """min_length 2: the first token is drawn from p(. | BOS) without EOS, renormalised,
  then filtered; the second from the filtered conditional, EOS included. Joint
  frequencies against the exact distribution. Unfiltered, EOS first (p 0.05) would
  show; at top-p 0.62 the order matters: without EOS "A" (0.63) fills the nucleus
  alone, while filtering first would keep "B" too (A 0.6 < 0.62)."""
  out = decode.sample_loop(
    markov(N),
    batch=N,
    max_length=2,
    min_length=2,
    temperature=temperature,
    top_p=top_p,
    rng=jax.random.key(2),
  )
  tokens = np.asarray(out.tokens)
  without_eos = TABLE[0].astype(np.float64)
  without_eos[1] = -np.inf
  first = exact_next(without_eos, temperature, 0, top_p)
  assert first[1] == 0 and first[2] > 0
  joint = first[:, None] * np.stack(
    [exact_next(TABLE[a].astype(np.float64), temperature, 0, top_p) for a in range(5)]
  )
  assert joint[:, 1].sum() > 0.1  # EOS second is common: the test has teeth
  drawn = np.zeros((5, 5))
  np.add.at(drawn, (tokens[:, 0], tokens[:, 1]), 1.0 / N)
  assert np.all(drawn[joint == 0] == 0)
  tv = 0.5 * np.abs(drawn - joint).sum()
  assert tv < 3.5 * 0.5 * np.sqrt(joint * (1 - joint) / N).sum(), tv


def test_a_rows_sample_depends_on_its_key_only():
  """Row b decodes with its own key: alone or beside other rows, the same tokens; one
  key for the batch is the per-row keys fold_in(key, b)."""
  keys = jax.random.split(jax.random.key(4), 6)

  def sample(batch, rng):
    return np.asarray(
      decode.sample_loop(markov(batch), batch=batch, max_length=3, temperature=1.5, rng=rng).tokens
    )

  together = sample(6, keys)
  assert len({row.tobytes() for row in together}) > 1
  for b in (0, 3, 5):
    np.testing.assert_array_equal(sample(1, keys[b : b + 1])[0], together[b])
  one_key = jax.random.key(9)
  per_row = jnp.stack([jax.random.fold_in(one_key, b) for b in range(6)])
  np.testing.assert_array_equal(sample(6, one_key), sample(6, per_row))
