"""Batched, jitted access to a CoCa model for evaluation and inference.

Legend: N examples, B jitted batch size, H/W image size, T text length, E joint
embedding width, L decode length, M image tokens, D width.

Every function is compiled once for a fixed batch B: inputs are cut into batches of B
and the last one is padded (with zeros) to B, its padding rows dropped from the outputs.
Compiled functions are cached per (model structure, batch size, decode options), so
periodic evaluation during training does not recompile.

Text conventions (coca_jax.data): decoder input ids = [BOS=0, tokens...] with mask 1 over
them (EOS is a label, never an input); outputs of decoding end with EOS = 1, pad 0.
"""

import functools
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from coca_jax import decode


def map_in_batches(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int) -> list[np.ndarray]:
  """Applies fn(*batch) -> array or tuple of arrays over axis 0 of `arrays` in batches.

  Every call sees exactly `batch_size` rows (the last batch is zero-padded), so fn
  compiles once. Returns the outputs concatenated over axis 0, padding removed.
  """
  total = len(arrays[0])
  chunks = []
  for start in range(0, total, batch_size):
    batch = [np.asarray(a[start : start + batch_size]) for a in arrays]
    real = len(batch[0])
    if real < batch_size:
      batch = [
        np.concatenate([b, np.zeros((batch_size - real,) + b.shape[1:], b.dtype)]) for b in batch
      ]
    out = fn(*batch)
    out = out if isinstance(out, tuple) else (out,)
    chunks.append([np.asarray(o)[:real] for o in out])
  if not chunks:
    raise ValueError("map_in_batches got no examples")
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
  if kind == "caption":
    return decode.jit_generate(graphdef, options)
  raise ValueError(f"unknown encoder kind {kind!r}")


class Encoders:
  """A model's encoders and decoder over numpy arrays of any length.

  model: a CoCa module (its parameters may be sharded; jit follows them).
  """

  def __init__(self, model, batch_size: int):
    self.graphdef, self.params = nnx.split(model)
    self.batch_size = batch_size
    self.max_text_len = model.text.max_len

  def embed_images(self, images: np.ndarray) -> np.ndarray:
    """images [N, H, W, 3] float32 (preprocessed) -> L2-normalised [N, E] float32."""
    fn = _compiled(self.graphdef, "image")
    return map_in_batches(lambda x: fn(self.params, x), [images], self.batch_size)[0]

  def embed_texts(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """ids, mask [N, T] int32 -> L2-normalised [N, E] float32."""
    fn = _compiled(self.graphdef, "text")
    return map_in_batches(lambda i, m: fn(self.params, i, m), [ids, mask], self.batch_size)[0]

  def image_tokens(self, images: np.ndarray) -> np.ndarray:
    """images [N, H, W, 3] -> image-encoder output tokens [N, M, D] float32."""
    fn = _compiled(self.graphdef, "image_tokens")
    return map_in_batches(lambda x: fn(self.params, x), [images], self.batch_size)[0].astype(
      np.float32
    )

  def caption(
    self, images: np.ndarray, options: decode.DecodeOptions, *, prefix=None, seed: int = 0
  ):
    """images [N, H, W, 3] -> (tokens [N, L] int32, scores [N] float32).

    prefix: optional [N, P] int32 tokens to continue (0-padded); P is padded to L so
    every prefix length shares one compilation.
    """
    fn = _compiled(self.graphdef, "caption", options)
    n = len(images)
    if prefix is None:
      prefix = np.zeros((n, options.max_length), np.int32)
    prefix = np.asarray(prefix, np.int32)
    if prefix.shape[1] > options.max_length:
      raise ValueError(
        f"prefix of {prefix.shape[1]} tokens exceeds decode max_length={options.max_length}"
      )
    prefix = np.pad(prefix, ((0, 0), (0, options.max_length - prefix.shape[1])))
    lengths = (prefix != decode.PAD_ID).sum(1).astype(np.int32)
    rows = np.arange(n)

    def run(batch_images, batch_prefix, batch_lengths, batch_rows):
      # A per-batch key (from the first row index) keeps sampling reproducible.
      rng = jax.random.fold_in(jax.random.key(seed), int(batch_rows[0]))
      out = fn(self.params, batch_images, batch_prefix, batch_lengths, rng)
      return out.tokens, out.scores

    tokens, scores = map_in_batches(run, [images, prefix, lengths, rows], self.batch_size)
    return tokens, scores


def tokenize(vocab, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Texts -> decoder inputs for `encode_text`: ids, mask [N, max_len] int32.

  vocab: anything with `encode(str) -> list[int]` (SentencePiece processor or a seqio
  vocabulary). Row = [BOS, tokens...] truncated to max_len, as in training.
  """
  ids = np.zeros((len(texts), max_len), np.int32)
  mask = np.zeros((len(texts), max_len), np.int32)
  for row, text in enumerate(texts):
    tokens = [0] + list(vocab.encode(text))[: max_len - 1]
    ids[row, : len(tokens)] = tokens
    mask[row, : len(tokens)] = 1
  return ids, mask


def detokenize(vocab, tokens: np.ndarray, skip: int | np.ndarray = 0) -> list[str]:
  """Decoded tokens [N, L] -> strings, cut at the first EOS; `skip` leading tokens (per
  row or for all) are dropped (a prefix the caller does not want echoed)."""
  skip = np.broadcast_to(np.asarray(skip), (len(tokens),))
  # The model's vocabulary may be padded past the tokenizer's (e.g. to a multiple of
  # 128); ids beyond the tokenizer have no text and are dropped.
  size = vocab.get_piece_size() if hasattr(vocab, "get_piece_size") else vocab.vocab_size
  texts = []
  for row, start in zip(np.asarray(tokens), skip):
    row = list(row[int(start) :])
    if decode.EOS_ID in row:
      row = row[: row.index(decode.EOS_ID)]
    texts.append(vocab.decode([int(t) for t in row if t != decode.PAD_ID and t < size]))
  return texts


def load_vocab(path: str):
  """A SentencePiece processor for the model file at `path` (clear error if missing)."""
  import os

  import sentencepiece

  if not path or not os.path.exists(path):
    raise FileNotFoundError(
      f"vocabulary model not found: {path!r} (config.data.vocab_path or <export>/vocab.model)"
    )
  return sentencepiece.SentencePieceProcessor(model_file=os.fspath(path))
