"""CLIP's BPE as a seqio vocabulary, so that seqio tasks tokenize with open_clip's ids.

The tokenizer (coca_jax/data/clip_bpe.py) is Python around a Rust library; inside
tf.data it runs through `tf.numpy_function` on the host, like any Python step.
Ids: pad 0 (seqio's PAD_ID; also the token "!"), eos 49,407 (<end_of_text>), bos 49,406
(<start_of_text>), no unk (every byte has an id). `encode` adds neither bos nor eos.
"""

import numpy as np
import seqio
import tensorflow as tf

from coca_jax.data import clip_bpe


class ClipVocabulary(seqio.Vocabulary):
  """seqio.Vocabulary over a clip_bpe.ClipTokenizer; equal when the merges files are."""

  def __init__(self, tokenizer: clip_bpe.ClipTokenizer):
    super().__init__(extra_ids=0)
    self.tokenizer = tokenizer
    with open(tokenizer.path, "rb") as f:
      self._file_bytes = f.read()

  @property
  def bos_id(self) -> int:
    return clip_bpe.SOT_ID

  @property
  def eos_id(self) -> int:
    return clip_bpe.EOT_ID

  @property
  def unk_id(self) -> None:
    return None

  @property
  def _base_vocab_size(self) -> int:
    return clip_bpe.VOCAB_SIZE

  def _encode(self, s: str) -> list[int]:
    return self.tokenizer.encode(s)

  def _decode(self, ids) -> str:
    """Text of `ids` before the first eos (seqio hands them over through it)."""
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    return self.tokenizer.decode(ids)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """s: [] string -> [L] int32."""
    if s.shape.rank != 0:
      raise ValueError(f"ClipVocabulary.encode_tf takes one string (rank 0), got shape {s.shape}")

    def encode(text) -> np.ndarray:
      # A 0-d array of bytes (a bare bytes object inside tf.data). Web alt-text is not
      # always UTF-8 (Latin-1 bytes): a strict decode would stop the input pipeline on
      # one caption where SentencePiece reads the same bytes; undecodable bytes become
      # U+FFFD and the rest of the caption is kept.
      raw = np.asarray(text).item()
      return np.asarray(self.tokenizer.encode(raw.decode("utf-8", errors="replace")), np.int32)

    ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
    ids.set_shape([None])
    return ids

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """ids: [..., L] int -> [...] string, each row cut at its first eos."""

    def decode(rows: np.ndarray) -> np.ndarray:
      flat = rows.reshape(-1, rows.shape[-1])
      texts = [self._decode(row).encode("utf-8") for row in flat]
      return np.asarray(texts, object).reshape(rows.shape[:-1])

    texts = tf.numpy_function(decode, [ids], tf.string, stateful=False)
    texts.set_shape(ids.shape[:-1])
    return texts

  def __eq__(self, other) -> bool:
    return isinstance(other, ClipVocabulary) and self._file_bytes == other._file_bytes

  def __str__(self) -> str:
    return f"ClipVocabulary(file={self.tokenizer.path})"
