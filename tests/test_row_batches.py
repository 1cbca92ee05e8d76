"""VQA and video trainer batches (pipeline.row_batches): a resume at step k gives the
uninterrupted run's batches bitwise and decodes none of the k b rows it skips; a row
that does not decode is replaced by another row of its batch.

Each image is one flat colour that names its row, so a batch's pixels (after random
crops, flips, resizing and normalisation, which keep a flat image flat) say which rows
it holds, and the decoder, wrapped, says which rows were decoded.
"""

import io

import numpy as np
import pytest
from PIL import Image

from coca_jax.data import preprocess, video, vqa
from configs import demo_video, demo_vqa

pytestmark = pytest.mark.slow

# VQA: 120 rows in colours 0, 2, 4, ...: the resumed run's read-ahead (prefetch,
# parallel map) stays inside the first shuffled epoch, whose first 20 rows it skipped.
VQA_ROWS, VIDEO_ROWS, BATCH = 120, 48, 4


def png(value: int, size: int = 12) -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(out, format="PNG")
  return out.getvalue()


def row_ids(images: np.ndarray, data_config, step: int) -> list[int]:
  """[b, S, S, 3] normalised flat images -> the row each came from (its colour / step)."""
  mean, std = np.asarray(data_config.image.mean), np.asarray(data_config.image.std)
  values = (images[:, 0, 0] * std + mean) * 255
  return [int(round(v)) // step for v in values[:, 0]]


@pytest.fixture
def vqa_config(tmp_path, sentencepiece_model):
  import tensorflow as tf

  path = str(tmp_path / "vqa.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    for i in range(VQA_ROWS):
      image = b"not an image" if i == 7 else png(2 * i)
      writer.write(vqa._example(image, "what is this?", [f"answer {i % 3}"] * 3))
  config = demo_vqa.get_config()
  config.data.update(vocab_path=sentencepiece_model, shuffle_buffer=16, image_size=8)
  config.data.vqa.update(files=path, eval_files=path)
  config.model.vqa.num_answers = 3
  return config


def take(generator, n):
  return [next(generator) for _ in range(n)]


def test_vqa_resume_is_exact_and_decodes_no_skipped_row(vqa_config, monkeypatch):
  config = vqa_config
  kwargs = dict(shard_index=0, num_shards=1, local_batch_size=BATCH)
  full = take(vqa.batches(config, "train", **kwargs), 8)

  decoded = []
  check = preprocess._check

  def counting_check(encoded, text_parts):
    image, keep = check(encoded, text_parts)
    decoded.append(int(image[0, 0, 0]) // 2 if keep else -1)
    return image, keep

  monkeypatch.setattr(preprocess, "_check", counting_check)
  resumed = take(vqa.batches(config, "train", start_step=5, **kwargs), 3)
  for got, want in zip(resumed, full[5:]):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["answer_scores"], want["answer_scores"])
    for key in ("ids", "labels", "mask"):
      np.testing.assert_array_equal(got["text"][key], want["text"][key])

  skipped = {i for b in full[:5] for i in row_ids(b["image"], config.data, 2)}
  assert len(skipped) >= 19  # 20 rows skipped (one may be row 7's stand-in)
  assert decoded and not skipped & set(decoded)


def test_vqa_training_pass_reads_every_row_once(vqa_config):
  """seqio's endless read repeated before its shuffle buffer, so a pass of 120 rows drew
  some twice and missed others; now each pass is a shuffle of every row."""
  kwargs = dict(shard_index=0, num_shards=1, local_batch_size=BATCH)
  first_pass = take(vqa.batches(vqa_config, "train", **kwargs), VQA_ROWS // BATCH)
  ids = [i for b in first_pass for i in row_ids(b["image"], vqa_config.data, 2)]
  # Row 7 does not decode: its place holds a copy of another row of its batch.
  assert set(ids) == set(range(VQA_ROWS)) - {7}


def test_vqa_records_that_are_not_examples_are_skipped(vqa_config, tmp_path):
  """A record that is no Example (or has a question of two values) stopped the VQA input
  pipeline with TensorFlow's parse error at whichever step reached it."""
  import tensorflow as tf

  path = str(tmp_path / "vqa_bad.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    for i in range(8):
      writer.write(vqa._example(png(2 * i), "what is this?", ["yes"] * 3))
      if i == 3:
        writer.write(b"\xff not an Example")
  vqa_config.data.vqa.update(files=path, eval_files=path)
  kwargs = dict(shard_index=0, num_shards=1, local_batch_size=BATCH)
  batches = take(vqa.batches(vqa_config, "eval", **kwargs), 2)  # the 8 good rows, in order
  ids = [i for b in batches for i in row_ids(b["image"], vqa_config.data, 2)]
  assert ids == list(range(8))


def test_vqa_undecodable_row_replaced_within_its_batch(vqa_config):
  config = vqa_config
  batches = vqa.batches(config, "eval", shard_index=0, num_shards=1, local_batch_size=BATCH)
  second = take(batches, 2)[1]  # rows 4..7 in file order; row 7 does not decode
  ids = row_ids(second["image"], config.data, 2)
  assert ids[:3] == [4, 5, 6] and ids[3] in (4, 5, 6)
  np.testing.assert_array_equal(second["image"][3], second["image"][ids[3] - 4])


def test_video_resume_is_exact(tmp_path, sentencepiece_model):
  import tensorflow as tf

  path = str(tmp_path / "clips.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    for i in range(VIDEO_ROWS):
      writer.write(video._example([png(5 * i), png(5 * i + 1)], i % 3))
  (tmp_path / "names.txt").write_text("a\nb\nc\n")
  config = demo_video.get_config()
  config.data.update(vocab_path=sentencepiece_model, shuffle_buffer=16, image_size=8)
  config.data.video.update(files=path, class_names=str(tmp_path / "names.txt"), frames=2)
  kwargs = dict(shard_index=0, num_shards=1, local_batch_size=BATCH)
  full = take(video.batches(config, "train", **kwargs), 6)
  resumed = take(video.batches(config, "train", start_step=4, **kwargs), 2)
  for got, want in zip(resumed, full[4:]):
    np.testing.assert_array_equal(got["video"], want["video"])
    np.testing.assert_array_equal(got["label"], want["label"])
  ids = [i for b in full for i in row_ids(b["video"][:, 0], config.data, 5)]
  assert len(set(ids)) == len(ids)  # one epoch's rows, shuffled, each once
  assert ids != sorted(ids)
