"""Images to model pixels, without TensorFlow: shared by the input pipeline's eval tasks
and the inference API, so that evaluation during training and serving see the same
pixels for the same image.

Legend: h/w an input image's size, S the model's image size.
"""

import io
import os

import numpy as np
from PIL import Image


class ImageError(ValueError):
  """An input image that is missing or cannot be decoded; the message names it."""


class ImageShapeError(ImageError):
  """Decoded, but the pixels are not [h, w] or [h, w, c] with h, w > 0."""


def to_rgb(image: Image.Image) -> np.ndarray:
  """[h, w, 3] uint8: grey and palette to RGB, alpha composited on white.

  Grey images of more than 8 bits are scaled to 8 bits first (PIL's own conversion clips
  them at 255): 16-bit ("I;16", "I;16B", ...) by 255 / 65535; 32-bit integer ("I")
  likewise when its values lie in 0..65535 (16-bit PNGs may open as "I"), else an
  ImageError; float ("F") as 0..1 when its maximum is <= 1, else as 0..255 (clipped).
  """
  if image.mode.startswith("I") or image.mode == "F":
    image = Image.fromarray(_grey_to_8bit(np.asarray(image), image.mode))
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, rgba)
  return np.asarray(image.convert("RGB"), np.uint8)


def _grey_to_8bit(pixels: np.ndarray, mode: str) -> np.ndarray:
  """A PIL "I*" or "F" image's pixels [h, w] -> [h, w] uint8 (see `to_rgb`)."""
  if mode == "F":
    peak = 1.0 if pixels.max() <= 1.0 else 255.0
    return np.round(np.clip(pixels / peak, 0.0, 1.0) * 255).astype(np.uint8)
  low, high = int(pixels.min()), int(pixels.max())
  if low < 0 or high > 65535:
    raise ImageError(f"{mode!r} image with values in [{low}, {high}]; expected 0..65535")
  return _from_16bit(pixels)


def _from_16bit(pixels: np.ndarray) -> np.ndarray:
  """Integers 0..65535 -> uint8, x / 257 rounded (65535 -> 255, 257 k -> k)."""
  return np.round(pixels.astype(np.float32) / 257.0).astype(np.uint8)


def decode(encoded: bytes) -> np.ndarray:
  """Encoded image bytes -> [h, w, 3] uint8 RGB.

  Raises ImageError for bytes PIL cannot decode, ImageShapeError for an image whose
  pixel array is not [h, w] or [h, w, c] with h, w > 0 (e.g. an empty image).
  """
  try:
    image = Image.open(io.BytesIO(encoded))
    image.load()
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb...)
    raise ImageError(f"undecodable image ({type(e).__name__}: {e})") from e
  pixels = np.asarray(image)
  if pixels.ndim not in (2, 3) or min(pixels.shape[:2]) == 0:
    raise ImageShapeError(f"image of shape {pixels.shape}")
  return to_rgb(image)


def read(item) -> np.ndarray:
  """A path, PIL image or array -> [h, w, 3] uint8 RGB. Raises ImageError naming the path.

  Arrays: [h, w] or [h, w, 1|3|4] (4: RGBA, composited on white), by dtype:
    uint8             0..255;
    uint16            0..65535 (16-bit), scaled to 8 bits (65535 -> 255);
    other integers    0..255 (e.g. int64 from np.array of a list); values outside it
                      raise ImageError naming the dtype and the range;
    float, bool       0..1, clipped.
  PIL images: see `to_rgb` (16-bit and float grey images are scaled to 8 bits).
  """
  if isinstance(item, (str, os.PathLike)):
    path = os.fspath(item)
    if not os.path.exists(path):
      raise ImageError(f"{path}: no such file")
    try:
      with open(path, "rb") as f:
        return decode(f.read())
    except (ImageError, OSError) as e:
      raise ImageError(f"{path}: not a readable image ({e})") from e
  if isinstance(item, Image.Image):
    return to_rgb(item)
  array = np.asarray(item)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise ImageError(f"array of shape {array.shape} is not an image ([h, w] or [h, w, 1|3|4])")
  if min(array.shape[:2]) == 0:
    raise ImageShapeError(f"image of shape {array.shape}")
  return to_rgb(Image.fromarray(_to_uint8(array)))


def _to_uint8(array: np.ndarray) -> np.ndarray:
  """An image array of any dtype `read` accepts -> the same shape in uint8."""
  if array.dtype == np.uint8:
    return array
  if array.dtype == np.uint16:
    return _from_16bit(array)
  if array.dtype.kind in "iu":
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 255:
      raise ImageError(
        f"{array.dtype} image array with values in [{low}, {high}]; integer arrays must be "
        "0..255 (or uint16 0..65535)"
      )
    return array.astype(np.uint8)
  if array.dtype.kind in "fb":
    return np.round(np.clip(array.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
  raise ImageError(f"{array.dtype} array is not an image (use uint8, uint16, int or float)")


def normalize(pixels: np.ndarray, mean, std) -> np.ndarray:
  """[..., 3] in [0, 255] -> float32 (x / 255 - mean) / std."""
  scaled = np.asarray(pixels, np.float32) / 255.0
  return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


RESIZE_METHODS = ("bilinear", "bicubic")


def check_resize(resize: str) -> None:
  if resize not in RESIZE_METHODS:
    raise ValueError(
      f"config.data.image.resize={resize!r}; expected one of {', '.join(RESIZE_METHODS)}"
    )


def eval_pixels(rgb: np.ndarray, size: int, mean, std, resize: str = "bilinear") -> np.ndarray:
  """The evaluation transform: [h, w, 3] uint8 -> [S, S, 3] float32 (S = size).

  The shorter side is resized to S, then the centre S x S crop is normalised. `resize`
  (config.data.image.resize):
    "bilinear"  coca_jax's own: PIL bilinear (antialiased when shrinking), the longer
                side rounded to the nearest integer, the crop's offset rounded down;
    "bicubic"   open_clip's eval transform (torchvision Resize(S, BICUBIC) on a PIL
                image + CenterCrop(S)): PIL bicubic, the longer side truncated
                (int(S * long / short)), the crop's offset round((side - S) / 2).
  """
  check_resize(resize)
  image = Image.fromarray(np.asarray(rgb, np.uint8))
  width, height = image.size
  short = min(width, height)
  if resize == "bilinear":
    width = max(size, round(width * size / short))
    height = max(size, round(height * size / short))
    image = image.resize((width, height), Image.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
  else:
    longer = int(size * max(width, height) / short)
    width, height = (size, longer) if width <= height else (longer, size)
    image = image.resize((width, height), Image.BICUBIC)
    left, top = round((width - size) / 2), round((height - size) / 2)
  image = image.crop((left, top, left + size, top + size))
  return normalize(np.asarray(image), mean, std)
