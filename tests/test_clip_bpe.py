"""CLIP's BPE (coca_jax/data/clip_bpe.py) against open_clip's own tokenizer.

open_clip (torch) runs in a subprocess: torch's vision ops crash when imported after
TensorFlow in one process, and the rest of the suite imports TensorFlow.
"""

import gzip
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile

import ml_collections
import numpy as np
import pytest
import sentencepiece
from etils import epath

from coca_jax import export, tokens
from coca_jax.config import JFT_TEMPLATES
from coca_jax.data import clip_bpe, prepare, raw, vocab
from configs.open_clip import coca_vit_b32 as open_clip_b32

_SPEC = importlib.util.find_spec("open_clip")
pytestmark = pytest.mark.skipif(_SPEC is None, reason="open_clip is not installed ([open_clip])")
BPE_FILE = (
  os.path.join(os.path.dirname(_SPEC.origin), "bpe_simple_vocab_16e6.txt.gz") if _SPEC else ""
)
CONTEXT = 76  # open_clip's coca_ViT-B-32 text context

HARD_CASES = [
  "",
  " ",
  "a photo of a cat",
  "A PHOTO of a Cat.",
  "Hello,   world!!!   \t\n  (again)",
  "it's, they're, we've, I'm, you'll, he'd, don't, IT'S",
  "'s 't alone; rock'n'roll ''quoted''",
  "3.14159 is pi; 2024-11-29 at 04:15, 1,000,000 and 12345678901234567890",
  "#hashtag @user e-mail: someone@example.com https://example.com/a?b=c&d=e",
  "Café naïve résumé Ångström façade jalapeño Zürich",
  "Cafe\u0301 (decomposed accent) e\u0308",
  "ΑΒΓ αβγ Ελληνικά ͅ, Русский текст, עברית, العربية, हिन्दी, 日本語のテキスト, 中文, 한국어",
  "İstanbul ǅ ß ﬁ ligature Ⅻ ½ ² ₃",
  "😀 grinning face 👍🏽 thumbs up: medium skin tone 👨‍👩‍👧 family 🇯🇵 flag",
  "\u2764\ufe0f heart with variation selector, \u200b zero width space",
  "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;single&#39; &amp;amp; &nbsp;x",
  "mojibake: Ã©tÃ© â€œquotesâ€\x9d",
  "tabs\tnew\nlines\r\nand\u00a0non-breaking\u3000spaces",
  "<start_of_text> a <end_of_text> b",
  "!<start_of_text> x_<end_of_text> 1<end_of_text>",
  "\x00\x01 control \x7f characters \x1c\x1d",
  "word " * 100,
  "supercalifragilisticexpialidocious " * 10,
  "🙂" * 60,
  "x" * 500,
]


def demo_captions() -> list[str]:
  """The demo's real texts: Fashion-MNIST prompts and (when prepared) emoji alt-text."""
  texts = []
  for names in raw.FASHION_MNIST_CLASSES:
    texts += prepare.jft_texts(JFT_TEMPLATES, names)
  texts += [", ".join(names) for names in raw.FASHION_MNIST_CLASSES]
  emojibase = raw.tarball_path(prepare.paths()["raw"], raw.NPM_PACKAGES["emojibase"])
  if os.path.exists(emojibase):
    with tarfile.open(emojibase) as tar:
      entries = json.load(tar.extractfile("package/en/data.json"))
    for entry in entries:
      texts += [raw.caption_of(entry), f"{entry['emoji']} {entry['label']}"]
      texts += [raw.caption_of(skin, entry) for skin in entry.get("skins") or ()]
  return texts


def random_ids(n: int, seed: int = 0) -> list[list[int]]:
  """Id sequences to decode: any ids, and byte pieces alone (broken UTF-8 included)."""
  rng = random.Random(seed)
  rows = [[rng.randrange(clip_bpe.VOCAB_SIZE) for _ in range(rng.randrange(12))] for _ in range(n)]
  return rows + [[rng.randrange(512) for _ in range(rng.randrange(1, 6))] for _ in range(n)]


REFERENCE = """
import json, sys
import open_clip

request = json.load(sys.stdin)
tokenizer = open_clip.get_tokenizer("coca_ViT-B-32")
json.dump(dict(
  context_length=tokenizer.context_length,
  vocab_size=tokenizer.vocab_size,
  sot=tokenizer.sot_token_id,
  eot=tokenizer.eot_token_id,
  encoded=[tokenizer.encode(t) for t in request["texts"]],
  rows=tokenizer(request["texts"]).tolist(),
  decoded=[tokenizer.decode(ids) for ids in request["decode"]],
), sys.stdout)
"""


@pytest.fixture(scope="module")
def tokenizer() -> clip_bpe.ClipTokenizer:
  return clip_bpe.ClipTokenizer(BPE_FILE)


@pytest.fixture(scope="module")
def texts() -> list[str]:
  return HARD_CASES + demo_captions()


@pytest.fixture(scope="module")
def reference(texts) -> dict:
  """open_clip's answers for `texts` and random_ids(500), from a subprocess."""
  request = json.dumps(dict(texts=texts, decode=random_ids(500)))
  result = subprocess.run(
    [sys.executable, "-c", REFERENCE], input=request, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)


@pytest.mark.slow
def test_ids_and_rows_equal_open_clip(tokenizer, texts, reference):
  assert reference["context_length"] == CONTEXT
  assert (reference["vocab_size"], reference["sot"], reference["eot"]) == (
    tokenizer.get_piece_size(),
    tokenizer.sot_id,
    tokenizer.eot_id,
  )
  assert len(texts) >= 300, len(texts)
  encoded = tokenizer.encode_batch(texts)
  differ = [t for t, ours, theirs in zip(texts, encoded, reference["encoded"]) if ours != theirs]
  assert not differ, differ[:5]
  # The rows training and inference build (tokens.tokenize, open_clip's contract).
  contract = tokens.Contract.from_config(open_clip_b32.get_config())
  rows = tokens.tokenize(tokenizer, texts, CONTEXT, contract)["ids"]
  np.testing.assert_array_equal(rows, np.asarray(reference["rows"]))
  # Texts longer than the context end in <end_of_text>, as open_clip forces it.
  long = [i for i, ids in enumerate(encoded) if len(ids) > CONTEXT - 2]
  assert long and (rows[long, -1] == clip_bpe.EOT_ID).all()


@pytest.mark.slow
def test_decode_equals_open_clip(tokenizer, reference):
  ours = [tokenizer.decode(ids) for ids in reference["encoded"] + random_ids(500)]
  assert ours[len(reference["encoded"]) :] == reference["decoded"]
  assert any("\ufffd" in text for text in reference["decoded"])  # broken UTF-8 was tried


def test_known_ids_and_round_trip(tokenizer):
  # Ids as open_clip 3.3.0 gives them for these texts.
  assert tokenizer.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
  assert tokenizer.encode("Café 😀") == [15304, 7334]
  assert tokenizer.encode("") == []
  # Decoding gives the cleaned text with a space after each word, as open_clip's does.
  cases = {
    "A  PHOTO\tof a Cat!": "a photo of a cat ! ",
    "it's 3.5%": "it 's 3 . 5 % ",
    "&amp;lt;b&amp;gt; café 👍🏽": "< b > café 👍🏽 ",
  }
  for text, decoded in cases.items():
    assert tokenizer.decode(tokenizer.encode(text)) == decoded
  assert (
    tokenizer.decode([clip_bpe.SOT_ID, 320, clip_bpe.EOT_ID]) == "<start_of_text>a <end_of_text>"
  )
  with pytest.raises(ValueError, match="outside the CLIP vocabulary"):
    tokenizer.decode([clip_bpe.VOCAB_SIZE])


def test_captions_have_no_trailing_space_nor_unknown_marks(tokenizer, sentencepiece_model):
  """CLIP's decode ends every word with a space, so every caption of an imported
  checkpoint ended with one; SentencePiece's unknown piece printed as " ⁇ "."""
  from coca_jax import tokens

  contract = tokens.Contract(bos_id=49406, eos_id=49407, pad_id=0, eos_input=True)
  ids = [*tokenizer.encode("a dog on a couch"), 49407, 0]
  assert tokens.detokenize(tokenizer, np.array([ids]), contract=contract) == ["a dog on a couch"]
  skipped = tokens.detokenize(tokenizer, np.array([ids]), skip=2, contract=contract)
  assert skipped == ["on a couch"]
  spm = vocab.load(sentencepiece_model)
  heart, unk = spm.encode("heart"), spm.unk_id()
  assert tokens.detokenize(spm, np.array([[*heart, unk, *heart, 1]])) == ["heart heart"]
  seqio_vocab = vocab.seqio_vocabulary(sentencepiece_model)  # unk_id a property there
  assert tokens.detokenize(seqio_vocab, np.array([[*heart, unk, *heart, 1]])) == ["heart heart"]


def test_vocab_load_dispatches_on_the_file_and_checks_the_size(sentencepiece_model):
  assert isinstance(vocab.load(BPE_FILE), clip_bpe.ClipTokenizer)
  assert isinstance(vocab.load(sentencepiece_model), sentencepiece.SentencePieceProcessor)
  vocab.check_fits(BPE_FILE, clip_bpe.VOCAB_SIZE)
  with pytest.raises(ValueError, match="49408 pieces"):
    vocab.check_fits(BPE_FILE, 49_000)


def test_a_vocabulary_on_remote_storage_is_read_through_a_local_copy(
  tmp_path, monkeypatch, sentencepiece_model
):
  """An export or vocab_path on gs:// (a TPU run's): os.path saw no file there, so the
  export's own vocabulary was passed over for the training machine's path. Remote paths
  are served here by a local folder standing in for the bucket."""
  bucket = tmp_path / "bucket"
  (bucket / "export").mkdir(parents=True)
  shutil.copy(sentencepiece_model, bucket / "export" / "vocab.model")
  real = epath.Path

  def path(p, *parts):
    return real(os.fspath(p).replace("gs://bucket", str(bucket), 1), *parts)

  monkeypatch.setattr(epath, "Path", path)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  expected = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model)
  loaded = vocab.load("gs://bucket/export/vocab.model")
  assert loaded.get_piece_size() == expected.get_piece_size()
  assert loaded.encode("a photo of a bag") == expected.encode("a photo of a bag")
  copies = list((tmp_path / "tmp" / "coca_jax_vocab").glob("*/vocab.model"))
  assert (
    len(copies) == 1 and copies[0].read_bytes() == (bucket / "export" / "vocab.model").read_bytes()
  )
  elsewhere = ml_collections.ConfigDict({"data": {"vocab_path": str(tmp_path / "gone.model")}})
  from_export = export.load_vocab("gs://bucket/export", elsewhere)
  assert from_export.encode("a bag") == expected.encode("a bag")
  with pytest.raises(FileNotFoundError, match="gs://bucket/export/missing.model"):
    vocab.load("gs://bucket/export/missing.model")


def test_missing_and_garbled_files_are_named(tmp_path):
  missing = str(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
  with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6.txt.gz"):
    vocab.load(missing)
  not_gzip = tmp_path / "plain.txt.gz"
  not_gzip.write_text("#version: 0.2\na b\n")
  with pytest.raises(ValueError, match="plain.txt.gz is not a gzip-compressed"):
    vocab.load(str(not_gzip))
  short = tmp_path / "short.txt.gz"
  with gzip.open(short, "wt") as f:
    f.write("#version: 0.2\ni n\nt h\n")
  with pytest.raises(ValueError, match="short.txt.gz is not CLIP's BPE merges file: 3 lines after"):
    vocab.load(str(short))
  with gzip.open(short, "wt") as f:
    f.write("#version: 0.2\n" + "a b\n" * 10 + "abc\n" + "a b\n" * clip_bpe.NUM_MERGES)
  with pytest.raises(ValueError, match="line 12 is not a pair"):
    vocab.load(str(short))
  garbled = tmp_path / "vocab.model"
  garbled.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="vocab.model is not a SentencePiece model"):
    vocab.load(str(garbled))


@pytest.mark.slow
def test_export_keeps_the_vocabulary_kind(tmp_path, sentencepiece_model):
  config = ml_collections.ConfigDict(dict(data=dict(vocab_path=BPE_FILE)))
  params = dict(w=np.zeros(2, np.float32))
  export.write(params, config, str(tmp_path / "clip"), "float32", BPE_FILE)
  copied = tmp_path / "clip" / export.CLIP_VOCAB_FILE
  assert copied.read_bytes() == open(BPE_FILE, "rb").read()
  assert not (tmp_path / "clip" / export.VOCAB_FILE).exists()
  loaded = export.load_vocab(str(tmp_path / "clip"), config)
  assert isinstance(loaded, clip_bpe.ClipTokenizer) and loaded.path == str(copied)
  # An export written before CLIP vocabularies (vocab.model) loads as it did.
  old = tmp_path / "old"
  old.mkdir()
  (old / export.VOCAB_FILE).write_bytes(open(sentencepiece_model, "rb").read())
  assert isinstance(export.load_vocab(str(old), config), sentencepiece.SentencePieceProcessor)
  # An export without a vocabulary falls back to the run's config.data.vocab_path.
  (tmp_path / "bare").mkdir()
  assert isinstance(export.load_vocab(str(tmp_path / "bare"), config), clip_bpe.ClipTokenizer)


@pytest.mark.slow
def test_seqio_vocabulary_tokenizes_in_tf_data(sentencepiece_model):
  import seqio
  import tensorflow as tf

  clip = vocab.seqio_vocabulary(BPE_FILE)
  assert clip == vocab.seqio_vocabulary(BPE_FILE)
  assert isinstance(vocab.seqio_vocabulary(sentencepiece_model), seqio.SentencePieceVocabulary)
  assert (clip.vocab_size, clip.eos_id, clip.pad_id) == (49_408, 49_407, 0)
  texts = tf.data.Dataset.from_tensor_slices(["a photo of a cat", "Café 😀", ""])
  encoded = [ids.numpy().tolist() for ids in texts.map(clip.encode_tf)]
  assert encoded == [[320, 1125, 539, 320, 2368], [15304, 7334], []]
  # Latin-1 bytes (not UTF-8) in a caption: U+FFFD for them, the rest kept, no crash; and
  # eagerly, outside tf.data, too.
  latin1 = tf.constant("Café latte".encode("latin-1"))
  replaced = clip.encode("Caf\ufffd latte")
  assert (
    next(iter(tf.data.Dataset.from_tensors(latin1).map(clip.encode_tf))).numpy().tolist()
    == replaced
  )
  assert clip.encode_tf(latin1).numpy().tolist() == replaced
  # Decoding stops at the first <end_of_text>.
  ids = tf.constant([[320, 1125, 49_407, 320, 320], [320, 2368, 0, 0, 0]])
  assert clip.decode_tf(ids).numpy().tolist() == [b"a photo ", b"a cat !!!"]
  assert clip.decode([320, 1125, 49_407, 320]) == "a photo "
