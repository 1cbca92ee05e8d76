"""ViT image encoder: patches -> position embedding -> pre-LN blocks -> final norm.

Legend: B batch, H/W image height/width, P patch size, G patch grid side (G = H / P),
N image tokens (N = G * G), D width.

There is no class token: CoCa's attentional poolers summarise the tokens (Section 3.2).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coca_jax import sharding
from coca_jax.models import layers


def sincos_2d(grid: int, width: int) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding: [grid * grid, width] float32."""
  if width % 4:
    raise ValueError(f"config.model.width={width} must be divisible by 4 for sincos positions")
  y, x = np.mgrid[:grid, :grid]
  omega = 1.0 / 10_000 ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


# Where the learned position embedding sits in the CoCa parameter tree: the one
# parameter whose shape depends on the image size.
POS_EMBEDDING_PATH = ("vision", "pos_embedding")


def resize_pos_embedding(pos: jax.Array, new_tokens: int) -> jax.Array:
  """Bilinearly resamples a learned [G*G, D] position embedding to [new_tokens, D]
  (a square grid).

  Used when a checkpoint trained at one resolution continues at another (the paper's
  final epoch at 576px after pretraining at 288px).
  """
  new_grid = int(round(new_tokens**0.5))
  if new_grid * new_grid != new_tokens:
    raise ValueError(f"{new_tokens} position embedding rows are not a square grid")
  old_grid = int(round(pos.shape[0] ** 0.5))
  if old_grid * old_grid != pos.shape[0]:
    raise ValueError(f"position embedding of {pos.shape[0]} rows is not a square grid")
  grid = pos.reshape(old_grid, old_grid, -1)
  resized = jax.image.resize(
    grid, (new_grid, new_grid, grid.shape[-1]), "bilinear", antialias=False
  )
  return resized.reshape(new_grid * new_grid, -1)


def patchify(image: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, N, P*P*C], patches in row-major order."""
  b, h, w, c = image.shape
  x = image.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class VisionEncoder(nnx.Module):
  """[B, H, W, 3] image -> [B, N, D] tokens."""

  def __init__(self, model_config, *, rngs: nnx.Rngs):
    cfg = model_config.vision
    if cfg.image_size % cfg.patch_size:
      raise ValueError(
        f"config.model.vision.patch_size={cfg.patch_size} does not divide "
        f"image_size={cfg.image_size}"
      )
    dtype = jnp.dtype(model_config.dtype)
    width = model_config.width
    self.patch_size = cfg.patch_size
    self.grid = cfg.image_size // cfg.patch_size
    # A linear map of flattened patches: the same function as a stride-P convolution.
    self.patch_embedding = layers.Dense(
      cfg.patch_size**2 * 3, width, ("patch", "embed"), dtype=dtype, rngs=rngs
    )
    if cfg.pos_embedding == "learned":
      self.pos_embedding = layers.param(
        rngs, nnx.initializers.normal(0.02), (self.grid**2, width), ("length", "embed")
      )
    elif cfg.pos_embedding == "sincos":
      # A constant, not a parameter: it is rebuilt from the config, never checkpointed.
      self.pos_embedding = None
      self.width = width
    else:
      raise ValueError(
        f"config.model.vision.pos_embedding={cfg.pos_embedding!r}; use 'learned' or 'sincos'"
      )
    self.blocks = layers.LayerStack(
      lambda r: layers.Block(
        width,
        model_config.heads,
        cfg.mlp_dim,
        cross_attention=False,
        eps=model_config.layer_norm_eps,
        dtype=dtype,
        rngs=r,
      ),
      cfg.layers,
      model_config.remat_policy,
      rngs,
    )
    self.norm = layers.LayerNorm(width, eps=model_config.layer_norm_eps, dtype=dtype, rngs=rngs)

  def __call__(self, image: jax.Array) -> jax.Array:
    """image: [B, H, W, 3] float (normalised) -> tokens [B, N, D]."""
    expected = self.grid * self.patch_size
    if image.shape[1:3] != (expected, expected):
      raise ValueError(f"image of shape {image.shape} does not match config image_size={expected}")
    x = self.patch_embedding(patchify(image, self.patch_size))
    if self.pos_embedding is None:
      positions = jnp.asarray(sincos_2d(self.grid, self.width))
    else:
      positions = self.pos_embedding[...]
    x = x + positions.astype(x.dtype)[None]
    x = sharding.constrain(x, ("batch", "length", "activation_embed"))
    x, _ = self.blocks(x)
    return self.norm(x)
