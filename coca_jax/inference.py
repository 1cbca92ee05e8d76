"""Inference API over an export directory.

    model = coca_jax.inference.load("/tmp/coca_demo/export")
    model.caption(["cat.png", pil_image, array], method="beam", beam_size=4)
    model.classify(["shoe.png"], ["sneaker", "boot", "shirt"])
    model.embed_images([...]), model.embed_texts(["a red heart"])
    model.embed_videos(clips)   # [B, F, H, W, 3] -> [B, E]: mean of frame embeddings

Legend: N images/texts, B clips, F frames per clip, S model image size, C classes, E joint
embedding width.

Images may be file paths, encoded bytes, PIL images or arrays ([h, w], [h, w, 1|3|4]; uint8 0..255,
uint16 0..65535, other integers 0..255, float 0..1: coca_jax.data.images.read). They go
through the evaluation transform of the input pipeline, the same function
(coca_jax/data/images.py): RGB (transparent pixels over white), shorter side resized to S
(config.data.image.resize: bilinear, or bicubic for open_clip imports), centre crop,
normalised with config.data.image.mean / std. Pixels already through it (`read_images`)
are passed with `preprocessed=True`; an array is never taken as preprocessed otherwise.
The model runs through coca_jax.predict in batches of `batch_size`; a call with fewer
images pads them to a power-of-two bucket (1, 2, 4, ...), each size compiled once.
"""

import collections
import functools
import os
import string
import warnings
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from coca_jax import predict
from coca_jax.data import images as images_lib
from coca_jax.data.images import ImageError
from coca_jax.evaluate import zero_shot

__all__ = ["Classification", "ImageError", "Model", "load"]


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
    self.mean = tuple(config.data.image.mean)
    self.std = tuple(config.data.image.std)
    # Exports written before `image.resize` existed resize bilinearly, as they did.
    self.resize = config.data.image.get("resize", "bilinear")
    self.predictor = predict.Predictor(model, config, vocab, batch_size, buckets=True)

  def read_images(
    self, images: Sequence, errors: str = "raise"
  ) -> tuple[np.ndarray, dict[int, str]]:
    """Reads and preprocesses images -> ([n_ok, S, S, 3] float32, {index: error}).

    errors="raise" raises ImageError at the first bad one; "collect" skips bad ones and
    reports them by their index in `images`.
    """
    if errors not in ("raise", "collect"):
      raise ValueError(f"errors={errors!r}; use 'raise' or 'collect'")
    arrays, failures = [], {}
    for index, item in enumerate(_as_list(images)):
      try:
        rgb = images_lib.read(item)
        arrays.append(
          images_lib.eval_pixels(rgb, self.image_size, self.mean, self.std, self.resize)
        )
      except ImageError as e:
        if errors == "raise":
          raise
        failures[index] = str(e)
    shape = (0, self.image_size, self.image_size, 3)
    return (np.stack(arrays) if arrays else np.zeros(shape, np.float32)), failures

  def _pixels(self, images, preprocessed: bool) -> np.ndarray:
    """Images -> [N, S, S, 3] float32: read and preprocessed, or with preprocessed=True
    (pixels from `read_images`) only checked to be [N, S, S, 3]."""
    if not preprocessed:
      return self.read_images(images)[0]
    pixels = np.asarray(images)
    floating = np.issubdtype(pixels.dtype, np.floating) or pixels.dtype.name == "bfloat16"
    if pixels.size and not floating:
      raise ValueError(
        f"preprocessed images are normalised float pixels (from read_images), got "
        f"{pixels.dtype}: pass raw images without preprocessed=True"
      )
    pixels = pixels.astype(np.float32)
    size = self.image_size
    if pixels.size == 0:  # no images: empty results, as for raw images
      return np.zeros((0, size, size, 3), np.float32)
    if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
      raise ValueError(
        f"preprocessed images must be [N, {size}, {size}, 3] (from read_images), got shape "
        f"{pixels.shape}"
      )
    return pixels

  def embed_images(self, images, *, preprocessed: bool = False) -> np.ndarray:
    """Images (N of them; none gives [0, E]) -> L2-normalised embeddings [N, E] float32.

    preprocessed: `images` are [N, S, S, 3] pixels from `read_images`.
    """
    return self.predictor.embed_images(self._pixels(images, preprocessed))

  def embed_videos(self, clips, *, preprocessed: bool = False) -> np.ndarray:
    """Clips [B, F, H, W, 3] (uint8 0..255 or float 0..1 frames, or a list of B lists of F
    images of any kind `embed_images` takes; with preprocessed=True, [B, F, S, S, 3]
    pixels from `read_images`) -> L2-normalised [B, E] float32: the mean of the frames'
    image embeddings, normalised (Section 4.2 of the paper: zero-shot video
    classification and video-text retrieval)."""
    if isinstance(clips, np.ndarray):
      if clips.ndim != 5 or not clips.shape[1]:
        raise ValueError(f"clips must be [B, F > 0, H, W, C], got shape {clips.shape}")
      count, frames = clips.shape[:2]
      pixels = self._pixels(clips.reshape(count * frames, *clips.shape[2:]), preprocessed)
    else:
      clips = list(clips)  # a generator, read once
      for clip in clips:  # an image array's rows would read as 2-D grey "frames"
        if not isinstance(clip, (list, tuple)) and np.ndim(clip) != 4:
          raise ValueError(
            f"each clip is a list of frames or an [F, H, W, C] array, got "
            f"{type(clip).__name__} of shape {np.shape(clip)}; one clip of frames f1, f2 "
            "is [[f1, f2]]"
          )
      frame_lists = [list(clip) for clip in clips]
      if not frame_lists:  # no clips: no embeddings, as for images
        return np.zeros((0, self.config.model.embed_dim), np.float32)
      lengths = sorted({len(clip) for clip in frame_lists})
      if len(lengths) != 1 or not lengths[0]:
        raise ValueError(f"every clip needs the same number (> 0) of frames, got {lengths}")
      count, frames = len(frame_lists), lengths[0]
      pixels = self._pixels([frame for clip in frame_lists for frame in clip], preprocessed)
    return self.predictor.embed_videos(pixels.reshape(count, frames, *pixels.shape[1:]))

  def embed_texts(self, texts: str | Sequence[str]) -> np.ndarray:
    """Texts -> L2-normalised embeddings [N, E] float32. Texts longer than the model's text
    tokens are cut to them, with one warning per call (`_embed_texts`)."""
    return self._embed_texts([texts] if isinstance(texts, str) else list(texts), stacklevel=3)

  def _embed_texts(self, texts: list[str], stacklevel: int) -> np.ndarray:
    """embed_texts, warning (at `stacklevel`, the caller's frame) about texts longer than
    the tokens a text row holds (tokens.Contract.max_tokens of config.model.text.max_len):
    tokens.tokenize cuts them, as training does, but a served prompt cut short is a
    different prompt."""
    max_len = self.predictor.max_text_len
    room = self.predictor.contract.max_tokens(max_len)
    lengths = [len(self.vocab.encode(text)) for text in texts]
    cut = [(text, n) for text, n in zip(texts, lengths) if n > room]
    if cut:
      text, n = cut[0]
      shown = text if len(text) <= 40 else text[:37] + "..."
      warnings.warn(
        f"{len(cut)} of {len(texts)} texts are longer than the model's {room} text tokens "
        f"(config.model.text.max_len={max_len}) and were cut to {room}; the first, "
        f"{shown!r}, has {n} tokens",
        stacklevel=stacklevel,
      )
    return self.predictor.embed_texts(texts)

  def class_embeddings(
    self, class_names: Sequence[str], templates: Sequence[str] | None = None
  ) -> np.ndarray:
    """The zero-shot classifier [C, E] float32 of `classify`: per class, the normalised
    mean of its prompts' normalised text embeddings (arguments as for `classify`)."""
    return self._class_embeddings(class_names, templates, stacklevel=5)

  def _class_embeddings(self, class_names, templates, stacklevel: int) -> np.ndarray:
    check_prompts(class_names, templates)
    templates = templates or tuple(self.config.eval.zero_shot.templates)
    # stacklevel: the text-length warning's frame, the public method's caller.
    embed = functools.partial(self._embed_texts, stacklevel=stacklevel)
    return zero_shot.class_embeddings(embed, class_names, templates)

  def classify(
    self,
    images,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
    *,
    preprocessed: bool = False,
    class_embeddings: np.ndarray | None = None,
  ) -> Classification:
    """Zero-shot: ranks `class_names` (through the prompt ensemble of config.eval) per image.

    Probabilities are a softmax of cosine similarities over the model's learned temperature;
    no images give no labels and probabilities [0, C]. templates: prompts with one `{}` for
    the class name (unset or empty: config.eval.zero_shot.templates). A string for
    `class_names` or `templates`, or a template without exactly one `{}`, is a ValueError
    (`check_prompts`). Prompts longer than the model's text tokens are cut, with one
    warning (as `embed_texts`). preprocessed: as for `embed_images`. class_embeddings:
    `self.class_embeddings(class_names, templates)`, computed once for images classified
    over several calls (else each call embeds every prompt again).
    """
    if class_embeddings is None:
      classifier = self._class_embeddings(class_names, templates, stacklevel=5)
    else:
      check_prompts(class_names, templates)
      classifier = np.asarray(class_embeddings, np.float32)
      want = (len(class_names), self.config.model.embed_dim)
      if classifier.shape != want:
        raise ValueError(
          f"class_embeddings of shape {classifier.shape}; {len(class_names)} class names "
          f"need {list(want)} (Model.class_embeddings)"
        )
    embeddings = self.embed_images(images, preprocessed=preprocessed)
    logits = embeddings @ classifier.T / self.predictor.temperature
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
    min_length: int | None = None,
    length_penalty: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    prefix: str | Sequence[str] | None = None,
    seed: int | None = None,
    first_row: int = 0,
    preprocessed: bool = False,
  ) -> list[str]:
    """Captions per image (none for no images); unset options come from config.eval.decode.

    method: "greedy", "beam" or "sample"; unset, the options given pick it (beam_size or
    length_penalty: beam search; temperature, top_k or top_p: sampling), else the
    config's. An option that does not apply to the method raises ValueError, a seed
    without sampling too.
    max_length: tokens of the caption at most, a prefix's included, 1 to
    config.model.text.max_len (the decoder's positions; 0: the config's); outside that
    range a ValueError.
    prefix: text the caption must continue (one for all images or one per image), e.g.
    a question for "VQA as a prefix"; it is not repeated in the returned text, and its
    tokens count in max_length and min_length.
    min_length: tokens a caption holds at least, EOS included (no stop id before them;
    0: none), up to max_length; open_clip's generate uses 5.
    seed: sampling seed (None: config.eval.decode.seed); image j samples with the keys of
    row first_row + j (give the images' position in a set captioned over several calls,
    so that the calls draw apart). preprocessed: as for `embed_images`.
    """
    capacity = self.config.model.text.max_len
    if max_length is not None and not 0 <= max_length <= capacity:
      # decode.DecodeOptions.from_config clamps it (a config's default may exceed a
      # smaller model's); an argument asked for explicitly is not silently lowered.
      raise ValueError(
        f"caption max_length={max_length} is outside what the model decodes: 1 to "
        f"{capacity} (config.model.text.max_len), or 0 for the config's"
      )
    options = self.predictor.decode_options(
      method=method,
      beam_size=beam_size,
      max_length=max_length,
      min_length=min_length,
      length_penalty=length_penalty,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
    )
    if seed is not None and options.method != "sample":
      raise ValueError(f"seed={seed} applies to sampling only; the method is {options.method!r}")
    pixels = self._pixels(images, preprocessed)
    return self.predictor.caption(pixels, options, prefix=prefix, seed=seed, first_row=first_row)


def check_prompts(class_names: Sequence[str], templates: Sequence[str] | None) -> None:
  """ValueError for what `Model.classify` would misread: a string of class names or of
  templates (iterated by character), no class names, a blank or repeated class name, or a
  template without exactly one `{}` (every class would get the same prompts, or format
  would fail)."""
  for name, value, example in (
    ("class_names", class_names, "['cat', 'dog']"),
    ("templates", templates, "['a photo of a {}.']"),
  ):
    if isinstance(value, str):
      raise ValueError(f"{name}={value!r} is a string; pass a list, e.g. {example}")
  class_names = list(class_names)  # a NumPy array's truth value is an error of its own
  if not class_names:
    raise ValueError("classify needs at least one class name")
  blank = [i for i, name in enumerate(class_names) if not str(name).strip()]
  if blank:
    raise ValueError(f"class names at positions {blank} are blank; every class needs a name")
  repeated = sorted(name for name, n in collections.Counter(class_names).items() if n > 1)
  if repeated:
    raise ValueError(
      f"class names repeated: {repeated}; each copy would get a share of its probability"
    )
  need = "it needs exactly one {} (or {0}) for the class name (literal braces: {{ }})"
  for template in templates or ():
    try:
      fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as e:  # unmatched braces
      raise ValueError(f"template {template!r} is not a format string ({e}); {need}") from e
    if fields not in ([""], ["0"]):  # filled by template.format(name)
      found = " ".join("{" + field + "}" for field in fields) or "none"
      raise ValueError(f"template {template!r} has placeholders: {found}; {need}")


def _as_list(images) -> list:
  """Images -> a list of single images. Anything with `__array__` (numpy, JAX, torch) is
  one image when [h, w] or [h, w, c], else a batch along its first axis."""
  if isinstance(images, (str, os.PathLike, Image.Image)):
    return [images]
  if isinstance(images, (list, tuple)):
    return list(images)
  if hasattr(images, "__array__"):
    array = np.asarray(images)
    return [array] if array.ndim in (0, 2, 3) else list(array)
  return [images]


def load(export_dir: str, batch_size: int = 32) -> Model:
  """Loads `<export_dir>/{params, config.json, vocab.model}` (coca_jax.export's layout).

  Errors name the missing path (params, config or vocabulary).
  """
  from jax._src import xla_bridge

  from coca_jax import console, export

  if not xla_bridge.backends_are_initialized():  # without libtpu's noise on a CPU host
    console.start_backends()
  model, config = export.load_model(export_dir)
  return Model(model, config, export.load_vocab(export_dir, config), batch_size)
