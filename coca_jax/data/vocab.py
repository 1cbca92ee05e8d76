"""SentencePiece vocabularies: the demo's, trained on the training split's texts, and
loading any model file for tokenizing (TensorFlow-free, for prediction and serving).

Ids follow coca_jax/tokens.py: pad 0 (also the decoder's BOS), EOS 1, unk 2, no BOS
piece; `hard_vocab_limit` off so that a small corpus yields at most (not exactly) the
requested size.
"""

import os
import tempfile
from typing import Iterable

import sentencepiece

from coca_jax import tokens


def train(texts: Iterable[str], path: str, vocab_size: int) -> str:
  """Trains a unigram model on `texts` and writes it to `path` (atomically; .model)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=folder) as tmp:
    prefix = os.path.join(tmp, "vocab")
    sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(list(texts)),
      model_prefix=prefix,
      model_type="unigram",
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      character_coverage=1.0,
      pad_id=tokens.PAD_ID,
      eos_id=tokens.EOS_ID,
      unk_id=2,
      bos_id=-1,
      num_threads=2,
      minloglevel=2,
    )
    os.replace(prefix + ".model", path)
  return path


def load(path: str) -> sentencepiece.SentencePieceProcessor:
  """The SentencePiece model at `path`; a clear error when it is missing."""
  if not path or not os.path.exists(path):
    raise FileNotFoundError(
      f"vocabulary model not found: {path!r} (config.data.vocab_path or <export>/vocab.model)"
    )
  return sentencepiece.SentencePieceProcessor(model_file=os.fspath(path))


def check_fits(vocab_path: str, model_vocab_size: int) -> None:
  """The model's vocabulary must hold every id of the tokenizer."""
  n = load(vocab_path).get_piece_size()
  if n > model_vocab_size:
    raise ValueError(
      f"config.model.text.vocab_size={model_vocab_size} is smaller than the "
      f"vocabulary at config.data.vocab_path ({n} pieces, {vocab_path})"
    )
