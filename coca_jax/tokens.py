"""The token contract: special ids and how a text becomes the decoder's arrays.

Legend: N texts, T = config.data.max_text_len (= config.model.text.max_len).

Ids (the demo vocabulary is trained with them, coca_jax/data/vocab.py): PAD 0, which is
also the decoder's BOS (SentencePiece gets no BOS piece), EOS 1. A text of n tokens
t1..tn, cut to T - 1 tokens, becomes

    ids     [T] int32   BOS, t1 .. tn, PAD ...       decoder input
    labels  [T] int32   t1 .. tn, EOS, PAD ...       next token at each position
    mask    [T] int32   1 over the n + 1 real positions

EOS is a label, never an input; decoding stops at it. The input pipeline, the synthetic
source, prediction (tokenize / detokenize) and decoding all use this module.
"""

from typing import Sequence

import numpy as np

PAD_ID = 0
BOS_ID = 0
EOS_ID = 1


def model_text(tokens: np.ndarray, lengths: np.ndarray, max_len: int) -> dict[str, np.ndarray]:
  """Token rows -> the decoder's arrays (see the module docstring).

  tokens: [N, W] int (2-D), row i's real tokens in its first lengths[i] places
  (what follows is ignored); lengths: [N] int, cut to max_len - 1.
  Returns {"ids", "labels", "mask"}: [N, max_len] int32.
  """
  tokens = np.asarray(tokens, np.int32)
  lengths = np.minimum(np.asarray(lengths, np.int64), max_len - 1)
  n = len(lengths)
  width = min(tokens.shape[1], max_len - 1)
  positions = np.arange(max_len)[None]
  body = np.full((n, max_len), PAD_ID, np.int32)
  body[:, :width] = tokens[:, :width]
  body = np.where(positions < lengths[:, None], body, PAD_ID)
  labels = np.where(positions == lengths[:, None], EOS_ID, body).astype(np.int32)
  ids = np.concatenate([np.full((n, 1), BOS_ID, np.int32), body[:, :-1]], axis=1)
  mask = (positions <= lengths[:, None]).astype(np.int32)
  return dict(ids=ids, labels=labels, mask=mask)


def tokenize(vocab, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
  """Texts -> {"ids", "labels", "mask"} [N, max_len] int32, as in training.

  vocab: anything with `encode(str) -> list[int]` (a SentencePiece processor or a seqio
  vocabulary).
  """
  encoded = [list(vocab.encode(text))[: max_len - 1] for text in texts]
  tokens = np.zeros((len(texts), max_len - 1), np.int32)
  for row, ids in enumerate(encoded):
    tokens[row, : len(ids)] = ids
  return model_text(tokens, np.asarray([len(ids) for ids in encoded], np.int64), max_len)


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
    if EOS_ID in row:
      row = row[: row.index(EOS_ID)]
    texts.append(vocab.decode([int(t) for t in row if t != PAD_ID and t < size]))
  return texts
