"""PIL image -> RGB pixels, shared by the input pipeline and the inference API (no
TensorFlow here, so inference does not import it)."""

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> np.ndarray:
  """[H, W, 3] uint8: grey and palette to RGB, alpha composited on white."""
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, rgba)
  return np.asarray(image.convert("RGB"), np.uint8)
