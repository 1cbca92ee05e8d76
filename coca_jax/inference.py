"""Inference API over an export directory.

    model = coca_jax.inference.load("/tmp/coca_demo/export")
    model.caption(["cat.png", pil_image, array], method="beam", beam_size=4)
    model.classify(["shoe.png"], ["sneaker", "boot", "shirt"])
    model.embed_images([...]), model.embed_texts(["a red heart"])

Legend: N images/texts, H/W model image size, C classes, E joint embedding width.

Images may be file paths, PIL images or arrays ([h, w], [h, w, 1|3|4], uint8 0..255 or
float 0..1). They are preprocessed like the eval split of the data pipeline: converted to
RGB (transparent pixels composited over white, greyscale replicated), shorter side
resized to the model's image size (bilinear with antialiasing, as tf.image.resize in the
pipeline), centre-cropped to a square, scaled to [0, 1], then normalised with
config.data.image.mean / std (default 0.5 / 0.5, i.e. [-1, 1]). Inputs are processed in fixed-size batches (the last one padded), so each
function compiles once.
"""

import os
from typing import NamedTuple, Sequence

import numpy as np

from coca_jax import evaluate
from coca_jax.data.images import to_rgb
from coca_jax.evaluate import encoders, zero_shot

DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


class ImageError(ValueError):
  """An input image that is missing or cannot be decoded; the message names it."""


def read_image(item) -> np.ndarray:
  """A path, PIL image or array -> [h, w, 3] uint8 RGB. Raises ImageError naming the path."""
  from PIL import Image, UnidentifiedImageError

  if isinstance(item, (str, os.PathLike)):
    path = os.fspath(item)
    if not os.path.exists(path):
      raise ImageError(f"{path}: no such file")
    try:
      with Image.open(path) as image:
        return read_image(image.copy())
    except (UnidentifiedImageError, OSError) as e:
      raise ImageError(f"{path}: not a readable image ({e})") from e
  if isinstance(item, Image.Image):
    return to_rgb(item)
  array = np.asarray(item)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise ImageError(f"array of shape {array.shape} is not an image ([h, w] or [h, w, 1|3|4])")
  if array.dtype != np.uint8:
    array = np.round(np.clip(array.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
  return read_image(Image.fromarray(array))


def preprocess(
  image_uint8: np.ndarray, image_size: int, mean=DEFAULT_MEAN, std=DEFAULT_STD
) -> np.ndarray:
  """[h, w, 3] uint8 -> [image_size, image_size, 3] float32: resize the shorter side,
  centre crop, scale to [0, 1], normalise per channel."""
  from PIL import Image

  image = Image.fromarray(image_uint8)
  scale = image_size / min(image.size)
  width, height = (
    max(image_size, round(image.size[0] * scale)),
    max(image_size, round(image.size[1] * scale)),
  )
  image = image.resize((width, height), Image.BILINEAR)
  left, top = (width - image_size) // 2, (height - image_size) // 2
  image = image.crop((left, top, left + image_size, top + image_size))
  pixels = np.asarray(image, np.float32) / 255.0
  return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


class Classification(NamedTuple):
  """labels: the best class name per image; probabilities: [N, C] float32."""

  labels: list[str]
  probabilities: np.ndarray


class Model:
  """A loaded CoCa with numpy/PIL in and out. Build it with `load(export_dir)`."""

  def __init__(self, model, config, vocab, batch_size: int = 32):
    self.module = model  # the CoCa nnx.Module
    self.config = config
    self.vocab = vocab
    self.image_size = config.model.vision.image_size
    self.max_text_len = config.model.text.max_len
    image_config = config.data.get("image", {})
    self.mean = tuple(image_config.get("mean", DEFAULT_MEAN))
    self.std = tuple(image_config.get("std", DEFAULT_STD))
    self.temperature = float(model.temperature())
    self._encoders = encoders.Encoders(model, batch_size)

  def read_images(
    self, images: Sequence, errors: str = "raise"
  ) -> tuple[np.ndarray, dict[int, str]]:
    """Reads and preprocesses images -> ([n_ok, H, W, 3] float32, {index: error}).

    errors="raise" raises ImageError at the first bad one; "collect" skips bad ones and
    reports them by their index in `images`.
    """
    if errors not in ("raise", "collect"):
      raise ValueError(f"errors={errors!r}; use 'raise' or 'collect'")
    arrays, failures = [], {}
    for index, item in enumerate(_as_list(images)):
      try:
        arrays.append(preprocess(read_image(item), self.image_size, self.mean, self.std))
      except ImageError as e:
        if errors == "raise":
          raise
        failures[index] = str(e)
    shape = (0, self.image_size, self.image_size, 3)
    return (np.stack(arrays) if arrays else np.zeros(shape, np.float32)), failures

  def _pixels(self, images) -> np.ndarray:
    if (
      isinstance(images, np.ndarray)
      and images.ndim == 4
      and images.dtype == np.float32
      and images.shape[1:]
      == (
        self.image_size,
        self.image_size,
        3,
      )
    ):
      return images  # already preprocessed (as from read_images)
    return self.read_images(images)[0]

  def embed_images(self, images) -> np.ndarray:
    """Images -> L2-normalised embeddings [N, E] float32."""
    return self._encoders.embed_images(self._pixels(images))

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Texts -> L2-normalised embeddings [N, E] float32."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    return self._encoders.embed_texts(*encoders.tokenize(self.vocab, texts, self.max_text_len))

  def classify(
    self, images, class_names: Sequence[str], templates: Sequence[str] | None = None
  ) -> Classification:
    """Zero-shot: ranks `class_names` (through the prompt ensemble of config.eval) per image.

    Probabilities are a softmax of cosine similarities over the model's learned temperature.
    """
    if not class_names:
      raise ValueError("classify needs at least one class name")
    templates = templates or tuple(self.config.eval.zero_shot.templates)
    classifier = zero_shot.class_embeddings(self.embed_texts, class_names, templates)
    logits = self.embed_images(images) @ classifier.T / self.temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return Classification(
      [class_names[i] for i in probabilities.argmax(1)], probabilities.astype(np.float32)
    )

  def caption(
    self,
    images,
    method: str | None = None,
    *,
    beam_size: int | None = None,
    max_length: int | None = None,
    length_penalty: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    prefix: str | Sequence[str] | None = None,
    seed: int = 0,
  ) -> list[str]:
    """Captions per image; unset options come from config.eval.decode.

    prefix: text the caption must continue (one for all images or one per image), e.g.
    a question for "VQA as a prefix"; it is not repeated in the returned text.
    """
    options = evaluate.decode_options(
      self.config,
      method=method,
      beam_size=beam_size,
      max_length=max_length,
      length_penalty=length_penalty,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
    )
    pixels = self._pixels(images)
    prefix_tokens, prefix_lengths = None, 0
    if prefix is not None:
      prefixes = [prefix] * len(pixels) if isinstance(prefix, str) else list(prefix)
      if len(prefixes) != len(pixels):
        raise ValueError(f"{len(prefixes)} prefixes for {len(pixels)} images")
      encoded = [list(self.vocab.encode(p)) for p in prefixes]
      too_long = [p for p, e in zip(prefixes, encoded) if len(e) >= options.max_length]
      if too_long:
        raise ValueError(
          f"prefix {too_long[0]!r} leaves no room within max_length={options.max_length}"
        )
      prefix_tokens = np.zeros((len(pixels), options.max_length), np.int32)
      for row, tokens in enumerate(encoded):
        prefix_tokens[row, : len(tokens)] = tokens
      prefix_lengths = np.asarray([len(e) for e in encoded])
    tokens, _ = self._encoders.caption(pixels, options, prefix=prefix_tokens, seed=seed)
    return encoders.detokenize(self.vocab, tokens, skip=prefix_lengths)


def _as_list(images) -> list:
  if isinstance(images, (str, os.PathLike)) or not isinstance(images, (list, tuple, np.ndarray)):
    return [images]
  if isinstance(images, np.ndarray) and images.ndim in (2, 3):
    return [images]
  return list(images)


def load(export_dir: str, batch_size: int = 32) -> Model:
  """Loads `<export_dir>/{params, config.json, vocab.model}` (coca_jax.export's layout).

  Errors name the missing path (params, config or vocabulary).
  """
  from coca_jax import export

  model, config = export.load_model(export_dir)
  vocab_path = os.path.join(export_dir, export.VOCAB_FILE)
  if not os.path.exists(vocab_path):
    vocab_path = config.data.get("vocab_path", "") or vocab_path
  return Model(model, config, encoders.load_vocab(vocab_path), batch_size)
