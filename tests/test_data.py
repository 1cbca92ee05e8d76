"""The seqio data pipeline on small datasets the tests build: a Fashion-MNIST-format
TFDS dataset (through the real builder) and TFRecord alt-text shards."""

import fcntl
import gzip
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from coca_jax.config import JFT_TEMPLATES
from coca_jax.data import builders, images, loader, pipeline, prepare, preprocess, raw, tasks, vocab
from configs import tiny

N_TRAIN, N_TEST, N_CAPTIONS = 300, 40, 60
MAX_LEN, SIZE = 12, 16
# Image shapes for the eval-pixels test: non-square, grey, RGBA and upscaled.
SHAPES = [(20, 24, 4), (40, 17, 3), (9, 9), (64, 48, 3)]


def write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def png(array) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, format="PNG")
  return out.getvalue()


def caption(i: int) -> str:
  return f"emoji number {i} with a {['red', 'green', 'blue'][i % 3]} face"


def _example(image_bytes: bytes | None, text: str) -> bytes:
  """An alt-text tf.train.Example (without `image` for None)."""
  feature = dict(caption=tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()])))
  if image_bytes is not None:
    feature["image"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_alt_text(path, rows):
  with tf.io.TFRecordWriter(path) as writer:
    for image_bytes, text in rows:
      writer.write(_example(image_bytes, text))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Fashion-MNIST-format idx files -> the real TFDS builder; colour RGBA PNGs with
  unique captions -> TFRecord shards; a small SentencePiece vocabulary."""
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  idx = root / "idx"
  idx.mkdir()
  for split, n in (("train", N_TRAIN), ("test", N_TEST)):
    images_file, labels_file = raw.FASHION_MNIST_FILES[split]
    write_idx(idx / images_file, rng.integers(0, 256, (n, 28, 28)))
    write_idx(idx / labels_file, np.arange(n) % 10)
  builder = builders.CocaFashionMnist(data_dir=str(root / "tfds"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(idx)))

  def colour():  # non-square RGBA
    return rng.integers(0, 256, (20, 24, 4)).astype(np.uint8)

  rows = [(png(colour()), caption(i)) for i in range(N_CAPTIONS)]
  write_alt_text(str(root / "alt-00000-of-00002.tfrecord"), rows[: N_CAPTIONS // 2])
  write_alt_text(str(root / "alt-00001-of-00002.tfrecord"), rows[N_CAPTIONS // 2 :])
  texts = [c for _, c in rows] + prepare.jft_texts(JFT_TEMPLATES, ("t-shirt", "clothing"))
  texts += [f"{a} {b}" for a, b in raw.FASHION_MNIST_CLASSES]
  vocab.train(texts, str(root / "vocab.model"), 120)
  return root


def make_config(root, **rates):
  c = tiny.get_config().data
  c.source = "mixture"
  c.data_dir = str(root)
  c.vocab_path = str(root / "vocab.model")
  c.image_size = SIZE
  c.max_text_len = MAX_LEN
  c.shuffle_buffer = 64
  c.image.flip = True
  c.jft_style.eval_split = "test"
  # Named, so the trainer does not take this folder for the demo's and build the
  # emoji dataset into it (loader.resolve -> prepare.ensure: 29 s of one test).
  c.jft_style.tfds_data_dir = str(root / "tfds")
  c.alt_text.files = str(root / "alt-*.tfrecord")
  if rates:
    c.rates = rates
  return c


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def is_grey(images):
  """[B, S, S, 3] -> [B] bool: Fashion-MNIST rows are grey (R = G = B)."""
  return np.abs(images - images[..., :1]).max(axis=(1, 2, 3)) < 1e-6


def source_of_rows(batch):
  """[b] bool, True for JFT-style rows, told from the pixels alone."""
  return is_grey(batch["image"])


# (jft_style rate, local batch, JFT-style rows of shard 1 of 2 at steps 0, 1, worked by
# hand): the global 14 rows x 0.75 = 10.5 and x 0.25 = 3.5 floor to 10 + 3; the row left
# goes to the first source (remainders tie): 11 JFT-style rows at (2j + 1) / 22 and 3
# alt-text rows at 1/6, 1/2, 5/6 of the global batch, JJAJJJJ | AJJJAJJ: shard 1 takes the
# second slice at even steps (5 JFT-style rows) and the first at odd ones (6).
@pytest.mark.parametrize("jft_rate, batch_size, jft_rows", [(0.5, 8, (4, 4)), (0.75, 7, (5, 6))])
def test_every_batch_holds_the_configured_counts_also_after_resume(
  data_dir, jft_rate, batch_size, jft_rows
):
  config = make_config(data_dir, jft_style=jft_rate, alt_text=1 - jft_rate)
  kwargs = dict(shard_index=1, num_shards=2, local_batch_size=batch_size)
  full = take(pipeline.batches(config, "train", **kwargs), 6)
  resumed = take(pipeline.batches(config, "train", start_step=3, **kwargs), 3)
  for step, batch in [*enumerate(full), *enumerate(resumed, 3)]:
    assert source_of_rows(batch).sum() == jft_rows[step % 2], step
  # Each source fills the same positions at every step of a parity.
  for parity in (0, 1):
    layouts = {tuple(source_of_rows(b)) for b in full[parity::2]}
    assert len(layouts) == 1, layouts
  for a, b in zip(full[3:], resumed):  # from an odd step: the skip counts 5 + 6 + 5 rows
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text"]["ids"], b["text"]["ids"])


def test_every_shard_reads_its_part_of_each_source_at_the_same_rate():
  """A shard took the same slice of the global layout at every step: with rates 0.9 / 0.1
  over 8 hosts of 4 rows, 5 of the 8 hosts took no alt-text row ever, and their parts of
  the alt-text data (seqio shards them) were never read; 1:1 over 2 hosts of 3 rows read
  one host's JFT-style part twice as fast as the other's. Each slice now goes to every
  shard in turn: every step holds the global counts, every shard the same over 8 steps."""
  rates = dict(jft_style=0.9, alt_text=0.1)
  global_counts = pipeline.source_counts(rates, 32)
  assert global_counts == dict(jft_style=29, alt_text=3)
  counts = np.asarray(
    [
      [list(pipeline.shard_counts(rates, 4, shard, 8, step).values()) for step in range(8)]
      for shard in range(8)
    ]
  )  # [shard, step, source]
  assert (counts.sum(axis=0) == [29, 3]).all()  # every step: the global batch's counts
  assert (counts.sum(axis=1) == [29, 3]).all()  # every shard over 8 steps: the same
  assert (counts[:, :, 1] == 0).all(axis=1).sum() == 0  # no shard skips alt-text for good


def test_source_counts_round_by_largest_remainder_and_rates_are_checked(data_dir):
  def counts(jft, alt, batch_size):
    got = pipeline.source_counts(dict(jft_style=jft, alt_text=alt), batch_size)
    return got["jft_style"], got["alt_text"]

  assert counts(0.5, 0.5, 8) == (4, 4)
  assert counts(0.75, 0.25, 7) == (5, 2)  # floors 5 + 1, the larger remainder (0.75) wins
  assert counts(0.75, 0.25, 6) == (5, 1)  # remainders tie (0.5): the first source
  assert counts(1, 2, 10) == (3, 7)  # 3.33 + 6.67: rates need not sum to 1
  assert counts(1.0, 0.0, 5) == (5, 0)

  # A shard's counts come from the global batch's: 1:1 over 2 hosts of 3 rows lays out
  # JAJAJA, so the hosts hold 2 + 1 and 1 + 2 (3:3 in all, not 4:2 rounded per host).
  def shard(rates, batch_size, index, shards):
    got = pipeline.shard_counts(
      dict(zip(("jft_style", "alt_text"), rates)), batch_size, index, shards
    )
    return got["jft_style"], got["alt_text"]

  assert [shard((1, 1), 3, i, 2) for i in range(2)] == [(2, 1), (1, 2)]
  for shards in (1, 2, 3, 4, 6, 12):  # 12 rows x 0.75 = 9 JFT-style, however they are split
    per_shard = [shard((0.75, 0.25), 12 // shards, i, shards) for i in range(shards)]
    assert np.sum(per_shard, axis=0).tolist() == [9, 3], (shards, per_shard)
  # Spread evenly: source i's j-th row at (j + 1/2) / n_i of the batch, ties in order.
  np.testing.assert_array_equal(pipeline.batch_layout([2, 2]), [0, 1, 0, 1])
  np.testing.assert_array_equal(pipeline.batch_layout([3, 1]), [0, 0, 1, 0])
  np.testing.assert_array_equal(pipeline.batch_layout([0, 3]), [1, 1, 1])
  for rates in (dict(jft_style=-0.5, alt_text=1.0), dict(jft_style=0.0, alt_text=0.0)):
    with pytest.raises(ValueError, match=r"config\.data\.rates=.*(>= 0|all rates are 0)"):
      pipeline.batches(
        make_config(data_dir, **rates), "train", shard_index=0, num_shards=1, local_batch_size=4
      )


def test_batch_contract(data_dir):
  config = make_config(data_dir)
  batch = next(pipeline.batches(config, "train", shard_index=0, num_shards=1, local_batch_size=8))
  assert set(batch) == {"image", "text"} and set(batch["text"]) == {"ids", "labels", "mask"}
  assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
  for key in ("ids", "labels", "mask"):
    assert batch["text"][key].shape == (8, MAX_LEN) and batch["text"][key].dtype == np.int32
  ids, labels, mask = batch["text"]["ids"], batch["text"]["labels"], batch["text"]["mask"]
  assert (ids[:, 0] == 0).all()  # BOS
  np.testing.assert_array_equal(
    ids[:, 1:] * mask[:, 1:], labels[:, :-1] * mask[:, 1:]
  )  # shifted by one
  lengths = mask.sum(1)
  for row, n in enumerate(lengths):
    assert mask[row, :n].all() and not mask[row, n:].any()  # a prefix of ones
    assert labels[row, n - 1] == 1 and (labels[row, : n - 1] > 1).all()  # tokens then EOS
    assert not labels[row, n:].any() and not ids[row, n:].any()  # padding is 0
  # Mean 0.5 / std 0.5: pixels in [-1, 1]; images are not constant.
  assert np.isfinite(batch["image"]).all()
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert batch["image"].std(axis=(1, 2, 3)).min() > 0.01


def test_jft_text_is_a_prompt_of_shuffled_label_names(data_dir):
  config = make_config(data_dir, jft_style=1.0, alt_text=0.0)
  tasks.register(config)
  task = seqio.get_mixture_or_task("jft_style")
  texts = {
    row["text_pretokenized"].decode()
    for row in task.get_dataset(None, "train", shuffle=False, num_epochs=1, use_cached=False)
    .take(100)
    .as_numpy_iterator()
  }
  templates = config.jft_style.templates
  for text in texts:
    assert any(text.startswith(t.split("{}")[0]) for t in templates), text
  # Both orders of the two label names occur ("t-shirt, clothing" and "clothing, t-shirt").
  assert any("t-shirt, clothing" in t for t in texts) and any(
    "clothing, t-shirt" in t for t in texts
  )


def shard_captions(config, index, num_shards):
  tasks.register(config)
  task = seqio.get_mixture_or_task("alt_text_eval")
  ds = task.get_dataset(
    None,
    "validation",
    shuffle=False,
    num_epochs=1,
    use_cached=False,
    shard_info=seqio.ShardInfo(index, num_shards),
  )
  return [row["text_pretokenized"].decode() for row in ds.as_numpy_iterator()]


def test_a_file_count_the_shards_do_not_divide_is_named(tmp_path, data_dir, caplog):
  """seqio shards by whole files: 3 files over 2 hosts read one file's examples twice as
  often as the other two's, silently."""
  rows = [(png(np.full((8, 8, 3), 20 * i, np.uint8)), f"caption {i}") for i in range(6)]
  for i in range(3):
    write_alt_text(str(tmp_path / f"alt-{i}.tfrecord"), rows[2 * i : 2 * i + 2])
  config = make_config(data_dir)
  config.alt_text.files = str(tmp_path / "alt-*.tfrecord")
  kwargs = dict(num_shards=2, local_batch_size=4)
  with caplog.at_level("WARNING"):
    next(pipeline.batches(config, "train", shard_index=0, **kwargs))
  assert "alt_text_rows: 3 files over 2 data shards" in caplog.text
  assert "jft_style_rows" not in caplog.text  # 1 file: seqio shards its rows instead
  caplog.clear()
  config.alt_text.files = str(tmp_path / "alt-[01].tfrecord")
  with caplog.at_level("WARNING"):
    next(pipeline.batches(config, "train", shard_index=0, **kwargs))
  assert "files over" not in caplog.text


@pytest.mark.parametrize("num_shards", [2, 3])
def test_host_shards_are_disjoint_and_cover_the_data(data_dir, num_shards):
  config = make_config(data_dir)
  shards = [shard_captions(config, i, num_shards) for i in range(num_shards)]
  flat = [c for s in shards for c in s]
  assert len(flat) == len(set(flat)) == N_CAPTIONS
  assert set(flat) == {caption(i) for i in range(N_CAPTIONS)}


@pytest.mark.parametrize(
  "split,source,rows", [("train", "alt_text", 60), ("validation", "jft_style", 40)]
)
def test_each_pass_over_a_source_reads_every_row_once(data_dir, split, source, rows):
  """seqio's num_epochs=None repeats before its shuffle buffer: the first 40 rows of a
  40-row eval split held 27 distinct ones (the held-out loss was over a resample), and
  a training pass missed some images and saw others twice."""
  config = make_config(data_dir, **{source: 1.0})
  seed = config.seed + (split != "train")
  records, _, _ = pipeline.records(config, split, 0, 1, seed, 8, 0)
  drawn = [r["image"] for _, r in records.take(3 * rows).as_numpy_iterator()]
  passes = [drawn[i * rows : (i + 1) * rows] for i in range(3)]
  assert all(len(set(p)) == rows for p in passes)  # every row once per pass
  assert set(passes[0]) == set(passes[1]) and passes[0] != passes[1]  # reshuffled


def test_resume_at_step_k_equals_the_uninterrupted_sequence(data_dir):
  config = make_config(data_dir)
  kwargs = dict(shard_index=1, num_shards=2, local_batch_size=8)
  full = take(pipeline.batches(config, "train", **kwargs), 6)
  resumed = take(pipeline.batches(config, "train", start_step=4, **kwargs), 2)
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text"]["ids"], b["text"]["ids"])
  # Another seed gives another sequence.
  config.seed = 1
  other = take(pipeline.batches(config, "train", **kwargs), 1)
  assert not np.array_equal(other[0]["image"], full[0]["image"])


@pytest.fixture(scope="module")
def uniform_dir(tmp_path_factory):
  """A Fashion-MNIST-format TFDS dataset whose rows are all the same image and label:
  what two hosts' k-th examples differ by is then only their augmentation."""
  root = tmp_path_factory.mktemp("uniform")
  image = np.random.default_rng(1).integers(0, 256, (28, 28))
  idx = root / "idx"
  idx.mkdir()
  for split, n in (("train", 40), ("test", 8)):
    images_file, labels_file = raw.FASHION_MNIST_FILES[split]
    write_idx(idx / images_file, np.broadcast_to(image, (n, 28, 28)))
    write_idx(idx / labels_file, np.zeros(n))
  builder = builders.CocaFashionMnist(data_dir=str(root / "tfds"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(idx)))
  return root


def test_hosts_draw_their_own_augmentation(data_dir, uniform_dir):
  """Same-position examples of two shards of identical rows: with one seed for every
  shard (the old pipeline) they were bitwise equal; now crops, flips, templates and label
  orders are drawn per shard."""
  config = make_config(data_dir, jft_style=1.0, alt_text=0.0)
  config.jft_style.tfds_data_dir = str(uniform_dir / "tfds")
  config.image_size = 24
  shards = [
    next(pipeline.batches(config, "train", shard_index=i, num_shards=2, local_batch_size=16))
    for i in range(2)
  ]
  images_, ids = [b["image"] for b in shards], [b["text"]["ids"] for b in shards]
  # Within a shard, the identical rows were augmented differently.
  assert len({row.tobytes() for row in images_[0]}) > 12
  assert len({row.tobytes() for row in ids[0]}) > 3
  same_image = (images_[0] == images_[1]).all(axis=(1, 2, 3))
  same_text = (ids[0] == ids[1]).all(axis=1)
  assert same_image.mean() < 0.25 and same_text.mean() < 0.5, (same_image, same_text)


def test_resume_does_not_decode_the_skipped_batches(data_dir):
  config = make_config(data_dir)
  kwargs = dict(shard_index=0, num_shards=1, local_batch_size=8)
  skipped = 200 * kwargs["local_batch_size"]
  before = preprocess.CALLS["decode"]
  iterator = pipeline.batches(config, "train", start_step=200, **kwargs)
  next(iterator)
  del iterator  # stops tf.data's read-ahead
  decoded = preprocess.CALLS["decode"] - before
  # The first batch and tf.data's read-ahead (prefetch, parallel map), not the 1600
  # skipped rows.
  assert kwargs["local_batch_size"] <= decoded < skipped / 2, decoded


def test_rejected_rows_are_replaced_within_their_batch_and_resume_exactly(tmp_path, data_dir):
  rows = [(png(np.full((8, 8, 3), 10 * i + 5, np.uint8)), f"good {i}") for i in range(12)]
  rows[3] = (b"not an image", "junk")
  rows[8] = (rows[8][0], " ")
  write_alt_text(str(tmp_path / "some-bad.tfrecord"), rows)
  config = make_config(data_dir, alt_text=1.0, jft_style=0.0)
  config.alt_text.files = str(tmp_path / "some-bad.tfrecord")
  kwargs = dict(shard_index=0, num_shards=1, local_batch_size=4)
  before = dict(preprocess.BAD_DATA)
  full = take(pipeline.batches(config, "train", **kwargs), 9)
  after = dict(preprocess.BAD_DATA)
  assert after.get(preprocess.UNDECODABLE, 0) > before.get(preprocess.UNDECODABLE, 0)
  assert after.get(preprocess.EMPTY_TEXT, 0) > before.get(preprocess.EMPTY_TEXT, 0)
  # Every row is a good one (each image is flat, its grey level names its row): neither
  # the black 1x1 placeholder of a rejected row nor the image of the blank caption.
  pixels = np.concatenate([b["image"][:, 0, 0, 0] for b in full])
  levels = np.round((pixels * 0.5 + 0.5) * 255).astype(int)  # undo the normalisation
  assert set(levels) <= {10 * i + 5 for i in range(12) if i not in (3, 8)}, set(levels)
  resumed = take(pipeline.batches(config, "train", start_step=5, **kwargs), 4)
  for a, b in zip(full[5:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text"]["ids"], b["text"]["ids"])


def test_rejected_rows_are_replaced_from_their_own_source(tmp_path, data_dir):
  # Alt-text rows of flat colours (not grey: told from the grey JFT-style rows), two bad.
  colours = [(10 * i + 5, 200 - 10 * i, 0) for i in range(12)]
  rows = [(png(np.full((8, 8, 3), c, np.uint8)), f"good {i}") for i, c in enumerate(colours)]
  rows[3] = (b"not an image", "junk")
  rows[8] = (rows[8][0], " ")
  write_alt_text(str(tmp_path / "some-bad.tfrecord"), rows)
  config = make_config(data_dir)
  config.alt_text.files = str(tmp_path / "some-bad.tfrecord")
  kwargs = dict(shard_index=0, num_shards=1, local_batch_size=8)
  full = take(pipeline.batches(config, "train", **kwargs), 6)  # 24 alt-text rows: 2 epochs
  for batch in full:
    alt = ~source_of_rows(batch)
    assert alt.sum() == 4
    reds = np.round((batch["image"][alt, 0, 0, 0] * 0.5 + 0.5) * 255).astype(int)
    assert set(reds) <= {10 * i + 5 for i in range(12) if i not in (3, 8)}, set(reds)
  resumed = take(pipeline.batches(config, "train", start_step=3, **kwargs), 3)
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text"]["ids"], b["text"]["ids"])
  # A source without one good row in a batch cannot keep its count: an error naming it.
  write_alt_text(str(tmp_path / "all-bad.tfrecord"), [(b"not an image", "junk")] * 4)
  config.alt_text.files = str(tmp_path / "all-bad.tfrecord")
  with pytest.raises(ValueError, match="all 4 rows of source 'alt_text' rejected"):
    next(pipeline.batches(config, "train", **kwargs))


def test_a_batch_with_one_row_of_a_source_repeats_an_earlier_one_for_a_bad_image(
  tmp_path, data_dir
):
  """Host batches of 2 rows, rates 1:1: each holds one alt-text row, and one undecodable
  image stopped the run ("all 1 rows of source 'alt_text' rejected"). That row now
  repeats the latest good alt-text row, and a resume after it stays exact."""
  colours = [(10 * i + 5, 200 - 10 * i, 0) for i in range(12)]
  rows = [(png(np.full((8, 8, 3), c, np.uint8)), f"good {i}") for i, c in enumerate(colours)]
  rows[3] = (b"not an image", "junk")
  write_alt_text(str(tmp_path / "one-bad.tfrecord"), rows)
  config = make_config(data_dir)
  config.alt_text.files = str(tmp_path / "one-bad.tfrecord")
  kwargs = dict(shard_index=0, num_shards=1, local_batch_size=2)
  full = take(pipeline.batches(config, "train", **kwargs), 24)  # two passes
  reds = []
  for batch in full:
    alt = ~source_of_rows(batch)
    assert alt.sum() == 1
    reds.append(int(np.round((batch["image"][alt, 0, 0, 0][0] * 0.5 + 0.5) * 255)))
  assert set(reds) == {10 * i + 5 for i in range(12) if i != 3}
  # The bad row's steps (one per pass) repeat the step before them.
  repeats = [t for t in range(1, 24) if reds[t] == reds[t - 1]]
  assert len(repeats) == 2, reds
  # A resume after it, and one AT it: its first batch needs the row of the batch before
  # the resume, which it reads back (it raised, every time, so the run could not resume).
  for start in (repeats[0] + 1, repeats[0]):
    resumed = take(pipeline.batches(config, "train", start_step=start, **kwargs), 3)
    for a, b in zip(full[start:], resumed):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["text"]["ids"], b["text"]["ids"])


def test_corrupt_image_and_empty_caption_are_dropped_and_counted(tmp_path, data_dir):
  good = [(png(np.full((8, 8, 3), 40 * i, np.uint8)), f"good {i}") for i in range(5)]
  bad_png = png(np.zeros((8, 8, 3), np.uint8))[:30]  # truncated: header only
  rows = (
    good[:2] + [(bad_png, "broken image"), (good[2][0], "  "), (b"not an image", "junk")] + good[2:]
  )
  write_alt_text(str(tmp_path / "bad.tfrecord"), rows)
  captions, rejected = captions_and_rejections(data_dir, str(tmp_path / "bad.tfrecord"))
  assert captions == [f"good {i}" for i in range(5)]
  assert rejected == {preprocess.UNDECODABLE: 2, preprocess.EMPTY_TEXT: 1}


def captions_and_rejections(data_dir, files: str) -> tuple[list[str], dict]:
  """The captions an alt-text-only Task keeps of `files`, and the rows it rejected (the
  change of preprocess.BAD_DATA by reason)."""
  config = make_config(data_dir, alt_text=1.0, jft_style=0.0)
  config.alt_text.files = files
  before = dict(preprocess.BAD_DATA)
  captions = shard_captions(config, 0, 1)
  after = dict(preprocess.BAD_DATA)
  reasons = (preprocess.UNDECODABLE, preprocess.EMPTY_TEXT, preprocess.MALFORMED)
  changed = {k: after.get(k, 0) - before.get(k, 0) for k in reasons}
  return captions, {k: v for k, v in changed.items() if v}


def test_invisible_captions_and_a_missing_image_are_dropped_and_counted(tmp_path, data_dir):
  """Captions of no-break, zero-width or ideographic spaces passed the ASCII blank check
  and trained as empty texts ([BOS] -> [EOS]); an Example without `image` stopped the
  pipeline with an InvalidArgumentError."""
  good = [(png(np.full((8, 8, 3), 40 * i, np.uint8)), f"good {i}") for i in range(3)]
  invisible = [(good[0][0], text) for text in ("\u00a0", "\u200b", "\u3000 ", "\ufeff")]
  with tf.io.TFRecordWriter(str(tmp_path / "bad.tfrecord")) as writer:
    for image_bytes, text in good[:1] + invisible + good[1:]:
      writer.write(_example(image_bytes, text))
    writer.write(_example(None, "an example without its image"))
  captions, rejected = captions_and_rejections(data_dir, str(tmp_path / "bad.tfrecord"))
  assert captions == [f"good {i}" for i in range(3)]
  assert rejected == {preprocess.UNDECODABLE: 1, preprocess.EMPTY_TEXT: 4}
  # Of an image's captions, an invisible one is never the one drawn.
  captions = tf.constant(["\u00a0", "\u200b ", "a cat", "\u3000"])
  drawn = {preprocess.alt_caption(captions, tf.constant([i, 7])).numpy() for i in range(20)}
  assert drawn == {b"a cat"}


def test_a_broken_off_file_gives_its_records_and_a_file_that_is_no_tfrecord_is_named(
  tmp_path, data_dir
):
  """A truncated shard (a half-finished upload) stopped the pipeline with a DataLossError
  naming neither file nor config key whenever the reader reached it; now its records up to
  the break are read and the other files go on. A file that is not TFRecords at all (a
  PNG) is named, with the config key, before the run builds anything (helper-91)."""
  rows = [(png(np.full((8, 8, 3), 40 * i, np.uint8)), f"good {i}") for i in range(6)]
  write_alt_text(str(tmp_path / "a.tfrecord"), rows[:3])
  write_alt_text(str(tmp_path / "b.tfrecord"), rows[3:])
  whole = (tmp_path / "b.tfrecord").read_bytes()
  (tmp_path / "b.tfrecord").write_bytes(whole[:-10])  # the last record breaks off
  captions, _ = captions_and_rejections(data_dir, str(tmp_path / "*.tfrecord"))
  assert sorted(captions) == [f"good {i}" for i in range(5)]
  config = tiny.get_config()
  config.data = make_config(data_dir, alt_text=1.0, jft_style=0.0)
  config.data.alt_text.files = str(tmp_path / "*.tfrecord")
  loader.check_files(config)
  (tmp_path / "image.png").write_bytes(rows[0][0])
  config.data.alt_text.eval_files = str(tmp_path / "image.png")
  with pytest.raises(
    ValueError, match=r"config\.data\.alt_text\.eval_files=.*image\.png.*record 1"
  ):
    loader.check_files(config)


def test_a_split_the_tfds_dataset_lacks_is_named_with_its_key(data_dir):
  """`train_split=trian` failed at the first batch with TFDS's "Unknown split", naming
  no config key (helper-91); TFDS's slicing syntax is a split too."""
  config = tiny.get_config()
  config.data = make_config(data_dir, alt_text=0.0, jft_style=1.0)
  config.data.jft_style.train_split = "train[:50%]"
  loader.check_files(config)
  config.data.jft_style.train_split = "trian"
  with pytest.raises(ValueError, match=r"config\.data\.jft_style\.train_split='trian' is not"):
    loader.check_files(config)


def test_records_that_are_not_alt_text_examples_are_dropped_and_counted(tmp_path, data_dir):
  """An image of two values, captions stored as integers, bytes that are no Example:
  tf.io.parse_single_example stopped the input pipeline (an InvalidArgumentError naming
  neither file nor key) at whichever step reached them; a training batch and the eval
  set now skip them."""
  good = [(png(np.full((8, 8, 3), 40 * i, np.uint8)), f"good {i}") for i in range(3)]

  def feature(**values):
    return tf.train.Feature(**{k: type_(value=v) for k, (type_, v) in values.items()})

  two_images = dict(
    image=feature(bytes_list=(tf.train.BytesList, [good[0][0], good[1][0]])),
    caption=feature(bytes_list=(tf.train.BytesList, [b"two images"])),
  )
  int_caption = dict(
    image=feature(bytes_list=(tf.train.BytesList, [good[0][0]])),
    caption=feature(int64_list=(tf.train.Int64List, [7])),
  )
  with tf.io.TFRecordWriter(str(tmp_path / "bad.tfrecord")) as writer:
    writer.write(_example(*good[0]))
    for malformed in (two_images, int_caption):
      example = tf.train.Example(features=tf.train.Features(feature=malformed))
      writer.write(example.SerializeToString())
    writer.write(b"\xff\x00 not a protocol buffer")
    for image_bytes, text in good[1:]:
      writer.write(_example(image_bytes, text))
  captions, rejected = captions_and_rejections(data_dir, str(tmp_path / "bad.tfrecord"))
  assert captions == [f"good {i}" for i in range(3)]
  assert rejected == {preprocess.MALFORMED: 3}
  config = make_config(data_dir, alt_text=1.0, jft_style=0.0)
  config.alt_text.files = str(tmp_path / "bad.tfrecord")
  batches = take(
    pipeline.batches(config, "train", shard_index=0, num_shards=1, local_batch_size=4), 3
  )
  assert all(b["image"].shape[0] == 4 for b in batches)


def test_one_blank_rule_in_python_and_tensorflow(sentencepiece_model):
  """is_blank (the row rejection, eval references) and alt_caption's RE2 pattern (which
  caption is drawn) call the same characters blank: str.isspace's and those SentencePiece
  removes, for every code point of the Basic Multilingual Plane (surrogates aside) and
  some above. The RE2 pattern used to differ at the edges (NEL and the information
  separators not blank there; every format character, bidi controls too, blank). And a
  character not called blank makes at least one token: U+FFFD, the controls and U+2581
  made none, and such a caption trained as [BOS, EOS] (helper-91)."""
  removed = {0xAD, *range(0x200B, 0x2010), *range(0x2060, 0x2065), 0xFEFF}
  removed |= {*range(0x01, 0x20), *range(0x7F, 0xA0), 0x061C, 0x2581, 0xFFFD}
  points = [c for c in range(0x10000) if not 0xD800 <= c < 0xE000] + [0x110BD, 0xE0001]
  texts = [chr(c).encode() for c in points]
  expected = [chr(c).isspace() or c in removed for c in points]
  assert [preprocess.is_blank(t) for t in texts] == expected
  tensorflow = tf.strings.regex_full_match(tf.constant(texts), preprocess._BLANK_RE2).numpy()
  assert tensorflow.tolist() == expected
  processor = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model)
  tokenless = [c for c, blank in zip(points, expected, strict=True) if not blank]
  tokenless = [hex(c) for c in tokenless if not processor.encode(chr(c))]
  assert tokenless == []


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("jft_style.templates", ("a photo of the {}.", "a photo"), r"'a photo' needs exactly one \{\}"),
    ("jft_style.templates", ("{} and {}",), "needs exactly one"),
    ("jft_style.templates", (), "need a tuple of templates"),
    ("image.crop_area", (1.0, 0.5), r"crop_area=\(1.0, 0.5\): need 0 < low <= high <= 1"),
    ("image.crop_area", (0.0, 1.0), "crop_area"),
    ("image.crop_aspect", (0.0, 1.0), "crop_aspect"),
    ("image.std", (0.5, 0.0, 0.5), "every std must be > 0"),
    ("image.mean", (0.5, 0.5), "need 3 finite numbers"),
  ],
)
def test_augmentation_and_template_settings_are_checked_before_training(key, value, message):
  """A template without {} failed inside TensorFlow at whichever step drew it; a reversed
  crop_area turned cropping off silently; std 0 made every pixel infinite."""
  from coca_jax import train

  config = tiny.get_config()
  section, name = key.split(".")
  config.data[section][name] = value
  with pytest.raises(ValueError, match=rf"config.data.{key}.*{message}|{message}"):
    train.check_config(config)


def test_decode_rgb_composites_alpha_on_white_and_expands_grey():
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (255, 0, 0, 255)  # opaque red
  rgba[0, 1] = (0, 0, 255, 0)  # fully transparent blue -> white
  rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
  out = images.decode(png(rgba))
  assert out.shape == (2, 2, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
  np.testing.assert_array_equal(out[0, 1], (255, 255, 255))
  np.testing.assert_allclose(out[1, 0], (127, 127, 127), atol=1)
  grey = images.decode(png(np.full((3, 5), 77, np.uint8)))
  assert grey.shape == (3, 5, 3) and (grey == 77).all()


def test_eval_image_center_crops_the_shorter_side():
  # A 4x8 image whose left and right quarters are black, middle white: the center
  # crop of the resized 16x32 image is the white middle.
  image = np.zeros((4, 8, 3), np.uint8)
  image[:, 2:6] = 255
  ds = tf.data.Dataset.from_tensors(dict(image=tf.constant(image)))
  out = next(
    preprocess.eval_image(ds, size=16, mean=(0.0,) * 3, std=(1.0,) * 3).as_numpy_iterator()
  )["image"]
  assert out.shape == (16, 16, 3)
  assert out[:, 2:-2].min() > 0.95


def test_emoji_split_keeps_tones_genders_and_ages_of_one_emoji_together():
  base = "1F44B"
  tones = [f"{base}-{t}" for t in ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")]
  assert {raw.emoji_split(c) for c in [base] + tones} == {raw.emoji_split(base)}
  # Unicode's sequences: teacher = person / man / woman + ZWJ + school (1F3EB); biking =
  # 1F6B4, its man / woman forms + ZWJ + male / female sign + FE0F; a family of two
  # adults and a child in both orders of its members.
  variants = [
    ["1F9D1-200D-1F3EB", "1F468-200D-1F3EB", "1F469-1F3FD-200D-1F3EB", "1F474-200D-1F3EB"],
    ["1F6B4", "1F6B4-200D-2642-FE0F", "1F6B4-1F3FF-200D-2640-FE0F"],
    ["1F468-200D-1F469-200D-1F466", "1F469-200D-1F469-200D-1F467"],
  ]
  for group in variants:
    assert len({raw.base_emoji(c) for c in group}) == 1, group
    assert len({raw.emoji_split(c) for c in group}) == 1, group
  assert raw.base_emoji("1F469-1F3FD-200D-1F3EB") == "P-1F3EB"
  splits = [raw.emoji_split(f"{0x1F300 + i:X}") for i in range(2000)]
  assert 0.05 < splits.count("validation") / len(splits) < 0.15


def test_missing_client_names_the_command(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))  # no npm on PATH
  with pytest.raises(raw.MissingClientError, match="npm pack emojibase-data@17.0.0"):
    raw.npm_tarball(str(tmp_path / "cache"), "emojibase-data@17.0.0")


def test_vocab_larger_than_the_model_is_a_config_error(data_dir):
  with pytest.raises(ValueError, match="config.model.text.vocab_size=50"):
    vocab.check_fits(str(data_dir / "vocab.model"), 50)


@pytest.mark.skipif(
  not prepare.is_prepared(), reason="demo data not prepared (.ci/run prepares it)"
)
def test_prepared_demo_data_and_eval_sets():
  from coca_jax.data import eval_sets, loader
  from configs import demo

  config = demo.get_config()
  config.eval.num_examples = 50
  sets = eval_sets.load(config)
  classes, captions = sets.classification, sets.alt_text
  assert classes.class_names[:2] == ["t-shirt", "trousers"] and len(classes.class_names) == 10
  assert classes.images.shape == (50, 32, 32, 3)
  assert len(captions.images) == 50 and all(len(c) == 1 and c[0] for c in captions.captions)
  assert len({c[0] for c in captions.captions}) == 50
  config = loader.resolve(config)
  # Demo vocabulary: pad/EOS/unk as the model expects, under the model's vocab size.
  sp = seqio.SentencePieceVocabulary(config.data.vocab_path)
  assert (
    sp.pad_id == 0
    and sp.eos_id == 1
    and sp.unk_id == 2
    and sp.vocab_size <= config.model.text.vocab_size
  )
  name, version = config.data.alt_text.tfds_name.split(":")
  assert os.path.exists(os.path.join(prepare.paths()["tfds"], name, version, "dataset_info.json"))


@pytest.mark.slow
def test_tiny_training_on_the_mixture_with_periodic_evaluation(data_dir, tmp_path):
  """The trainer end to end on seqio data: held-out losses and the zero-shot and
  retrieval evals run at eval steps, the export carries the vocabulary, config.json
  names it."""
  import json

  from coca_jax import train
  from configs import tiny

  config = tiny.get_config()
  data = make_config(data_dir)
  for key in ("data_dir", "vocab_path", "shuffle_buffer"):
    config.data[key] = data[key]
  config.data.alt_text.files = data.alt_text.files
  config.data.jft_style.tfds_data_dir = data.jft_style.tfds_data_dir
  config.model.text.vocab_size = 128
  config.train.update(steps=4, eval_every=2, checkpoint_every=2, export_dtype="float32")
  # Captioning and its gallery are covered by test_evaluate; here the data-side eval sets.
  config.eval.update(evals="zero_shot,retrieval", num_examples=16)
  final = train.train(config, str(tmp_path))
  assert final["step"] == 4 and np.isfinite(final["eval/loss"])
  assert 0.0 <= final["eval/zero_shot/top1"] <= final["eval/zero_shot/top5"] <= 1.0
  assert 0.0 <= final["eval/retrieval/image_to_text_r1"] <= 1.0
  assert (tmp_path / "export" / "vocab.model").read_bytes() == (
    data_dir / "vocab.model"
  ).read_bytes()
  assert json.loads((tmp_path / "config.json").read_text())["data"]["vocab_path"] == str(
    data_dir / "vocab.model"
  )


def test_eval_task_and_inference_see_the_same_pixels(tmp_path, data_dir):
  """The same image bytes through the seqio eval task (training-time evaluation) and
  through the inference API's reader give identical pixels."""
  import types

  from coca_jax import inference

  rng = np.random.default_rng(3)
  encoded = [png(rng.integers(0, 256, shape).astype(np.uint8)) for shape in SHAPES]
  rows = [(data, f"picture {i}") for i, data in enumerate(encoded)]
  write_alt_text(str(tmp_path / "same.tfrecord"), rows)
  config = make_config(data_dir, alt_text=1.0, jft_style=0.0)
  config.alt_text.files = config.alt_text.eval_files = str(tmp_path / "same.tfrecord")
  tasks.register(config)
  task = seqio.get_mixture_or_task("alt_text_eval")
  ds = task.get_dataset(None, "validation", shuffle=False, num_epochs=1, use_cached=False)
  from_task = {r["text_pretokenized"].decode(): r["image"] for r in ds.as_numpy_iterator()}
  paths = []
  for i, data in enumerate(encoded):
    paths.append(tmp_path / f"{i}.png")
    paths[-1].write_bytes(data)
  image = config.image
  reader = types.SimpleNamespace(
    image_size=SIZE, mean=image.mean, std=image.std, resize=image.get("resize", "bilinear")
  )
  served, failures = inference.Model.read_images(reader, paths)
  assert not failures and served.shape == (len(SHAPES), SIZE, SIZE, 3)
  for i in range(len(SHAPES)):
    np.testing.assert_array_equal(from_task[f"picture {i}"], served[i])


def test_eval_images_without_a_caption_are_left_out(tmp_path, data_dir):
  """An image whose captions are all blank can be neither retrieved (it would count as a
  miss) nor scored as captioned: the eval task's bad-data filter drops it."""
  from coca_jax.data import eval_sets

  rng = np.random.default_rng(5)
  rows = [(png(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)), t) for t in ("a", " ", "b")]
  write_alt_text(str(tmp_path / "blank.tfrecord"), rows)
  config = tiny.get_config()
  config.data = make_config(data_dir, alt_text=1.0, jft_style=0.0)
  config.data.alt_text.eval_files = str(tmp_path / "blank.tfrecord")
  config.eval.evals = "retrieval"
  assert eval_sets.load(config).alt_text.captions == [["a"], ["b"]]


@pytest.mark.slow  # decodes and tokenizes the 300 training rows
def test_held_out_classes_never_reach_training(data_dir):
  config = make_config(data_dir, jft_style=1.0, alt_text=0.0)
  config.jft_style.held_out_classes = ("trousers", "bag")  # labels 1 and 8

  def labels(task_name, split):
    task = seqio.get_mixture_or_task(task_name)
    rows = task.get_dataset(
      None, split, shuffle=False, num_epochs=1, use_cached=False, trim_output_features=False
    )
    return {int(row["label"]) for row in rows.as_numpy_iterator()}

  tasks.register(config)
  trained = set(range(10)) - {1, 8}
  assert labels("jft_style_rows", "train") == labels("jft_style", "train") == trained
  assert labels("jft_style_eval", "validation") == set(range(10))  # zero-shot scores them
  config.jft_style.held_out_classes = ("trouser",)
  with pytest.raises(ValueError, match=r"held_out_classes names \['trouser'\]"):
    tasks.register(config)


def test_a_classification_dataset_without_label_names_takes_its_class_label_names(data_dir):
  """The JFT-style source needed the demo's own `label_names` feature: a plain TFDS
  classification dataset (a `label` ClassLabel: cifar10, food101, ...) failed at the
  first batch with seqio's "missing expected output feature ... label_names", and a
  version-less tfds_name with held-out classes with "not enough values to unpack"."""
  config = make_config(data_dir)
  config.jft_style.tfds_name = "coca_fashion_mnist"  # no version: the newest prepared
  names = tasks.label_names(config)
  assert names[:2] == ["t-shirt", "trousers"] and len(names) == 10
  rows = tf.data.Dataset.from_tensor_slices({"label": [1, 0, 9]})
  got = [
    r["label_names"].tolist() for r in tasks.with_label_names(rows, config).as_numpy_iterator()
  ]
  assert got == [[b"trousers"], [b"t-shirt"], [b"ankle boot"]]
  multi = tf.data.Dataset.from_tensor_slices({"label": [[1, 9]]})  # Sequence(ClassLabel)
  assert next(iter(tasks.with_label_names(multi, config)))["label_names"].numpy().tolist() == [
    b"trousers",
    b"ankle boot",
  ]
  named = tf.data.Dataset.from_tensor_slices({"label_names": [["a", "b"]]})
  assert tasks.with_label_names(named, config) is named  # the source's own names
  unlabelled = tf.data.Dataset.from_tensor_slices({"image": [b""], "caption": [b"x"]})
  with pytest.raises(ValueError, match=r"tfds_name='coca_fashion_mnist' has neither"):
    tasks.with_label_names(unlabelled, config)


@pytest.mark.timeout(120)  # the stream it checks used to be endless: a hang, not a failure
def test_a_shard_of_held_out_rows_only_ends_its_stream(data_dir, uniform_dir):
  """Every row of uniform_dir is class 0: holding that class out leaves the shard
  nothing, so its stream ends (the loader's error naming the shard) where the filter,
  applied after seqio's repeat, searched an endless stream and hung every host."""
  config = make_config(data_dir, jft_style=1.0, alt_text=0.0)
  config.jft_style.tfds_data_dir = str(uniform_dir / "tfds")
  names = tasks.label_names(config)
  config.jft_style.held_out_classes = (names[1],)
  kwargs = dict(shard_index=0, num_shards=1, local_batch_size=4)
  assert next(pipeline.batches(config, "train", **kwargs))["image"].shape[0] == 4
  config.jft_style.held_out_classes = (names[0],)
  with pytest.raises(StopIteration):
    next(pipeline.batches(config, "train", **kwargs))
  config.jft_style.held_out_classes = tuple(names)
  with pytest.raises(ValueError, match="holds out every class of"):
    tasks.register(config)


def test_special_ids_outside_the_vocabulary_are_a_config_error(data_dir):
  path = str(data_dir / "vocab.model")
  vocab.check_fits(path, 50_000, {"config.model.text.eos_id": 1})
  with pytest.raises(ValueError, match=r"config.model.text.bos_id=49406 outside the \d+ pieces"):
    vocab.check_fits(path, 50_000, {"config.model.text.bos_id": 49406})


@pytest.mark.skipif(
  not prepare.is_prepared(), reason="demo data not prepared (.ci/run prepares it)"
)
def test_an_open_clip_config_with_the_demo_vocabulary_is_a_config_error():
  """open_clip's configs set start/end of text 49406/49407 and name no vocabulary: with
  the demo's 1,000-piece model filled in, training tokenised captions with it."""
  from coca_jax.data import loader
  from configs.open_clip import coca_vit_b32

  with pytest.raises(ValueError, match=r"bos_id=49406, config.model.text.eos_id=49407 outside"):
    loader.resolve(coca_vit_b32.get_config())


def test_evaluating_on_the_training_files_is_named(caplog):
  with caplog.at_level("WARNING"):
    assert tasks.split_files("config.data.vqa", "t*", "e*") == dict(train="t*", validation="e*")
    assert not caplog.records
    assert tasks.split_files("config.data.vqa", "t*", "") == dict(train="t*", validation="t*")
    tasks.split_files("config.data.vqa", "t*", "")
  assert "config.data.vqa.eval_files is empty: evaluation reads the training files" in caplog.text
  assert len(caplog.records) == 1  # once per source and pattern


def test_an_interrupted_fetch_leaves_nothing_a_later_run_takes_for_the_package(
  tmp_path, monkeypatch
):
  """`npm pack` and `dpkg-deb -x` write in place: one killed midway left a truncated
  tarball or idx file that every later prepare read (EOFError) until deleted by hand.
  Stand-in clients write part of their output and fail, then succeed."""
  bin_dir, cache = tmp_path / "bin", tmp_path / "raw"
  bin_dir.mkdir()
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  package = raw.NPM_PACKAGES["emojibase"]
  tarball = os.path.basename(raw.tarball_path(str(cache), package))
  monkeypatch.setattr(raw, "FASHION_MNIST_INSTALLED", str(tmp_path / "not_installed"))
  folder = str(cache / raw.DEBIAN_PACKAGE) + raw.FASHION_MNIST_INSTALLED
  idx = (
    os.path.relpath(folder, cache / raw.DEBIAN_PACKAGE) + "/" + raw.FASHION_MNIST_FILES["train"][0]
  )

  def clients(status: int) -> None:
    for name, script in (
      ("npm", f"printf part > {tarball}; exit {status}"),
      ("dpkg-deb", f'mkdir -p "$3/$(dirname {idx})" && printf part > "$3/{idx}"; exit {status}'),
    ):
      (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
      (bin_dir / name).chmod(0o755)

  cache.mkdir()
  (cache / f"{raw.DEBIAN_PACKAGE}_1.0_all.deb").touch()
  clients(1)
  with pytest.raises(subprocess.CalledProcessError):
    raw.npm_tarball(str(cache), package)
  with pytest.raises(subprocess.CalledProcessError):
    raw.fashion_mnist_dir(str(cache))
  assert not (cache / tarball).exists() and not (cache / raw.DEBIAN_PACKAGE).exists()
  assert not list(cache.glob(".partial-*"))  # the scratch folders go too
  clients(0)
  assert raw.npm_tarball(str(cache), package) == str(cache / tarball)
  assert (cache / tarball).read_text() == "part"
  assert raw.fashion_mnist_dir(str(cache)) == folder
  assert os.path.exists(os.path.join(folder, raw.FASHION_MNIST_FILES["train"][0]))


# Holds `prepare.exclusive(argv[1])` for a second, then writes `released` and lets go.
HOLD_THE_LOCK = """
import os, sys, time
from coca_jax.data import prepare
with prepare.exclusive(sys.argv[1]):
  print("held", flush=True)
  time.sleep(1.0)
  open(os.path.join(sys.argv[1], "released"), "w").close()
"""


def test_a_second_builder_of_the_demo_data_waits_for_the_first(tmp_path):
  """Two prepare runs together: the later TFDS build failed renaming its output onto the
  earlier's (FileExistsError)."""
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
  )
  assert holder.stdout.readline().strip() == "held"
  with prepare.exclusive(str(tmp_path)):
    assert (tmp_path / "released").exists()
  assert holder.wait(timeout=60) == 0


def test_prepare_builds_under_the_lock(tmp_path, monkeypatch):
  root = tmp_path / "data"

  def fetch(raw_dir):  # the first step: another process cannot take the lock now
    with open(root / prepare.LOCK_FILE) as other:
      with pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    raise RuntimeError("stop after the check")

  monkeypatch.setattr(prepare.raw, "fetch", fetch)
  with pytest.raises(RuntimeError, match="stop after the check"):
    prepare.prepare(str(root))
  with open(root / prepare.LOCK_FILE) as other:  # released on the way out
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_either_source_reading_a_demo_dataset_builds_the_demo_data():
  """Only the JFT-style source decided: a run that replaced it (cifar10) and kept the
  demo's alt-text source got no build on a fresh machine and failed on the missing
  dataset; a version-less demo name was not recognised either."""
  config = tiny.get_config().data
  assert prepare.uses_demo_data(config)
  config.jft_style.tfds_name = "cifar10"
  assert prepare.uses_demo_data(config)  # the alt-text source is still coca_emoji
  config.alt_text.files = "captions-*.tfrecord"
  assert not prepare.uses_demo_data(config)
  config.jft_style.tfds_name = "coca_fashion_mnist"  # any version
  assert prepare.uses_demo_data(config)
  config.jft_style.tfds_data_dir = "/elsewhere"
  assert not prepare.uses_demo_data(config)


@pytest.mark.slow  # a subprocess: ~10 s
def test_a_process_holding_a_batch_generator_exits(repo):
  """A generator suspended over a tf.data iterator, kept in a script's global (or a
  notebook's), hung the process at interpreter exit, forever (helper-91)."""
  script = (  # whether the exit hung depended on the names and imports (the GC order)
    "import sys, time\n"
    "from configs import demo\n"
    "from coca_jax.data import loader, pipeline\n"
    "cfg = loader.resolve(demo.get_config())\n"
    "it = pipeline.batches(cfg.data, 'train', shard_index=0, num_shards=1, local_batch_size=4)\n"
    "next(it)\n"
    "print('taken', flush=True)\n"
  )
  done = subprocess.run(
    [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=60
  )
  assert done.returncode == 0 and "taken" in done.stdout, done.stderr[-2000:]
