"""seqio preprocessors of the CoCa tasks: tf.data functions over example dicts.

Order inside a task: `decode_and_validate` (encoded image bytes -> uint8 RGB, bad rows
dropped and counted) -> a text maker (`jft_text` or `alt_text`) -> `tokenize_text` ->
`train_image` (random resized crop, optional flip) or `eval_image` (resize + center
crop), both ending in `normalize`. Every task therefore emits the same features:
  image              [S, S, 3] float32, (pixel / 255 - mean) / std
  text               [n] int32 SentencePiece ids (no BOS/EOS; coca_jax.tokens adds them)
  text_pretokenized  []  string
"""

import collections
import logging

import numpy as np
import seqio
import tensorflow as tf

from coca_jax.data import images

# Rows dropped by decode_and_validate, by reason, in this process. tf.data runs the
# check in its own threads; increments happen under the GIL.
BAD_DATA = collections.Counter()
UNDECODABLE, WRONG_RANK, EMPTY_TEXT = (
  "undecodable image",
  "image of wrong rank or size",
  "empty text",
)


def _check(encoded: bytes, text_parts: np.ndarray) -> tuple[np.ndarray, bool]:
  """numpy side of decode_and_validate: (image or a 1x1 placeholder, keep?)."""
  if not any(part.strip() for part in np.atleast_1d(text_parts)):
    BAD_DATA[EMPTY_TEXT] += 1
    return np.zeros((1, 1, 3), np.uint8), False
  try:
    return images.decode(encoded), True
  except images.ImageShapeError:
    BAD_DATA[WRONG_RANK] += 1
  except images.ImageError as e:
    logging.debug("dropping undecodable image: %s", e)
    BAD_DATA[UNDECODABLE] += 1
  return np.zeros((1, 1, 3), np.uint8), False


def decode_and_validate(dataset: tf.data.Dataset, text_key: str) -> tf.data.Dataset:
  """Decodes `image` (encoded bytes) to [H, W, 3] uint8 and drops rows whose image does
  not decode, is empty, or whose `text_key` (string or list of strings) is empty; the
  drops are counted in BAD_DATA. PIL decodes (through tf.numpy_function) so that bad
  bytes are a counted drop, never a crash of the input pipeline."""

  def check(example):
    image, keep = tf.numpy_function(
      _check, [example["image"], example[text_key]], [tf.uint8, tf.bool], stateful=False
    )
    image.set_shape([None, None, 3])
    keep.set_shape([])
    return {**example, "image": image, "_keep": keep}

  dataset = dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.filter(lambda example: example["_keep"])
  return dataset.map(lambda example: {k: v for k, v in example.items() if k != "_keep"})


@seqio.map_over_dataset(num_seeds=2)
def jft_text(example, seeds, templates):
  """JFT-style text (Section 4.1): the example's `label_names`, shuffled and joined with
  ", ", inside a template drawn at random: "a photo of the sneaker, footwear."."""
  names = tf.random.experimental.stateless_shuffle(example["label_names"], seed=seeds[0])
  template = tf.gather(
    tf.constant(list(templates)),
    tf.random.stateless_uniform([], seeds[1], 0, len(templates), tf.int32),
  )
  parts = tf.strings.split(template, "{}", maxsplit=1)
  text = tf.strings.join([parts[0], tf.strings.reduce_join(names, separator=", "), parts[1]])
  return {**example, "text": text}


@seqio.map_over_dataset
def alt_text(example):
  """The alt-text caption is the text."""
  return {**example, "text": tf.strings.strip(example["caption"])}


def tokenize_text(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
  """`text` -> SentencePiece ids; the string stays as `text_pretokenized`.

  (seqio.preprocessors.tokenize would run the image through a vocabulary too.)"""
  vocabulary = output_features["text"].vocabulary

  def tokenize(example):
    return {
      **example,
      "text_pretokenized": example["text"],
      "text": vocabulary.encode_tf(example["text"]),
    }

  return dataset.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)


def normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
  """[H, W, 3] in [0, 255] -> float32 (x / 255 - mean) / std: the in-graph twin of
  images.normalize for the training path, which stays in TensorFlow so that random crops
  run in tf.data's threads without the GIL."""
  return (tf.cast(image, tf.float32) / 255.0 - tf.constant(mean, tf.float32)) / tf.constant(
    std, tf.float32
  )


@seqio.map_over_dataset(num_seeds=2)
def train_image(example, seeds, size: int, mean, std, crop_area, crop_aspect, flip: bool):
  """Random resized crop (area and aspect ranges), optional horizontal flip, resize to
  [size, size], normalize."""
  image = example["image"]
  begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.shape(image),
    bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
    seed=seeds[0],
    min_object_covered=0.0,
    aspect_ratio_range=crop_aspect,
    area_range=crop_area,
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  image = tf.image.resize(tf.slice(image, begin, crop), [size, size], antialias=True)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
  return {**example, "image": normalize(tf.clip_by_value(image, 0.0, 255.0), mean, std)}


@seqio.map_over_dataset
def eval_image(example, size: int, mean, std):
  """Resize the shorter side to `size`, center crop [size, size], normalize: the same
  function (images.eval_pixels) as the inference API's, run through tf.numpy_function."""

  def pixels(rgb):
    return images.eval_pixels(rgb, size, mean, std)

  image = tf.numpy_function(pixels, [example["image"]], tf.float32, stateful=False)
  image.set_shape([size, size, 3])
  return {**example, "image": image}
