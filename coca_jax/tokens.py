"""The token contract: special ids and how a text becomes the decoder's arrays.

Legend: N texts, T = config.data.max_text_len (= config.model.text.max_len).

Two contracts, chosen by config.model.text (bos_id, eos_id, pad_id, eos_input,
stop_at_pad; `Contract.from_config`):

The paper's models (`PAPER`; the demo vocabulary is trained with these ids,
coca_jax/data/vocab.py): PAD 0, which is also the decoder's BOS (SentencePiece gets no
BOS piece), EOS 1. A text of n tokens t1..tn, cut to T - 1 tokens, becomes

    ids     [T] int32   BOS, t1 .. tn, PAD ...       decoder input
    labels  [T] int32   t1 .. tn, EOS, PAD ...       next token at each position
    mask    [T] int32   1 over the n + 1 real positions

EOS is a label, never an input; decoding stops at it.

open_clip's CoCa (`eos_input=True`; SOT 49406 = BOS, EOT 49407 = EOS, pad 0): the row is
open_clip's tokenizer output, EOS included; a text is cut to T - 2 tokens (open_clip
keeps T - 1 and overwrites the last with EOT: the same row):

    ids     [T] int32   BOS, t1 .. tn, EOS, PAD ...  text tower and decoder input
    labels  [T] int32   t1 .. tn, EOS, PAD ...       ids shifted by one (open_clip's
                                                     logits[:, :-1] vs text[:, 1:])
    mask    [T] int32   1 over the n + 1 label positions

The text embedding reads the whole row (EOS included); the model's open_clip masks come
from the ids (config.model.text.mask_mode), `mask` marks the predicted tokens. Its pad 0
is also a real BPE token ("!"); decoding stops at EOS or pad (`stop_at_pad`), as
open_clip's generate does.

The input pipeline, the synthetic source, prediction (tokenize / detokenize) and
decoding all use this module.
"""

import dataclasses
from typing import Sequence

import numpy as np

# The paper's contract (the defaults of config.model.text).
PAD_ID = 0
BOS_ID = 0
EOS_ID = 1


@dataclasses.dataclass(frozen=True)
class Contract:
  """Special ids and layout of text rows (see the module docstring); hashable, so it can
  be a static argument of jit."""

  bos_id: int = BOS_ID
  eos_id: int = EOS_ID
  pad_id: int = PAD_ID
  eos_input: bool = False  # EOS is an input too (the row holds it), not a label only
  stop_at_pad: bool = False  # decoding stops at pad_id as at EOS

  @classmethod
  def from_config(cls, config) -> "Contract":
    """From a full config or its `model` section (config.model.text; an older config
    without these keys gets the paper's contract)."""
    from coca_jax import config as config_lib

    model_config = config.model if "model" in config else config
    return cls(
      **{
        field.name: config_lib.model_option(model_config, f"text.{field.name}")
        for field in dataclasses.fields(cls)
      }
    )

  def max_tokens(self, max_len: int) -> int:
    """Text tokens a row of max_len holds: T - 1, or T - 2 when EOS is an input."""
    return max_len - (2 if self.eos_input else 1)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end a decoded sequence."""
    return (self.eos_id, self.pad_id) if self.stop_at_pad else (self.eos_id,)


PAPER = Contract()


def model_text(
  tokens: np.ndarray, lengths: np.ndarray, max_len: int, contract: Contract = PAPER
) -> dict[str, np.ndarray]:
  """Token rows -> the decoder's arrays (see the module docstring).

  tokens: [N, W] int (2-D), row i's real tokens in its first lengths[i] places
  (what follows is ignored); lengths: [N] int, cut to contract.max_tokens(max_len).
  Returns {"ids", "labels", "mask"}: [N, max_len] int32.
  """
  tokens = np.asarray(tokens, np.int32)
  room = contract.max_tokens(max_len)
  lengths = np.minimum(np.asarray(lengths, np.int64), room)
  n = len(lengths)
  width = min(tokens.shape[1], room)
  positions = np.arange(max_len)[None]
  body = np.full((n, max_len), contract.pad_id, np.int32)
  body[:, :width] = tokens[:, :width]
  body = np.where(positions < lengths[:, None], body, contract.pad_id)
  labels = np.where(positions == lengths[:, None], contract.eos_id, body).astype(np.int32)
  inputs = labels if contract.eos_input else body
  ids = np.concatenate([np.full((n, 1), contract.bos_id, np.int32), inputs[:, :-1]], axis=1)
  mask = (positions <= lengths[:, None]).astype(np.int32)
  return dict(ids=ids, labels=labels, mask=mask)


def tokenize(
  vocab, texts: Sequence[str], max_len: int, contract: Contract = PAPER
) -> dict[str, np.ndarray]:
  """Texts -> {"ids", "labels", "mask"} [N, max_len] int32, as in training.

  vocab: anything with `encode(str) -> list[int]` giving the text's tokens without
  BOS/EOS (a SentencePiece processor, a seqio vocabulary, CLIP's BPE).
  """
  room = contract.max_tokens(max_len)
  encoded = [list(vocab.encode(text))[:room] for text in texts]
  tokens = np.full((len(texts), room), contract.pad_id, np.int32)
  for row, ids in enumerate(encoded):
    tokens[row, : len(ids)] = ids
  return model_text(tokens, np.asarray([len(ids) for ids in encoded], np.int64), max_len, contract)


def piece_count(vocab) -> int:
  """The ids a tokenizer has: a SentencePiece or CLIP BPE tokenizer, or a seqio vocabulary."""
  return vocab.get_piece_size() if hasattr(vocab, "get_piece_size") else vocab.vocab_size


def detokenize(
  vocab, tokens: np.ndarray, skip: int | np.ndarray = 0, contract: Contract = PAPER
) -> list[str]:
  """Decoded tokens [N, L] -> strings without surrounding spaces, cut at the first stop
  id (EOS; pad too with `stop_at_pad`); `skip` leading tokens (per row or for all) are
  dropped (a prefix the caller does not want echoed). BOS, EOS, pad and SentencePiece's
  unknown piece print nothing (it printed " ⁇ ")."""
  skip = np.broadcast_to(np.asarray(skip), (len(tokens),))
  # The model's vocabulary may be padded past the tokenizer's (e.g. to a multiple of
  # 128); ids beyond the tokenizer have no text and are dropped.
  size = piece_count(vocab)
  special = {contract.bos_id, contract.eos_id, contract.pad_id}
  unk = getattr(vocab, "unk_id", None)  # SentencePiece's method, seqio's property; CLIP none
  if unk is not None:
    special.add(unk() if callable(unk) else unk)
  texts = []
  for row, start in zip(np.asarray(tokens), skip):
    row = [int(t) for t in row[int(start) :]]
    stops = [row.index(s) for s in contract.stop_ids if s in row]
    if stops:
      row = row[: min(stops)]
    # strip: CLIP's BPE decode ends every word with a space, the last one too.
    texts.append(vocab.decode([t for t in row if t not in special and t < size]).strip())
  return texts
