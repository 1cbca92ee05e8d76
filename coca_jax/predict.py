"""Prediction: a model's batched, jitted functions over numpy arrays and strings.

Legend: N examples, B jitted batch size, S image size, T text length, E joint embedding
width, L decode length, M image tokens, D width.

    predictor = predict.Predictor(model, config, vocab, batch_size=64)
    predictor.embed_images(pixels)        # [N, S, S, 3] preprocessed -> [N, E] unit norm
    predictor.embed_texts(["a dog"])      # -> [N, E] unit norm
    predictor.embed_videos(clips)         # [N, F, S, S, 3] -> [N, E] unit norm
    predictor.caption(pixels)             # -> N strings, decoded per config.eval.decode

Both the serving API (coca_jax/inference.py) and the evaluators (coca_jax/evaluate/) go
through this module. Every function compiles once for a fixed batch B: inputs are cut
into batches of B and the last one is padded to B (copies of its last row), the padding
rows dropped from the outputs (the serving API pads a short batch to a power-of-two bucket instead:
`Predictor(buckets=True)`). Jitted functions are cached per (model structure, kind, decode
options) and jit caches per input shape, so periodic evaluation during training does not
recompile.
"""

import functools
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from coca_jax import decode, sharding, tokens

# Decode options that only one method uses (Predictor.decode_options).
BEAM_OPTIONS = ("beam_size", "length_penalty")
SAMPLE_OPTIONS = ("temperature", "top_k", "top_p")


def bucket(rows: int, batch_size: int, multiple: int) -> int:
  """The rows a batch of `rows` is padded to: the smallest power-of-two multiple of
  `multiple` that holds them, at most `batch_size` (a multiple of `multiple`)."""
  size = multiple
  while size < rows:
    size *= 2
  return min(size, batch_size)


def map_in_batches(
  fn: Callable, arrays: Sequence[np.ndarray], batch_size: int, bucket_multiple: int | None = None
) -> list:
  """Applies fn(*batch) -> array or tuple of arrays over axis 0 of `arrays` in batches.

  Every call sees exactly `batch_size` rows, so fn compiles once; with `bucket_multiple`
  m, a short last batch is padded only to `bucket(rows, batch_size, m)` rows, so a few
  images cost a few rows rather than a whole batch, and at most log2(batch_size / m) + 1
  shapes compile. Padding rows repeat the batch's last row (its image, prefix and row
  index): decoding ends when every row has, and a copy ends with its original, where a
  blank padding image's caption could run to max_length and hold the whole batch there.
  Returns the outputs concatenated over axis 0, padding removed. With no rows, fn still
  runs once on a batch of zeros, for the empty outputs' shapes and dtypes.
  """
  total = len(arrays[0])
  chunks = []
  for start in range(0, max(total, 1), batch_size):
    batch = [np.asarray(a[start : start + batch_size]) for a in arrays]
    real = len(batch[0])
    size = batch_size if bucket_multiple is None else bucket(real, batch_size, bucket_multiple)
    if not real:
      batch = [np.zeros((size,) + b.shape[1:], b.dtype) for b in batch]
    elif real < size:
      batch = [np.concatenate([b, np.repeat(b[-1:], size - real, axis=0)]) for b in batch]
    out = fn(*batch)
    out = out if isinstance(out, tuple) else (out,)
    chunks.append([np.asarray(o)[:real] for o in out])
  return [np.concatenate(parts) for parts in zip(*chunks)]


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, kind: str, options: decode.DecodeOptions | None = None):
  """Jitted fn(params, ...) of one kind; cached so repeated evals reuse compilations."""
  if kind == "image":
    return jax.jit(lambda params, images: nnx.merge(graphdef, params).encode_image(images)[0])
  if kind == "text":
    return jax.jit(lambda params, ids, mask: nnx.merge(graphdef, params).encode_text(ids, mask)[0])
  if kind == "image_tokens":
    return jax.jit(lambda params, images: nnx.merge(graphdef, params).vision(images))
  if kind == "video":
    return jax.jit(lambda params, clips: nnx.merge(graphdef, params).encode_video(clips))
  if kind == "video_logits":
    return jax.jit(lambda params, clips: nnx.merge(graphdef, params).video_logits(clips))
  if kind == "vqa_logits":
    return jax.jit(
      lambda params, images, ids, mask: nnx.merge(graphdef, params).vqa_logits(images, ids, mask)
    )
  if kind == "caption":
    return decode.jit_generate(graphdef, options)
  raise ValueError(f"unknown prediction kind {kind!r}")


def mesh_batch_size(batch_size: int, mesh: Mesh, rules) -> int:
  """config.eval.batch_size (`batch_size`) rounded up to a multiple of the batch shards of
  `mesh` (config.sharding_rules `rules`), as a Predictor on the mesh needs: every shard
  gets whole rows (padding rows are dropped from the outputs). A pod's thousands of
  shards then take the default 64 as one row per shard instead of failing."""
  ways = sharding.batch_ways(mesh, rules)
  return -(-batch_size // ways) * ways


class Predictor:
  """A CoCa model's encoders and decoder over numpy arrays and strings of any length.

  model: a CoCa module (its parameters may be sharded; jit follows them). config: the
  run's config (model sizes, config.eval.decode, sharding rules). vocab: a SentencePiece
  processor or a seqio vocabulary (coca_jax.data.vocab.load).

  mesh: None runs on the default device (serving, the evaluate CLI). With the training
  mesh, every batch of B rows is split over the mesh's batch shards as training batches
  are: each process computes only the rows its devices hold, wherever they sit in the
  mesh, and every process receives the whole output (gathered explicitly), so metrics
  computed from it are identical on every host. Every process must pass the same inputs.

  buckets: pad a short last batch only to a power-of-two bucket (`map_in_batches`), for
  serving, where a call often holds a few images: a few more compilations, each once.
  Off, as for the evaluators, every function compiles for B rows alone.
  """

  def __init__(
    self, model, config, vocab, batch_size: int, mesh: Mesh | None = None, buckets: bool = False
  ):
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size}; the images per jitted call must be >= 1")
    self.graphdef, self.params = nnx.split(model)
    self.config = config
    self.vocab = vocab
    self.batch_size = (
      batch_size if mesh is None else mesh_batch_size(batch_size, mesh, config.sharding_rules)
    )
    self.max_text_len = config.model.text.max_len
    # BOS / EOS / pad ids and the row layout (the paper's or open_clip's).
    self.contract = tokens.Contract.from_config(config)
    # A vocabulary padded past the tokenizer's: decoding never picks the padding ids.
    pieces = config.model.text.vocab_size if vocab is None else tokens.piece_count(vocab)
    self.num_tokens = pieces if pieces < config.model.text.vocab_size else 0
    self.temperature = float(model.temperature())
    self.mesh = mesh
    ways = 1 if mesh is None else sharding.batch_ways(mesh, config.sharding_rules)
    self.bucket_multiple = ways if buckets else None

  def _map(self, fn: Callable, arrays: Sequence[np.ndarray]) -> list:
    """`map_in_batches` in this predictor's batches (and buckets)."""
    return map_in_batches(fn, arrays, self.batch_size, self.bucket_multiple)

  def _call(self, fn: Callable, *batch: np.ndarray):
    """fn(params, *batch) for numpy rows [B, ...]; on the mesh when there is one."""
    if self.mesh is None:
      return fn(self.params, *batch)
    specs = sharding.batch_specs(batch, self.config.sharding_rules)
    placed = [
      jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, spec), lambda i, x=x: x[i])
      for x, spec in zip(batch, specs)
    ]
    # Traced (on the first call) under the rules, as the train step is: without them the
    # model's sharding constraints on activations are no-ops (sharding.constrain).
    with nnx.logical_axis_rules(self.config.sharding_rules):
      out = fn(self.params, *placed)
    return multihost_utils.process_allgather(out, tiled=True)

  def embed_images(self, images: np.ndarray) -> np.ndarray:
    """images [N, S, S, 3] float32 (preprocessed) -> L2-normalised [N, E] float32."""
    fn = _compiled(self.graphdef, "image")
    return self._map(lambda x: self._call(fn, x), [images])[0]

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """N texts -> L2-normalised [N, E] float32."""
    text = tokens.tokenize(self.vocab, list(texts), self.max_text_len, self.contract)
    fn = _compiled(self.graphdef, "text")
    return self._map(lambda i, m: self._call(fn, i, m), [text["ids"], text["mask"]])[0]

  def image_tokens(self, images: np.ndarray) -> np.ndarray:
    """images [N, S, S, 3] -> image-encoder output tokens [N, M, D] float32."""
    fn = _compiled(self.graphdef, "image_tokens")
    out = self._map(lambda x: self._call(fn, x), [images])[0]
    return out.astype(np.float32)

  def embed_videos(self, clips: np.ndarray) -> np.ndarray:
    """clips [N, F, S, S, 3] float32 (preprocessed frames) -> L2-normalised mean of the
    frame embeddings [N, E] float32."""
    fn = _compiled(self.graphdef, "video")
    return self._map(lambda x: self._call(fn, x), [clips])[0]

  def video_logits(self, clips: np.ndarray) -> np.ndarray:
    """clips [N, F, S, S, 3] -> the video head's class logits [N, C] float32."""
    fn = _compiled(self.graphdef, "video_logits")
    return self._map(lambda x: self._call(fn, x), [clips])[0]

  def vqa_logits(self, images: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """images [N, S, S, 3], the questions' ids and mask [N, T] -> the VQA head's answer
    logits [N, A] float32."""
    fn = _compiled(self.graphdef, "vqa_logits")
    return self._map(lambda x, i, m: self._call(fn, x, i, m), [images, ids, mask])[0]

  def decode_options(self, method: str | None = None, **overrides) -> decode.DecodeOptions:
    """config.eval.decode with keyword overrides (None keeps the config's value).

    Without `method`, the options given pick it: beam_size or length_penalty "beam",
    temperature, top_k or top_p "sample"; neither, the config's method. Options of another
    method than the one given (or of both) raise ValueError naming them.
    """
    given = {name for name, value in overrides.items() if value is not None}
    beam, sample = sorted(given & set(BEAM_OPTIONS)), sorted(given & set(SAMPLE_OPTIONS))
    if method is None:
      if beam and sample:
        raise ValueError(
          f"decode options {', '.join(beam)} (beam search) and {', '.join(sample)} "
          "(sampling) exclude each other"
        )
      method = "beam" if beam else "sample" if sample else None
    else:
      other = {"greedy": beam + sample, "beam": sample, "sample": beam}.get(method, [])
      if other:
        raise ValueError(f"decode option {', '.join(other)} does not apply to method={method!r}")
    return decode.DecodeOptions.from_config(
      self.config, method=method, num_tokens=self.num_tokens or None, **overrides
    )

  def caption_tokens(
    self,
    images: np.ndarray,
    options: decode.DecodeOptions,
    *,
    prefix=None,
    prefix_lengths=None,
    seed: int | None = None,
    first_row: int = 0,
  ) -> tuple[np.ndarray, np.ndarray]:
    """images [N, S, S, 3] -> (tokens [N, L] int32, scores [N] float32).

    prefix: optional [N, P] int32 tokens to continue (padded with the pad id); P is
    padded to L so every prefix length shares one compilation. prefix_lengths: [N]
    (default: the non-pad tokens of each row; give them when pad is a real token).
    seed: sampling seed (None: config.eval.decode.seed, 0 in configs without one).
    first_row: the index of images[0] in a set captioned over several calls: image j
    samples with row first_row + j's key, so the samples do not repeat from call to call
    and do not depend on how the set was split.
    """
    if seed is None:
      seed = self.config.eval.decode.get("seed", 0)
    fn = _compiled(self.graphdef, "caption", options)
    n = len(images)
    pad = options.contract.pad_id
    if prefix is None:
      prefix, lengths = np.full((n, options.max_length), pad, np.int32), np.zeros(n, np.int32)
    else:
      prefix, lengths = decode.check_prefix(
        prefix, prefix_lengths, n, options.max_length, pad, self.config.model.text.vocab_size
      )
    rows = first_row + np.arange(n)

    def run(batch_images, batch_prefix, batch_lengths, batch_rows):
      # Keys by row index among the images (decode.row_keys): image j's sample depends on
      # the seed and j only, not on batch_size or the images around it. Passed as key data
      # [B, 2], placed over the batch like the images.
      keys = jax.random.key_data(decode.row_keys(jax.random.key(seed), batch_rows))
      out = self._call(
        lambda params, images, prefix, lengths, keys: fn(
          params, images, prefix, lengths, jax.random.wrap_key_data(keys)
        ),
        batch_images,
        batch_prefix,
        batch_lengths,
        np.asarray(keys),
      )
      return out.tokens, out.scores

    tokens_out, scores = self._map(run, [images, prefix, lengths, rows])
    return tokens_out, scores

  def caption(
    self,
    images: np.ndarray,
    options: decode.DecodeOptions | None = None,
    *,
    prefix: str | Sequence[str] | None = None,
    seed: int | None = None,
    first_row: int = 0,
  ) -> list[str]:
    """images [N, S, S, 3] -> N captions (options default: config.eval.decode).

    prefix: text the caption must continue (one for all images or one per image), e.g.
    a question for "VQA as a prefix"; it is not repeated in the returned text. seed,
    first_row: as for `caption_tokens`. No images return [] without running the decoder.
    """
    options = options or self.decode_options()
    prefix_tokens, prefix_lengths = None, 0
    if prefix is not None:
      # Checked before the no-images return: the CLIs check their options with no images.
      distinct = [prefix] if isinstance(prefix, str) else list(prefix)
      encoded = [list(self.vocab.encode(p)) for p in distinct]
      too_long = [p for p, e in zip(distinct, encoded) if len(e) >= options.max_length]
      if too_long:
        raise ValueError(
          f"prefix {too_long[0]!r} leaves no room within max_length={options.max_length}"
        )
      if isinstance(prefix, str):
        encoded = encoded * len(images)
      elif len(encoded) != len(images):
        raise ValueError(f"{len(encoded)} prefixes for {len(images)} images")
    if not len(images):
      return []
    if prefix is not None:
      prefix_tokens = np.full((len(images), options.max_length), options.contract.pad_id, np.int32)
      for row, ids in enumerate(encoded):
        prefix_tokens[row, : len(ids)] = ids
      prefix_lengths = np.asarray([len(e) for e in encoded])
    out, _ = self.caption_tokens(
      images,
      options,
      prefix=prefix_tokens,
      prefix_lengths=prefix_lengths if prefix is not None else None,
      seed=seed,
      first_row=first_row,
    )
    return tokens.detokenize(self.vocab, out, skip=prefix_lengths, contract=options.contract)
