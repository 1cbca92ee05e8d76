"""Preprocessing of the CoCa data: per-example TensorFlow functions, and the seqio
preprocessors of coca_jax/data/tasks.py built from them.

Two stages, so that coca_jax/data/pipeline.py can resume without decoding what it skips:

- records (`to_records`): a source row -> {"image": encoded bytes, "text_parts": [n]
  strings (label names, or the image's captions), "kind": int32 index into KINDS}.
  Cheap: no image decode, no randomness.
- examples: `decode` (encoded bytes -> uint8 RGB, plus `keep`: False for an undecodable
  image or empty text, counted in BAD_DATA) -> text (`jft_caption` or `alt_caption`) ->
  SentencePiece ids -> pixels (`train_pixels`: random resized crop, optional flip;
  `eval_pixels`: resize + center crop), both ending in `normalize`. The random ones take
  explicit stateless seeds, so the pipeline can derive them from an example's position.

The seqio Tasks chain the same functions over the source rows (keeping the source's other
features, e.g. `label`): `decode_and_validate` (drops bad rows) -> `jft_text` or
`alt_text` -> `tokenize_text` -> `train_image` or `eval_image`, with seqio's map seeds.

Alt-text captions: every alt-text row carries `caption` as [n] strings, one image's
captions (`caption_list` makes it from either layout a source may have: `caption`, one
string or several as in a TFRecord bytes_list, or coco_captions' `captions/text`, a
sequence of them). Training draws one of the non-blank captions at random per example
(`alt_caption` with a seed): each pass over the data sees every image once, with another
of its captions, and the draw is a stateless function of the example's position, so
resumes stay exact. Evaluation takes the first caption for the text and scores generated
captions against all of them (coco_jax/data/eval_sets.py).

Every example, from a Task or from the pipeline, has the features
  image              [S, S, 3] float32, (pixel / 255 - mean) / std
  text               [n] int32 SentencePiece ids (no BOS/EOS; coca_jax.tokens adds them)
  text_pretokenized  []  string
"""

import collections
import logging
import re

import numpy as np
import seqio
import tensorflow as tf
from google.protobuf import message

from coca_jax.data import images

# Rows dropped (Tasks) or replaced (the training pipeline) because `decode` rejected
# them, and TFRecord records dropped by `parse_alt_text`, by reason, in this process.
# tf.data runs the checks in its own threads; increments happen under the GIL.
BAD_DATA = collections.Counter()
UNDECODABLE, WRONG_RANK, EMPTY_TEXT, MALFORMED = (
  "undecodable image",
  "image of wrong rank or size",
  "empty text",
  "malformed record",
)
# Calls of the numpy side of `decode` in this process (CALLS["decode"]): the expensive
# per-example work, counted so that tests can see what a resume decodes.
CALLS = collections.Counter()

# Source kinds, in the order of the records' `kind` index, and the feature of each
# source's rows that makes its text.
KINDS = ("jft_style", "alt_text")
TEXT_KEYS = {"jft_style": "label_names", "alt_text": "caption"}


# What a text may hold and still be blank, as code point ranges: Unicode white space
# (Python's \s: ASCII's, the information separators, NEL, no-break and ideographic spaces
# too) and what SentencePiece's normalisation removes: the other C0 and C1 controls and
# DEL, the format characters (soft hyphen, zero-width space and joiners, marks, Arabic
# letter mark, word joiner, invisible operators, BOM), its own word-boundary mark U+2581,
# and U+FFFD, the replacement character of mojibake alt-text. A text of these alone
# tokenized to nothing and trained as [BOS, EOS]. One table for both engines:
# Python's pattern (`is_blank`) and RE2's (TensorFlow, `alt_caption`).
_BLANK_RANGES = (
  (0x01, 0x20),
  (0x7F, 0xA0),
  (0xAD, 0xAD),
  (0x061C, 0x061C),
  (0x1680, 0x1680),
  (0x2000, 0x200F),
  (0x2028, 0x2029),
  (0x202F, 0x202F),
  (0x205F, 0x2064),
  (0x2581, 0x2581),
  (0x3000, 0x3000),
  (0xFEFF, 0xFEFF),
  (0xFFFD, 0xFFFD),
)
_BLANK = re.compile("[" + "".join(f"{chr(a)}-{chr(b)}" for a, b in _BLANK_RANGES) + "]*")
_BLANK_RE2 = "[" + "".join(f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in _BLANK_RANGES) + "]*"


def is_blank(text: bytes) -> bool:
  """Whether a text (UTF-8 bytes) holds nothing but `_BLANK` characters."""
  return bool(_BLANK.fullmatch(text.decode("utf-8", "replace")))


def _check(encoded: bytes, text_parts: np.ndarray) -> tuple[np.ndarray, bool]:
  """numpy side of `decode`: (image or a 1x1 placeholder, keep?)."""
  CALLS["decode"] += 1
  if all(is_blank(part) for part in np.atleast_1d(text_parts)):
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


def _parse_alt_text(record: bytes) -> tuple[bytes, np.ndarray, bool]:
  """numpy side of `parse_alt_text`: (image bytes, captions [n] bytes, well-formed?)."""
  try:
    feature = tf.train.Example.FromString(record).features.feature
  except message.DecodeError:  # not an Example at all
    feature = None
  if feature is not None:
    image = feature["image"] if "image" in feature else None
    caption = feature["caption"] if "caption" in feature else None
    image_ok = image is None or (
      image.WhichOneof("kind") == "bytes_list" and len(image.bytes_list.value) == 1
    )
    caption_ok = caption is None or caption.WhichOneof("kind") in (None, "bytes_list")
    if image_ok and caption_ok:  # a missing image stays b"": `decode` rejects and counts it
      encoded = image.bytes_list.value[0] if image is not None else b""
      captions = list(caption.bytes_list.value) if caption is not None else []
      return encoded, np.array(captions, dtype=object), True
  BAD_DATA[MALFORMED] += 1
  return b"", np.array([], dtype=object), False


def parse_alt_text(record: tf.Tensor) -> tuple[dict, tf.Tensor]:
  """A TFRecord record of the alt-text files -> ({"image": encoded bytes, "caption": [n]
  strings}, well-formed). Not well-formed (counted in BAD_DATA): not an Example, an
  image that is not one bytes value, captions that are not bytes. tf.io.parse_single_example
  stopped the input pipeline on such a record, naming neither file nor config key."""
  image, caption, ok = tf.numpy_function(
    _parse_alt_text, [record], [tf.string, tf.string, tf.bool], stateful=False
  )
  image.set_shape([])
  caption.set_shape([None])
  ok.set_shape([])
  return dict(image=image, caption=caption), ok


def decode(encoded: tf.Tensor, text_parts: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Encoded image bytes -> ([H, W, 3] uint8, keep): keep is False (and the image a 1x1
  placeholder) when the image does not decode, is empty, or `text_parts` (a string or
  strings) are all blank; counted in BAD_DATA. PIL decodes (through tf.numpy_function)
  so that bad bytes are a counted row, never a crash of the input pipeline."""
  image, keep = tf.numpy_function(
    _check, [encoded, text_parts], [tf.uint8, tf.bool], stateful=False
  )
  image.set_shape([None, None, 3])
  keep.set_shape([])
  return image, keep


def to_records(dataset: tf.data.Dataset, kind: str) -> tf.data.Dataset:
  """Source rows of `kind` -> records {"image", "text_parts", "kind"} (see the module
  docstring); rows of every kind then share one structure and can be mixed."""
  index, key = KINDS.index(kind), TEXT_KEYS[kind]

  def record(row):
    return {
      "image": row["image"],
      "text_parts": tf.reshape(row[key], [-1]),
      "kind": tf.constant(index, tf.int32),
    }

  return dataset.map(record, num_parallel_calls=tf.data.AUTOTUNE)


def decode_and_validate(dataset: tf.data.Dataset, text_key: str) -> tf.data.Dataset:
  """Decodes `image` (encoded bytes) to [H, W, 3] uint8 and drops the rows `decode`
  rejects (their `text_key`, a string or strings, is the text checked)."""

  def check(example):
    image, keep = decode(example["image"], example[text_key])
    return {**example, "image": image, "_keep": keep}

  dataset = dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.filter(lambda example: example["_keep"])
  return dataset.map(lambda example: {k: v for k, v in example.items() if k != "_keep"})


def jft_caption(names: tf.Tensor, seeds, templates) -> tf.Tensor:
  """JFT-style text (Section 4.1): `names` shuffled (seeds[0]) and joined with ", ",
  inside a template drawn at random (seeds[1]): "a photo of the sneaker, footwear."."""
  names = tf.random.experimental.stateless_shuffle(names, seed=seeds[0])
  template = tf.gather(
    tf.constant(list(templates)),
    tf.random.stateless_uniform([], seeds[1], 0, len(templates), tf.int32),
  )
  parts = tf.strings.split(template, "{}", maxsplit=1)
  return tf.strings.join([parts[0], tf.strings.reduce_join(names, separator=", "), parts[1]])


def alt_caption(captions: tf.Tensor, seed=None) -> tf.Tensor:
  """One image's captions ([n] strings) -> its text: the first non-blank caption, or
  with `seed` one of the non-blank captions drawn uniformly; "" when all are blank (a
  row `decode` rejects)."""
  captions = tf.strings.strip(tf.reshape(captions, [-1]))
  blank = tf.strings.regex_full_match(captions, _BLANK_RE2)
  candidates = tf.boolean_mask(captions, tf.logical_not(blank))
  count = tf.shape(candidates)[0]
  if seed is None:
    index = tf.constant(0, tf.int32)
  else:
    index = tf.random.stateless_uniform([], seed, 0, tf.maximum(count, 1), tf.int32)
  return tf.concat([candidates, [""]], 0)[index]


def caption_list(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Alt-text rows of either caption layout -> rows whose `caption` is [n] strings, the
  image's captions. The layout is read from the rows' structure: `caption` (a string or
  strings: the demo's TFDS data, TFRecords of tf.train.Examples) or `captions` holding a
  `text` sequence (TFDS coco_captions: `captions/text`, several per image; the rest of
  `captions`, e.g. caption ids, is dropped)."""
  spec = dataset.element_spec
  if "caption" in spec:
    key = "caption"
  elif isinstance(spec.get("captions"), dict) and "text" in spec["captions"]:
    key = "captions"
  else:
    raise ValueError(
      f"alt-text rows with features {sorted(spec)}: expected `caption` (a string or "
      "strings) or `captions/text` (coco_captions' layout: a sequence of strings)"
    )

  def to_list(row):
    captions = row["caption"] if key == "caption" else row["captions"]["text"]
    rest = {k: v for k, v in row.items() if k != key}
    return {**rest, "caption": tf.reshape(captions, [-1])}

  return dataset.map(to_list, num_parallel_calls=tf.data.AUTOTUNE)


def drop_labels(dataset: tf.data.Dataset, names) -> tf.data.Dataset:
  """JFT-style rows without those whose `label_names` include one of `names` (held-out
  classes: config.data.jft_style.held_out_classes)."""
  held_out = tf.constant(list(names))

  def keep(row):
    label_names = tf.reshape(row["label_names"], [-1, 1])
    return tf.logical_not(tf.reduce_any(tf.equal(label_names, held_out[None, :])))

  return dataset.filter(keep)


@seqio.map_over_dataset(num_seeds=2)
def jft_text(example, seeds, templates):
  """`text` from the example's `label_names` (jft_caption)."""
  return {**example, "text": jft_caption(example["label_names"], seeds, templates)}


@seqio.map_over_dataset(num_seeds=1)
def alt_text_train(example, seed):
  """`text`: one of the example's `caption` strings at random (alt_caption)."""
  return {**example, "text": alt_caption(example["caption"], seed)}


@seqio.map_over_dataset
def alt_text(example):
  """`text`: the example's first caption (alt_caption)."""
  return {**example, "text": alt_caption(example["caption"])}


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


def train_pixels(
  image, seeds, size: int, mean, std, crop_area, crop_aspect, flip: bool, resize: str = "bilinear"
):
  """[H, W, 3] uint8 -> [size, size, 3] float32: random resized crop (area and aspect
  ranges; seeds[0]; the crop resized with `resize`, "bilinear" or "bicubic", antialiased
  when shrinking, as PIL's filters are), optional horizontal flip (seeds[1]), normalize."""
  images.check_resize(resize)
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
  image = tf.image.resize(tf.slice(image, begin, crop), [size, size], method=resize, antialias=True)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
  return normalize(tf.clip_by_value(image, 0.0, 255.0), mean, std)


def eval_pixels(image, size: int, mean, std, resize: str = "bilinear"):
  """[H, W, 3] uint8 -> [size, size, 3] float32: resize the shorter side to `size`
  (`resize`: "bilinear" or "bicubic"), center crop, normalize: the same function
  (images.eval_pixels) as the inference API's, run through tf.numpy_function."""
  images.check_resize(resize)

  def pixels(rgb):
    return images.eval_pixels(rgb, size, mean, std, resize)

  image = tf.numpy_function(pixels, [image], tf.float32, stateful=False)
  image.set_shape([size, size, 3])
  return image


@seqio.map_over_dataset(num_seeds=2)
def train_image(example, seeds, **options):
  """`image` through train_pixels (`options`: its keyword arguments)."""
  return {**example, "image": train_pixels(example["image"], seeds, **options)}


@seqio.map_over_dataset
def eval_image(example, size: int, mean, std, resize: str = "bilinear"):
  """`image` through eval_pixels."""
  return {**example, "image": eval_pixels(example["image"], size, mean, std, resize)}
