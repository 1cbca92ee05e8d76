"""The demo's SentencePiece vocabulary, trained on the training split's texts.

Ids: pad 0 (also the decoder's BOS), EOS 1, unk 2, no BOS piece; `hard_vocab_limit` off
so that a small corpus yields at most (not exactly) the requested size.
"""

import os
import tempfile
from typing import Iterable

import sentencepiece


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
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      num_threads=2,
      minloglevel=2,
    )
    os.replace(prefix + ".model", path)
  return path
