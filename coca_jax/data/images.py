"""Images to model pixels, without TensorFlow: shared by the input pipeline's eval tasks
and the inference API, so that evaluation during training and serving see the same
pixels for the same image.

Legend: h/w an input image's size, S the model's image size.
"""

import io
import os
import re

import numpy as np
from PIL import Image


class ImageError(ValueError):
  """An input image that is missing or cannot be decoded; the message names it."""


class ImageShapeError(ImageError):
  """Decoded, but the pixels are not [h, w] or [h, w, c] with h, w > 0."""


def to_rgb(image: Image.Image) -> np.ndarray:
  """[h, w, 3] uint8: grey and palette to RGB, alpha composited on white.

  Grey images of more than 8 bits are scaled to 8 bits first (PIL's own conversion clips
  them at 255): 16-bit ("I;16", "I;16B", ...) by 255 / 65535; 32-bit integer ("I") from a
  PGM file as 16-bit (PIL opens a PGM of more than 8 bits as "I", scaled to 0..65535,
  so a dark one must not pass for 8-bit); other "I" images as an int32 array reads when
  their values lie in 0..255, else as 16-bit when they lie in 0..65535 (16-bit PNGs may
  open as "I"), else an ImageError; float ("F") as a float array reads (0..1, clipped; a
  maximum above 1.5, a minimum below -0.5 or NaN / inf is an ImageError). Transparency
  (an alpha channel, or a PNG's transparent colour of a palette, grey or RGB image) is
  composited on white.
  """
  if image.mode.startswith("I") or image.mode == "F":
    pixels = _grey_to_8bit(np.asarray(image), image.mode, sixteen_bit=image.format == "PPM")
    image = Image.fromarray(pixels)
  if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, rgba)
  return np.asarray(image.convert("RGB"), np.uint8)


def _grey_to_8bit(pixels: np.ndarray, mode: str, sixteen_bit: bool = False) -> np.ndarray:
  """A PIL "I*" or "F" image's pixels [h, w] -> [h, w] uint8 (see `to_rgb`); sixteen_bit:
  an "I" image's values are 0..65535 whatever their range (a PGM file's)."""
  if mode == "F":
    return _from_float(pixels, "'F' image")
  low, high = int(pixels.min()), int(pixels.max())
  if low < 0 or high > 65535:
    raise ImageError(f"{mode!r} image with values in [{low}, {high}]; expected 0..65535")
  if mode == "I" and high <= 255 and not sixteen_bit:  # integer arrays' rule (`_to_uint8`)
    return pixels.astype(np.uint8)
  return _from_16bit(pixels)


def _from_16bit(pixels: np.ndarray) -> np.ndarray:
  """Integers 0..65535 -> uint8, x / 257 rounded (65535 -> 255, 257 k -> k)."""
  return np.round(pixels.astype(np.float32) / 257.0).astype(np.uint8)


# Float pixels up to this are clipped to 1 (a resampling filter's overshoot); above it they
# are taken for 0..255 values that were never divided by 255, an error. The same overshoot
# below 0 is clipped to 0; further below, they are taken for pixels already normalised
# with a mean and std (whose dark half would turn black), an error too.
_FLOAT_CLIP_LIMIT = 1.5


def _from_float(pixels: np.ndarray, what: str) -> np.ndarray:
  """Float (or bool) pixels 0..1 -> uint8, x * 255 rounded, clipped into 0..1. `what`
  names the image in errors: a maximum above _FLOAT_CLIP_LIMIT (0..255 floats), a minimum
  below 1 - _FLOAT_CLIP_LIMIT (normalised pixels) and NaN / inf are ImageErrors, not
  guessed or clipped."""
  if not np.isfinite(pixels).all():
    raise ImageError(f"{what} has NaN or infinite pixels; float pixels must be finite, 0..1")
  pixels = pixels.astype(np.float32)
  high, low = float(pixels.max()), float(pixels.min())
  if high > _FLOAT_CLIP_LIMIT:
    raise ImageError(
      f"{what} with maximum {high:g}; float pixels must be in [0, 1]: divide 0..255 values by 255"
    )
  if low < 1 - _FLOAT_CLIP_LIMIT:
    raise ImageError(
      f"{what} with minimum {low:g}; float pixels must be in [0, 1] (pixels already "
      "normalised with a mean and std are not images: the inference API takes them with "
      "preprocessed=True)"
    )
  return np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)


def decode(encoded: bytes) -> np.ndarray:
  """Encoded image bytes -> [h, w, 3] uint8 RGB.

  Raises ImageError for bytes PIL cannot decode, ImageShapeError for an image whose
  pixel array is not [h, w] or [h, w, c] with h, w > 0 (e.g. an empty image).
  """
  try:
    image = Image.open(io.BytesIO(encoded))
    image.load()
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb...)
    # PIL's message names its BytesIO ("cannot identify image file <_io.BytesIO at 0x..>").
    message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
    raise ImageError(f"undecodable image ({type(e).__name__}: {message})") from e
  return _pil_to_rgb(image)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
  """`to_rgb` after the shape check (ImageShapeError) of decoded and given PIL images; a
  mode PIL cannot convert ("La", ...) is an ImageError too, so errors="collect" skips it."""
  _check_shape(np.asarray(image).shape)
  try:
    return to_rgb(image)
  except ImageError:
    raise
  except (ValueError, OSError) as e:
    raise ImageError(f"PIL image of mode {image.mode!r} cannot be read as RGB ({e})") from e


def _check_shape(shape: tuple) -> None:
  """ImageShapeError unless `shape` is [h, w] or [h, w, c] with h, w > 0 (an empty image
  would reach the resize as a division by zero)."""
  if len(shape) not in (2, 3) or min(shape[:2]) == 0:
    raise ImageShapeError(f"image of shape {shape}")


def read(item) -> np.ndarray:
  """A path, encoded bytes (a PNG or JPEG file's contents), PIL image or array -> [h, w, 3]
  uint8 RGB. Raises ImageError naming the path.

  Arrays: [h, w] or [h, w, 1|3|4] (4: RGBA, composited on white), by dtype:
    uint8             0..255;
    uint16            0..65535 (16-bit), scaled to 8 bits (65535 -> 255);
    other integers    0..255 (e.g. int64 from np.array of a list); values outside it
                      raise ImageError naming the dtype and the range;
    float, bool       0..1, clipped (a resampling overshoot to 1.5 at most); a larger
                      maximum (0..255 floats: divide by 255) and NaN / inf raise ImageError.
  PIL images: see `to_rgb` (16-bit and float grey images are scaled to 8 bits).
  An empty image (h or w 0) raises ImageShapeError, whatever its kind.
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
  if isinstance(item, (bytes, bytearray, memoryview)):
    return decode(bytes(item))
  if isinstance(item, Image.Image):
    return _pil_to_rgb(item)
  array = np.asarray(item)
  if array.dtype == object or array.ndim == 0:
    raise ImageError(
      f"{type(item).__name__} is not an image: pass a path, encoded bytes, a PIL image or an array"
    )
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise ImageError(f"array of shape {array.shape} is not an image ([h, w] or [h, w, 1|3|4])")
  _check_shape(array.shape)
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
    return _from_float(array, f"{array.dtype} image array")
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


# Resized images of more pixels than this (S x 4096 S: strips) are resampled through
# the crop's box (see `eval_pixels`); the others whole, exactly as open_clip's transform.
MAX_RESIZED_PIXELS = 4096 * 4096


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
  source_width, source_height = image.size
  short = min(source_width, source_height)
  if resize == "bilinear":
    method = Image.BILINEAR
    width = max(size, round(source_width * size / short))
    height = max(size, round(source_height * size / short))
    left, top = (width - size) // 2, (height - size) // 2
  else:
    method = Image.BICUBIC
    longer = int(size * max(source_width, source_height) / short)
    width, height = (size, longer) if source_width <= source_height else (longer, size)
    left, top = round((width - size) / 2), round((height - size) / 2)
  if width * height <= MAX_RESIZED_PIXELS:
    image = image.resize((width, height), method).crop((left, top, left + size, top + size))
  else:
    # A strip (8000 x 1 pixels) resized whole would be S x 8000 S: 1.6 GB at S = 224.
    # Only the crop's source box is resampled: within 1/255 of resizing all of it for
    # bilinear and for smooth images; bicubic's upscaling of pixel noise differs more
    # (21/255 at worst measured), which only such strips see.
    sx, sy = source_width / width, source_height / height
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    image = image.resize((size, size), method, box=box)
  return normalize(np.asarray(image), mean, std)
