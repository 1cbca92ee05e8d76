"""CLIP's byte-level BPE tokenizer, with the ids and text that open_clip gives.

Legend: N texts, C context length (open_clip's CoCa: 76).

The file is open_clip's merges list `bpe_simple_vocab_16e6.txt.gz` (shipped inside the
open_clip package; an export keeps it as vocab.txt.gz, coca_jax/export.py). Vocabulary,
49,408 ids: the 256 byte symbols, the same 256 ending a word (`</w>`), 48,894 merges in
file order, then <start_of_text> 49,406 and <end_of_text> 49,407. Padding is 0, which
is also the real token "!" (open_clip pads with zeros).

Library: Hugging Face `tokenizers` holds the vocabulary and runs the byte-level alphabet,
the BPE merges (end-of-word suffix `</w>`), the special tokens and decoding, in Rust; it
is the backend of transformers' CLIPTokenizerFast. Two steps stay in Python because the
library cannot reproduce open_clip there:
- Cleaning: ftfy, HTML unescaping (twice), whitespace collapsing and lower-casing, as
  open_clip's basic_clean / whitespace_clean / lower; ftfy has no `tokenizers` form
  (CLIPTokenizerFast substitutes NFC, which keeps mojibake and HTML entities).
- The word split: open_clip splits with the `regex` package (case-insensitive), and the
  library's Oniguruma has other Unicode tables: on this stack their splits of the CLIP
  pattern differ for 17,481 code points (newer letters, and marks such as U+0345 that
  case-fold to letters). `regex` splits here and the words go to the library
  pre-tokenized. A literal "<start_of_text>" in a text becomes the special id only where
  the split makes it a word, as in open_clip (not after punctuation, e.g. "!<start_of_text>").
"""

import functools
import gzip
import html
import os
import zlib

import ftfy
import regex
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

VOCAB_SIZE = 49_408
SOT_ID = 49_406
EOT_ID = 49_407
PAD_ID = 0
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
# open_clip reads lines 1 .. 48,894 of the file (line 0 is a version header); the rest of
# the file is unused.
NUM_MERGES = VOCAB_SIZE - 2 * 256 - len(SPECIAL_TOKENS)
END_OF_WORD = "</w>"
# CLIP's word pattern (OpenAI CLIP's simple_tokenizer.py, kept by open_clip): the special
# tokens, English contractions, letter runs, single digits, runs of everything else.
WORD_PATTERN = regex.compile(
  "|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
  regex.IGNORECASE,
)


def clean(text: str) -> str:
  """open_clip's text cleaning: ftfy, HTML entities (unescaped twice), one space between
  words, lower case."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return " ".join(text.split()).lower()


def words(text: str) -> list[str]:
  """The cleaned text split into CLIP's words (each is BPE-encoded on its own)."""
  return WORD_PATTERN.findall(clean(text))


@functools.cache
def byte_symbols() -> tuple[str, ...]:
  """The 256 printable characters standing for bytes (GPT-2's byte-level table), in the
  order of CLIP's first 256 ids: the printable Latin-1 bytes as themselves, in byte order,
  then the other 68 bytes as the code points 256, 257, ..., in byte order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
  printable += range(ord("®"), ord("ÿ") + 1)
  return tuple(map(chr, printable)) + tuple(chr(256 + n) for n in range(256 - len(printable)))


def read_merges(path: str) -> list[tuple[str, str]]:
  """The NUM_MERGES merge pairs of a CLIP merges file (gzip text, one "a b" per line after a
  header line); errors name the file."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"CLIP BPE merges file not found: {path!r}")
  try:
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
  except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
    raise ValueError(f"{path} is not a gzip-compressed UTF-8 BPE merges file: {e}") from e
  merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
  if len(merges) < NUM_MERGES:
    problem = f"{len(merges)} lines after the header"
  else:
    bad = next((i for i, pair in enumerate(merges, 1) if len(pair) != 2), None)
    problem = None if bad is None else f"line {bad + 1} is not a pair"
  if problem:
    raise ValueError(
      f"{path} is not CLIP's BPE merges file: {problem}; expected {NUM_MERGES} lines 'a b' "
      "after a header line, as in open_clip's bpe_simple_vocab_16e6.txt.gz"
    )
  return merges


def backend(path: str) -> tokenizers.Tokenizer:
  """The `tokenizers` pipeline of the merges file at `path`: byte-level symbols -> BPE
  with `</w>` -> ids; special tokens as whole words; decoding back to bytes."""
  merges = read_merges(path)
  symbols = byte_symbols()
  pieces = [*symbols, *(s + END_OF_WORD for s in symbols), *(a + b for a, b in merges)]
  pieces += SPECIAL_TOKENS
  bpe = models.BPE(
    vocab={piece: i for i, piece in enumerate(pieces)},
    merges=merges,
    end_of_word_suffix=END_OF_WORD,
  )
  tokenizer = tokenizers.Tokenizer(bpe)
  # Words arrive split (see the module docstring); the byte-level step only maps bytes.
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens(
    [tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
  )
  return tokenizer


class ClipTokenizer:
  """CLIP BPE with the vocabulary interface of coca_jax (a SentencePiece processor's
  `encode` / `decode` / `get_piece_size`) and its special ids.

  Attributes: sot_id = bos_id 49,406; eot_id = eos_id 49,407; pad_id 0; path.
  """

  sot_id = bos_id = SOT_ID
  eot_id = eos_id = EOT_ID
  pad_id = PAD_ID

  def __init__(self, path: str):
    self.path = os.fspath(path)
    self._tokenizer = backend(self.path)

  def get_piece_size(self) -> int:
    return VOCAB_SIZE

  def encode(self, text: str) -> list[int]:
    """A text's ids, without start/end of text (open_clip's SimpleTokenizer.encode)."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Ids of each text (as `encode`), the BPE of all texts in one library call."""
    split = [words(text) for text in texts]
    encodings = self._tokenizer.encode_batch(split, is_pretokenized=True, add_special_tokens=False)
    return [e.ids for e in encodings]

  def decode(self, ids: list[int]) -> str:
    """open_clip's SimpleTokenizer.decode: every id's text (special tokens included), bytes
    that are not UTF-8 as U+FFFD, each word followed by a space (also the last)."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
    if bad:
      raise ValueError(f"ids {bad[:5]} are outside the CLIP vocabulary [0, {VOCAB_SIZE})")
    text = self._tokenizer.decode(ids, skip_special_tokens=False)
    return text.replace(END_OF_WORD, " ")
