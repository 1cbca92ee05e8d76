"""Caption decoding: greedy, sampling (temperature, top-k, top-p) and beam search.

Legend: B batch (images), K beams, L decode length (tokens generated, EOS included),
P prefix length, V vocabulary, N caption-pooler queries, S cache length (= L).

Every method is one `lax.while_loop` over positions 0..L-1 around a *step function*
`step(ids [B], cache, context) -> (logits [B, V] float32, cache)`:

  * `cache` changes every step (the decoder's self-attention keys/values and the write
    index); beam search reorders it when beams are re-ranked.
  * `context` is fixed for the whole loop: the decoder's layers sliced out of their
    stacks and the image side of cross-attention, its keys and values projected ONCE per
    image (`TextDecoder.decoding_layers`); beam search keeps one copy per image: the K
    beams of an image fold into cross-attention's query axis.

`cached_step_model` builds the step function of a CoCa model from its KV cache;
`recompute_step_model` is the same function by full recompute (the whole prefix through
both decoder stacks every step), kept as the reference and the benchmark baseline.

Token conventions (coca_jax/tokens.py, `tokens.Contract` from config.model.text): the
decoder input starts with BOS (the paper's: the pad id 0; open_clip's: SOT); decoding
stops at EOS (and at pad when the contract says so, as open_clip's generate does). Input
position 0 is BOS and position i > 0 is the token chosen at step i - 1; step i chooses
output token i. Outputs are [B, L]: (prefix), generated tokens, EOS, then pad. A prefix
("VQA as a prefix", Section 4.3 of the paper) is forced token by token: while
i < prefix_length the output is the prefix token, and the loop goes on from there.

Nothing here indexes across the batch: gathers are within an example (beams of one
image), so a batch sharded over ("data", "fsdp") stays sharded through the loop.
"""

import dataclasses
import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coca_jax import tokens as tokens_lib

METHODS = ("greedy", "beam", "sample")

# A very negative score for impossible hypotheses; finite, so sums and divisions of it
# never make NaN (-inf - -inf would).
NEG = -1e9


# Sampling at a lower temperature is greedy decoding to float32 precision, and logits
# divided by ~1e-37 overflow to inf (the samples then garbage).
MIN_TEMPERATURE = 1e-6


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How to decode; frozen (hashable) so it can be a static argument of jit. Built from
  config.eval.decode by `from_config`: the config holds the defaults.

  max_length: tokens to generate at most, EOS included (<= config.model.text.max_len).
  min_length: tokens a caption holds at least, EOS and a prefix included: no stop id ends
    it before (0 or 1: no minimum). open_clip's generate(min_seq_len=m) is min_length=m
    (its count includes the start token, ours the EOS).
  length_penalty: GNMT's alpha for beam search, score = log p / ((5 + len) / 6)^alpha.
  temperature / top_k / top_p: sampling only; top_k=0 and top_p=1.0 disable the filter.
  contract: BOS, EOS, pad and stop ids (config.model.text).
  num_tokens: the tokenizer's ids (0: every logit's): ids at or past it, rows of a
    vocabulary padded past the tokenizer's (e.g. to a multiple of 128), are never chosen;
    they have no text, and the caption went on from an untrained embedding.
  """

  method: str
  max_length: int
  beam_size: int
  length_penalty: float
  temperature: float
  top_k: int
  top_p: float
  min_length: int = 0
  contract: tokens_lib.Contract = tokens_lib.PAPER
  num_tokens: int = 0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"decode method={self.method!r}; use one of {METHODS}")
    for name in (
      "max_length",
      "min_length",
      "beam_size",
      "top_k",
      "num_tokens",
    ):  # shapes: a float fails deep in JAX
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"decode {name}={value!r} must be an integer")
    for name in ("length_penalty", "temperature", "top_p"):  # NaN passes every comparison
      value = getattr(self, name)
      if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"decode {name}={value!r} must be a finite number")
    if self.max_length < 1:
      raise ValueError(f"decode max_length={self.max_length} must be >= 1")
    if not 0 <= self.min_length <= self.max_length:
      raise ValueError(
        f"decode min_length={self.min_length} must be in 0..max_length={self.max_length} "
        "(a caption cannot be longer than max_length)"
      )
    if self.method == "beam" and self.beam_size < 1:
      raise ValueError(f"decode beam_size={self.beam_size} must be >= 1")
    if self.method == "sample" and (
      self.temperature < MIN_TEMPERATURE or not 0 < self.top_p <= 1 or self.top_k < 0
    ):
      raise ValueError(
        f"sampling needs temperature >= {MIN_TEMPERATURE} (below it, method greedy), "
        f"0 < top_p <= 1, top_k >= 0; got temperature={self.temperature}, "
        f"top_p={self.top_p}, top_k={self.top_k}"
      )

  @classmethod
  def from_config(cls, config, **overrides) -> "DecodeOptions":
    """From `config.eval.decode` (where the defaults live), with keyword overrides (None
    keeps the config's value). max_length 0, or beyond the model's text length, means
    config.model.text.max_len; the config's min_length is capped at max_length (an
    override's is not: out of range, it is an error)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(config.eval.decode).items() if k in fields}
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    max_len = config.model.text.max_len
    values["max_length"] = min(values["max_length"] or max_len, max_len)
    if "min_length" in values and "min_length" not in given:
      values["min_length"] = min(values["min_length"], values["max_length"])
    values.setdefault("contract", tokens_lib.Contract.from_config(config))
    return cls(**values)


class StepModel(NamedTuple):
  """A decoder as the loops see it.

  step: (ids [B] int32, cache, context) -> (logits [B, V] float32, new cache).
  cache / context: pytrees; `*_batch_axes` give each leaf's batch axis (a pytree with
    the cache's structure, or a prefix of it; None for a leaf shared by the batch, like
    the write index). context_batch_axes None: `step` takes a context of B images with
    B x K ids (K beams per image) and beam search does not repeat it.
  """

  step: Callable[..., tuple[jax.Array, Any]]
  cache: Any
  context: Any
  cache_batch_axes: Any
  context_batch_axes: Any


class DecodeOutput(NamedTuple):
  """tokens: [B, L] int32 (prefix, generated, EOS, pad); scores: [B] float32, the
  sum of log-probabilities of the generated (non-forced) tokens, divided by the length
  penalty for beam search."""

  tokens: jax.Array
  scores: jax.Array


# ---------------------------------------------------------------------------------------
# Step functions of a CoCa model.


def cached_step_model(model, caption_tokens: jax.Array, max_length: int) -> StepModel:
  """Step function with KV caches; cross-attention keys/values projected once here.

  caption_tokens: [B, N, D] from `model.encode_image`.
  """
  graphdef, state = nnx.split(model)
  text = model.text
  cache = text.init_cache(caption_tokens.shape[0], max_length)
  # Per-layer weights, and image keys/values (2 x [B, H, N, K] per multimodal layer).
  context = text.decoding_layers(caption_tokens)

  def step(ids, cache, context):
    decoder = nnx.merge(graphdef, state).text
    logits, cache = decoder.decode_step(ids[:, None], cache, context)
    return logits[:, 0], cache

  # key/value: L x [B, S, H, K]; the unimodal "key_valid" [B, S + 1] (legacy mask only).
  cache_batch_axes = {
    stack: {name: None if name == "index" else 0 for name in stack_cache}
    for stack, stack_cache in cache.items()
  }
  return StepModel(
    step=step,
    cache=cache,
    context=context,
    cache_batch_axes=cache_batch_axes,
    context_batch_axes=None,  # Block folds beams into the query axis
  )


def recompute_step_model(model, caption_tokens: jax.Array, max_length: int) -> StepModel:
  """Step function without caches: every step runs the whole text so far through both
  decoder stacks (padded to L, so shapes are fixed) and re-projects the image tokens."""
  graphdef, state = nnx.split(model)
  batch = caption_tokens.shape[0]
  cache = dict(ids=jnp.zeros((batch, max_length), jnp.int32), index=jnp.int32(0))

  def step(ids, cache, context):
    coca = nnx.merge(graphdef, state)
    index = cache["index"]
    buffer = jax.lax.dynamic_update_slice_in_dim(cache["ids"], ids[:, None], index, 1)
    # Positions after `index` are masked; causality means they cannot change position
    # `index` anyway, so this equals running the unpadded prefix.
    mask = jnp.broadcast_to(jnp.arange(max_length)[None] <= index, buffer.shape).astype(jnp.int32)
    _, unimodal_tokens = coca.encode_text(buffer, mask)
    logits = coca.caption_logits(unimodal_tokens, context, mask)
    logits = jax.lax.dynamic_index_in_dim(logits, index, 1, keepdims=False)
    return logits, dict(ids=buffer, index=index + 1)

  return StepModel(step, cache, caption_tokens, dict(ids=0, index=None), 0)


# ---------------------------------------------------------------------------------------
# Pure helpers.


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k / nucleus (top-p) sets to -inf (not NEG: logits
  divided by a tiny temperature can lie below NEG, and a filtered token would win).

  logits: [B, V] float32. top_k: keep the k largest (0: all). top_p: keep the smallest
  set of most likely tokens whose probability reaches p (the most likely token is always
  kept, so p -> 0 is greedy). Returns [B, V].
  """
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Probability mass strictly before each sorted token; keep while it is below p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    # The smallest kept logit is the threshold (ties at it are kept too).
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT's ((5 + length) / 6) ** alpha (Wu et al. 2016, eq. 14); 1 when alpha = 0."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def check_prefix(
  prefix, prefix_length, batch: int, max_length: int, pad_id: int, vocab_size: int | None = None
):
  """A prefix given on the host -> (prefix [batch, max_length] int32 padded with pad_id,
  lengths [batch] int32), or a ValueError: the loop forces the FIRST prefix_length
  tokens of each row, so a left-padded row (or one with a pad inside) would have its
  pads forced and its last tokens dropped, and lengths past the row forced pads. With
  `vocab_size`, a forced id outside [0, vocab_size) is an error too (it gathered a
  clamped or wrapped embedding row, and beam search, never matching it, scored -1e9)."""
  prefix = np.asarray(prefix)
  if prefix.ndim != 2 or len(prefix) != batch:
    raise ValueError(f"prefix of shape {prefix.shape}: expected [{batch}, P] token ids")
  if prefix.shape[1] > max_length:
    raise ValueError(f"prefix of {prefix.shape[1]} tokens exceeds decode max_length={max_length}")
  if prefix_length is None:
    real = prefix != pad_id
    if np.any(real[:, 1:] & ~real[:, :-1]):
      row = int(np.flatnonzero(np.any(real[:, 1:] & ~real[:, :-1], axis=1))[0])
      raise ValueError(
        f"prefix row {row} {prefix[row].tolist()} has a token after a pad (pad_id="
        f"{pad_id}): rows must be right-padded, or give prefix_length"
      )
    lengths = real.sum(1)
  else:
    lengths = np.broadcast_to(np.asarray(prefix_length), (batch,))
    if lengths.min(initial=0) < 0 or lengths.max(initial=0) > prefix.shape[1]:
      raise ValueError(
        f"prefix_length {lengths.tolist()}: each must be in [0, {prefix.shape[1]}], the "
        "prefix's width"
      )
  if vocab_size is not None:
    forced = np.arange(prefix.shape[1]) < lengths[:, None]
    outside = forced & ((prefix < 0) | (prefix >= vocab_size))
    if outside.any():
      row = int(np.flatnonzero(outside.any(1))[0])
      raise ValueError(
        f"prefix row {row} {prefix[row].tolist()} forces a token id outside the model's "
        f"vocabulary [0, {vocab_size})"
      )
  padded = np.full((batch, max_length), pad_id, np.int32)
  padded[:, : prefix.shape[1]] = prefix
  return padded, lengths.astype(np.int32)


def _prefix_table(prefix, prefix_length, batch: int, max_length: int, pad_id: int):
  """-> prefix [B, L] int32 padded with pad_id, prefix_length [B] int32 (checked by
  `check_prefix` when both are concrete, i.e. outside jit)."""
  if prefix is None:
    return jnp.full((batch, max_length), pad_id, jnp.int32), jnp.zeros((batch,), jnp.int32)
  if not any(isinstance(x, jax.core.Tracer) for x in (prefix, prefix_length)):
    prefix, prefix_length = check_prefix(prefix, prefix_length, batch, max_length, pad_id)
  prefix = jnp.asarray(prefix, jnp.int32)
  if prefix.shape[1] > max_length:
    raise ValueError(f"prefix of length {prefix.shape[1]} exceeds decode max_length={max_length}")
  if prefix_length is None:
    prefix_length = jnp.sum(prefix != pad_id, axis=1)
  prefix = jnp.pad(prefix, ((0, 0), (0, max_length - prefix.shape[1])), constant_values=pad_id)
  return prefix, jnp.asarray(prefix_length, jnp.int32)


def _is_stop(token: jax.Array, contract: tokens_lib.Contract) -> jax.Array:
  """token [...] int32 -> bool [...]: does it end a sequence (EOS, or pad if stop_at_pad)."""
  stop = token == contract.eos_id
  if contract.stop_at_pad:
    stop = stop | (token == contract.pad_id)
  return stop


def _blocked(
  vocab: int, i, min_length: int, contract: tokens_lib.Contract, num_tokens: int
) -> jax.Array:
  """bool [V]: the ids that may not be chosen at step i: the stop ids where ending there
  would leave fewer than min_length tokens, and ids at or past num_tokens (when set)."""
  ids = jnp.arange(vocab)
  blocked = _is_stop(ids, contract) & (i + 1 < min_length)
  return blocked | (ids >= num_tokens) if num_tokens else blocked


def _map_batch(fn, tree, axes):
  """fn(leaf, batch_axis) over leaves with a batch axis; leaves with axis None pass."""

  def apply(axis, subtree):
    return jax.tree.map(lambda x: x if axis is None else fn(x, axis), subtree)

  return jax.tree.map(apply, axes, tree, is_leaf=lambda a: a is None)


def _repeat_beams(x, axis, beams):
  """Batch axis B -> B*K, batch-major (row b*K + k is beam k of example b)."""
  return jnp.repeat(x, beams, axis=axis)


def _gather_beams(x, axis, origin):
  """Reorders beams within each example: x with a B*K axis, origin [B, K] -> same shape."""
  batch, beams = origin.shape
  shape = x.shape
  x = x.reshape(shape[:axis] + (batch, beams) + shape[axis + 1 :])
  index = origin.reshape((1,) * axis + (batch, beams) + (1,) * (x.ndim - axis - 2))
  x = jnp.take_along_axis(x, index, axis=axis + 1)
  return x.reshape(shape)


# ---------------------------------------------------------------------------------------
# Decoding loops.


def row_keys(key: jax.Array, rows) -> jax.Array:
  """Sampling keys of rows [B] (their indices among all rows decoded): fold_in(key, row)."""
  return jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.asarray(rows))


def _draw(key: jax.Array, logits: jax.Array, step) -> jax.Array:
  """One row's token at `step`: logits [V] -> int."""
  return jax.random.categorical(jax.random.fold_in(key, step), logits)


def sample_loop(
  step_model: StepModel,
  *,
  batch: int,
  max_length: int,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  rng: jax.Array | None = None,
  prefix=None,
  prefix_length=None,
  contract: tokens_lib.Contract = tokens_lib.PAPER,
  min_length: int = 0,
  num_tokens: int = 0,
) -> DecodeOutput:
  """Greedy decoding (temperature 0) or ancestral sampling, one token per iteration.

  Each example stops at its first EOS (or stop id of the contract; later outputs are
  pad); the loop ends when every example has stopped or after `max_length` tokens.
  Before min_length tokens the stop ids are excluded (the choice is made among the other
  tokens, renormalised when sampling, as open_clip's min_seq_len does); scores stay the
  model's log p of the chosen tokens. Ids at or past num_tokens (when set) are never chosen.
  rng (sampling): one key, or one key per row [B]; one key gives row b fold_in(rng, b).
  Row b draws step i's token with fold_in(its key, i), so its sample depends on its key
  alone, not on the other rows or the batch size.
  """
  greedy = temperature == 0.0
  if not greedy and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng key")
  if not greedy:
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):  # raw uint32 key data
      rng = jax.random.wrap_key_data(rng)
    rng = row_keys(rng, jnp.arange(batch)) if rng.ndim == 0 else rng
    if rng.shape != (batch,):
      raise ValueError(f"rng holds keys of shape {rng.shape}; expected one key or [{batch}]")
  pad = contract.pad_id
  prefix, prefix_length = _prefix_table(prefix, prefix_length, batch, max_length, pad)

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < max_length) & ~jnp.all(done)

  def body(carry):
    i, inputs, tokens, done, scores, cache = carry
    logits, cache = step_model.step(inputs, cache, step_model.context)
    allowed = logits
    if min_length > 1 or num_tokens:
      blocked = _blocked(logits.shape[-1], i, min_length, contract, num_tokens)
      allowed = jnp.where(blocked, -jnp.inf, logits)
    if greedy:
      chosen = jnp.argmax(allowed, axis=-1).astype(jnp.int32)
    else:
      filtered = filter_logits(allowed / temperature, top_k, top_p)
      chosen = jax.vmap(_draw, in_axes=(0, 0, None))(rng, filtered, i).astype(jnp.int32)
    forced = i < prefix_length
    chosen = jnp.where(forced, prefix[:, i], chosen)
    chosen = jnp.where(done, pad, chosen)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    chosen_log_prob = jnp.take_along_axis(log_probs, chosen[:, None], axis=-1)[:, 0]
    scores = scores + jnp.where(done | forced, 0.0, chosen_log_prob)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, chosen[:, None], i, 1)
    # A forced prefix token never ends the sequence (open_clip's pad 0 is the real "!").
    done = done | (_is_stop(chosen, contract) & ~forced)
    return i + 1, chosen, tokens, done, scores, cache

  init = (
    jnp.int32(0),
    jnp.full((batch,), contract.bos_id, jnp.int32),
    jnp.full((batch, max_length), pad, jnp.int32),
    jnp.zeros((batch,), bool),
    jnp.zeros((batch,), jnp.float32),
    step_model.cache,
  )
  _, _, tokens, _, scores, _ = jax.lax.while_loop(cond, body, init)
  return DecodeOutput(tokens, scores)


def beam_search_loop(
  step_model: StepModel,
  *,
  batch: int,
  max_length: int,
  beam_size: int,
  alpha: float = 0.6,
  prefix=None,
  prefix_length=None,
  contract: tokens_lib.Contract = tokens_lib.PAPER,
  min_length: int = 0,
  num_tokens: int = 0,
) -> DecodeOutput:
  """Beam search with K live and K finished hypotheses per example (t5x's scheme).

  Hypotheses are scored log p / penalty(len): log p of the generated (non-forced) tokens,
  len counting the prefix too. Each step extends the K live hypotheses by every token and
  takes the 2K most likely extensions; those that end join the finished set, which keeps
  its K best, so a finished hypothesis never gives its place to a live one. A hypothesis
  ends with a stop id of the contract (not one the prefix forces) or, at the last step, is
  cut off at max_length; cut-off hypotheses rank with ended ones by score (t5x returns them
  only where nothing ended). The K most likely extensions that do not end live on.
  Before min_length tokens no stop id extends a hypothesis (log p unchanged otherwise);
  nor does an id at or past num_tokens (when set), ever.

  Early stop (t5x's bound): an example is done when its finished set is full and its best
  live hypothesis's log p, divided by the largest penalty a continuation can get, is below
  the worst finished score; log p only falls as a hypothesis grows, so no continuation can
  enter the set. The loop ends when every example is done, or at max_length. Returns the
  best finished hypothesis.

  K = 1 is not greedy decoding: the live hypothesis takes greedy's path (the best token
  that does not end), but a stop token ranked second joins the finished set too, so the
  result is greedy's caption or one that scores better.
  """
  k = beam_size
  pad = contract.pad_id
  prefix, prefix_length = _prefix_table(prefix, prefix_length, batch, max_length, pad)
  cache = _map_batch(
    lambda x, a: _repeat_beams(x, a, k), step_model.cache, step_model.cache_batch_axes
  )
  context = _map_batch(
    lambda x, a: _repeat_beams(x, a, k), step_model.context, step_model.context_batch_axes
  )

  def cond(carry):
    i, _, _, live_log_probs, _, finished_scores, _ = carry
    # A continuation of a live hypothesis has log p <= its own (<= 0) and its length in
    # (i, max_length]: its score is at most log p / the largest penalty among those.
    largest = jnp.maximum(
      length_penalty(i + 1, alpha), length_penalty(jnp.int32(max_length), alpha)
    )
    best_live = jnp.max(live_log_probs, axis=1) / largest  # [B]
    worst_finished = jnp.min(finished_scores, axis=1)  # [B]; NEG while not full
    done = (worst_finished > NEG) & (worst_finished > best_live)
    return (i < max_length) & ~jnp.all(done)

  def body(carry):
    i, inputs, live_seqs, live_log_probs, finished_seqs, finished_scores, cache = carry
    logits, cache = step_model.step(inputs.reshape(batch * k), cache, context)
    vocab = logits.shape[-1]
    token_log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, k, vocab)
    if min_length > 1 or num_tokens:
      blocked = _blocked(vocab, i, min_length, contract, num_tokens)
      token_log_probs = jnp.where(blocked, NEG, token_log_probs)
    forced = i < prefix_length  # [B]
    is_forced_token = jnp.arange(vocab)[None, None, :] == prefix[:, i][:, None, None]
    token_log_probs = jnp.where(
      forced[:, None, None], jnp.where(is_forced_token, 0.0, NEG), token_log_probs
    )
    # [B, K * V]: log p of every extension, NEG for those of empty beams and for tokens
    # the prefix excludes; flat index = beam * V + token.
    extended = (live_log_probs[:, :, None] + token_log_probs).reshape(batch, k * vocab)
    extended = jnp.where(extended > NEG / 2, extended, NEG)

    # [B, V]: does a hypothesis end with this token: a stop id the prefix does not force,
    # or any token at the last step (cut off at max_length).
    ends = (_is_stop(jnp.arange(vocab), contract)[None] & ~forced[:, None]) | (i + 1 == max_length)

    def extend(index):
      """Flat extension indices [B, N] -> sequences [B, N, L], last tokens [B, N]."""
      token = (index % vocab).astype(jnp.int32)
      seqs = jnp.take_along_axis(live_seqs, (index // vocab)[:, :, None], axis=1)
      return jax.lax.dynamic_update_slice_in_dim(seqs, token[:, :, None], i, 2), token

    # The ending ones among the 2K most likely extensions join the finished set.
    top_log_probs, top = jax.lax.top_k(extended, min(2 * k, k * vocab))  # [B, 2K]
    new_scores = jnp.where(
      jnp.take_along_axis(ends, top % vocab, axis=1) & (top_log_probs > NEG),
      top_log_probs / length_penalty(i + 1, alpha),
      NEG,
    )
    finished_scores, keep = jax.lax.top_k(jnp.concatenate([finished_scores, new_scores], 1), k)
    candidates = jnp.concatenate([finished_seqs, extend(top)[0]], axis=1)  # [B, 3K, L]
    finished_seqs = jnp.take_along_axis(candidates, keep[:, :, None], axis=1)

    # The K most likely extensions that do not end live on, with their cache rows.
    live_log_probs, best = jax.lax.top_k(jnp.where(jnp.tile(ends, (1, k)), NEG, extended), k)
    live_seqs, inputs = extend(best)
    origin = best // vocab  # [B, K]
    cache = _map_batch(lambda x, a: _gather_beams(x, a, origin), cache, step_model.cache_batch_axes)
    return i + 1, inputs, live_seqs, live_log_probs, finished_seqs, finished_scores, cache

  # Only beam 0 is live at the start, so the first step does not pick K copies of the
  # same token.
  init_log_probs = jnp.where(jnp.arange(k)[None] == 0, 0.0, NEG) * jnp.ones((batch, 1))
  empty_seqs = jnp.full((batch, k, max_length), pad, jnp.int32)
  init = (
    jnp.int32(0),
    jnp.full((batch, k), contract.bos_id, jnp.int32),
    empty_seqs,
    init_log_probs,
    empty_seqs,
    jnp.full((batch, k), NEG, jnp.float32),
    cache,
  )
  _, _, _, _, finished_seqs, finished_scores, _ = jax.lax.while_loop(cond, body, init)
  # top_k keeps the finished set sorted, best first; it is never empty at the end (the
  # last step finishes every extension).
  return DecodeOutput(finished_seqs[:, 0], finished_scores[:, 0])


def run_loop(
  step_model: StepModel,
  options: DecodeOptions,
  *,
  batch: int,
  rng=None,
  prefix=None,
  prefix_length=None,
):
  """Dispatches to the loop named by options.method."""
  if options.method == "beam":
    return beam_search_loop(
      step_model,
      batch=batch,
      max_length=options.max_length,
      beam_size=options.beam_size,
      alpha=options.length_penalty,
      prefix=prefix,
      prefix_length=prefix_length,
      contract=options.contract,
      min_length=options.min_length,
      num_tokens=options.num_tokens,
    )
  sampling = options.method == "sample"
  return sample_loop(
    step_model,
    batch=batch,
    max_length=options.max_length,
    temperature=options.temperature if sampling else 0.0,
    top_k=options.top_k if sampling else 0,
    top_p=options.top_p if sampling else 1.0,
    rng=rng,
    prefix=prefix,
    prefix_length=prefix_length,
    contract=options.contract,
    min_length=options.min_length,
    num_tokens=options.num_tokens,
  )


# ---------------------------------------------------------------------------------------
# Model-level entry points.


def generate(
  model,
  images: jax.Array,
  options: DecodeOptions,
  *,
  prefix=None,
  prefix_length=None,
  rng: jax.Array | None = None,
  cached: bool = True,
) -> DecodeOutput:
  """Captions a batch of images with a CoCa model (traceable; jit it, or use `jit_generate`).

  images: [B, H, W, 3] float32, preprocessed. prefix: [B, P] int32 tokens (no BOS) to
  continue, padded with the pad id; prefix_length: [B] (default: count of non-pad
  tokens; pass it when pad is a real token, as open_clip's 0).
  cached=False decodes by full recompute (the reference / benchmark baseline).
  """
  max_len = model.text.max_len
  if options.max_length > max_len:
    raise ValueError(
      f"decode max_length={options.max_length} exceeds config.model.text.max_len={max_len}"
    )
  _, caption_tokens = model.encode_image(images)
  make = cached_step_model if cached else recompute_step_model
  step_model = make(model, caption_tokens, options.max_length)
  return run_loop(
    step_model, options, batch=images.shape[0], rng=rng, prefix=prefix, prefix_length=prefix_length
  )


def jit_generate(graphdef: nnx.GraphDef, options: DecodeOptions, *, cached: bool = True):
  """-> jitted fn(params, images, prefix=None, prefix_length=None, rng=None) -> DecodeOutput.

  params: the model's `nnx.State` (or its pure dict). Shardings follow the inputs: put
  images sharded over the batch (and params as trained) and the loop keeps them so.
  """

  @jax.jit
  def fn(params, images, prefix=None, prefix_length=None, rng=None):
    model = nnx.merge(graphdef, params)
    return generate(
      model, images, options, prefix=prefix, prefix_length=prefix_length, rng=rng, cached=cached
    )

  return fn
