"""Vocabularies: training the demo's SentencePiece model, and loading a vocabulary file
of either kind for tokenizing (TensorFlow-free, for prediction and serving).

Kinds, told apart by the file name:
- `*.txt.gz`: CLIP's BPE merges (open_clip's bpe_simple_vocab_16e6.txt.gz), the
  vocabulary of models imported from open_clip (coca_jax/data/clip_bpe.py).
- anything else: a SentencePiece model (`*.model`). The demo's is trained here with the
  ids of coca_jax/tokens.py: pad 0 (also the decoder's BOS), EOS 1, unk 2, no BOS piece;
  `hard_vocab_limit` off so that a small corpus yields at most (not exactly) the
  requested size.

`load` gives an object with `encode(str) -> list[int]` (no BOS/EOS), `decode(ids) -> str`
and `get_piece_size()`; `seqio_vocabulary` gives the same vocabulary for seqio tasks.
"""

import hashlib
import os
import tempfile
from typing import Iterable

import sentencepiece
from etils import epath

from coca_jax import tokens
from coca_jax.data import clip_bpe

CLIP_BPE_SUFFIX = ".txt.gz"


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


def is_clip_bpe(path: str) -> bool:
  """Whether `path` names CLIP BPE merges (`*.txt.gz`) rather than a SentencePiece model."""
  return os.fspath(path).endswith(CLIP_BPE_SUFFIX)


def is_remote(path) -> bool:
  """Whether `path` is a URL (gs://..., s3://...) rather than a file of this machine."""
  return "://" in os.fspath(path)


def local_file(path: str) -> str:
  """`path` itself on this machine; a remote file (gs://...: a TPU run's vocab_path or
  export) copied into the temporary folder under its content's hash, since SentencePiece
  and the BPE reader open local files only. FileNotFoundError naming `path` when it is
  not there."""
  path = os.fspath(path)
  source = epath.Path(path) if path else None
  if source is None or not source.exists():
    raise FileNotFoundError(
      f"vocabulary not found: {path!r} (config.data.vocab_path or the export's vocab file)"
    )
  if not is_remote(path):
    return path
  data = source.read_bytes()
  digest = hashlib.sha256(data).hexdigest()[:16]
  local = os.path.join(tempfile.gettempdir(), "coca_jax_vocab", digest, source.name)
  if not os.path.exists(local):
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with open(f"{local}.{os.getpid()}.tmp", "wb") as f:
      f.write(data)
    os.replace(f"{local}.{os.getpid()}.tmp", local)
  return local


def load(path: str) -> sentencepiece.SentencePieceProcessor | clip_bpe.ClipTokenizer:
  """The vocabulary at `path` (local or remote), of the kind its name says; errors name
  the file."""
  path = local_file(path)
  if is_clip_bpe(path):
    return clip_bpe.ClipTokenizer(path)
  try:
    return sentencepiece.SentencePieceProcessor(model_file=os.fspath(path))
  except (RuntimeError, OSError) as e:
    raise ValueError(
      f"{path} is not a SentencePiece model ({e}); CLIP BPE merges must be named *{CLIP_BPE_SUFFIX}"
    ) from e


def seqio_vocabulary(path: str):
  """The vocabulary at `path` as a seqio.Vocabulary, for tasks (imports TensorFlow)."""
  import seqio

  from coca_jax.data import clip_seqio

  vocabulary = load(path)
  if isinstance(vocabulary, clip_bpe.ClipTokenizer):
    return clip_seqio.ClipVocabulary(vocabulary)
  return seqio.SentencePieceVocabulary(os.fspath(path))


def check_fits(vocab_path: str, model_vocab_size: int, special_ids: dict | None = None) -> None:
  """The model's vocabulary must hold every id of the tokenizer, and the tokenizer every
  special id of the text contract (`special_ids`: {"config.model.text.bos_id": id, ...}):
  an open_clip model (start/end of text 49406/49407) given the demo's 1,000-piece
  SentencePiece model would otherwise train on ids the tokenizer never makes."""
  n = load(vocab_path).get_piece_size()
  if n > model_vocab_size:
    raise ValueError(
      f"config.model.text.vocab_size={model_vocab_size} is smaller than the "
      f"vocabulary at config.data.vocab_path ({n} pieces, {vocab_path})"
    )
  outside = {key: i for key, i in (special_ids or {}).items() if not 0 <= i < n}
  if outside:
    raise ValueError(
      f"{', '.join(f'{k}={i}' for k, i in outside.items())} outside the {n} pieces of "
      f"config.data.vocab_path={vocab_path}: the config's text contract is another "
      "vocabulary's (an open_clip model needs CLIP's BPE merges, bpe_simple_vocab_16e6.txt.gz "
      "from the open_clip package, or the vocab.txt.gz of its converted export)"
    )
