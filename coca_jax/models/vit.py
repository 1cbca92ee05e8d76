"""ViT image encoder: patches -> position embedding -> pre-LN blocks -> final norm.

Legend: B batch, H/W image height/width, P patch size, G patch grid side (G = H / P),
N image tokens (N = G * G, or G * G + 1 with a class token), D width (the ViT's:
config.model.vision.width, default config.model.width).

The paper's layout has no class token: CoCa's attentional poolers summarise the tokens
(Section 3.2). open_clip's layout (config options, coca_jax/config.py MODEL_OPTIONS)
prepends a learned class token with a position embedding of its own
(`class_pos_embedding`; the patch positions stay a G x G grid, so resampling them to
another image size works the same), norms the embedded tokens before the blocks
(`pre_norm`, open_clip's ln_pre) and leaves the output tokens un-normed (its ln_post
comes after the pooler).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coca_jax import config as config_lib
from coca_jax import sharding
from coca_jax.models import layers


def sincos_2d(grid: int, width: int) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding: [grid * grid, width] float32."""
  if width % 4:
    raise ValueError(
      f"the image encoder's width {width} (config.model.vision.width, or config.model.width "
      "where that is 0) must be divisible by 4 for sincos positions"
    )
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
    option = functools.partial(config_lib.model_option, model_config)
    if cfg.patch_size < 1 or cfg.image_size < cfg.patch_size:
      raise ValueError(
        f"config.model.vision.image_size={cfg.image_size} must be a positive multiple of "
        f"patch_size={cfg.patch_size}"
      )
    if cfg.image_size % cfg.patch_size:
      raise ValueError(
        f"config.model.vision.patch_size={cfg.patch_size} does not divide "
        f"image_size={cfg.image_size}"
      )
    dtype = jnp.dtype(model_config.dtype)
    width = option("vision.width") or model_config.width
    heads = option("vision.heads") or model_config.heads
    eps = model_config.layer_norm_eps
    self.width = width
    self.patch_size = cfg.patch_size
    self.grid = cfg.image_size // cfg.patch_size
    # A linear map of flattened patches: the same function as a stride-P convolution.
    self.patch_embedding = layers.Dense(
      cfg.patch_size**2 * 3,
      width,
      ("patch", "embed"),
      dtype=dtype,
      rngs=rngs,
      use_bias=option("vision.patch_bias"),
    )
    if cfg.pos_embedding == "learned":
      self.pos_embedding = layers.param(
        rngs, nnx.initializers.normal(0.02), (self.grid**2, width), ("length", "embed")
      )
    elif cfg.pos_embedding == "sincos":
      # A constant, not a parameter: it is rebuilt from the config, never checkpointed.
      self.pos_embedding = None
    else:
      raise ValueError(
        f"config.model.vision.pos_embedding={cfg.pos_embedding!r}; use 'learned' or 'sincos'"
      )
    if option("vision.class_token"):
      embed_init = nnx.initializers.normal(0.02)
      self.class_embedding = layers.param(rngs, embed_init, (width,), ("embed",))
      self.class_pos_embedding = layers.param(rngs, embed_init, (width,), ("embed",))
    else:
      self.class_embedding = self.class_pos_embedding = None
    self.pre_norm = (
      layers.LayerNorm(width, eps=eps, dtype=dtype, rngs=rngs)
      if option("vision.pre_norm")
      else None
    )
    self.blocks = layers.LayerStack(
      lambda r: layers.Block(
        width,
        heads,
        cfg.mlp_dim,
        cross_attention=False,
        eps=eps,
        dtype=dtype,
        rngs=r,
        gelu_approximate=option("gelu_approximate"),
        key_bias=option("attention_key_bias"),
      ),
      cfg.layers,
      model_config.remat_policy,
      rngs,
      model_config.scan_layers,
    )
    self.norm = (
      layers.LayerNorm(width, eps=eps, dtype=dtype, rngs=rngs)
      if option("vision.final_norm")
      else None
    )

  def __call__(self, image: jax.Array) -> jax.Array:
    """image: [B, H, W, 3] float (normalised) -> tokens [B, N, D] (the class token first)."""
    expected = self.grid * self.patch_size
    if image.shape[1:3] != (expected, expected):
      raise ValueError(f"image of shape {image.shape} does not match config image_size={expected}")
    x = self.patch_embedding(patchify(image, self.patch_size))
    if self.pos_embedding is None:
      positions = jnp.asarray(sincos_2d(self.grid, self.width))
    else:
      positions = self.pos_embedding[...]
    x = x + positions.astype(x.dtype)[None]
    if self.class_embedding is not None:
      cls = (self.class_embedding[...] + self.class_pos_embedding[...]).astype(x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    x = sharding.constrain(x, ("batch", "length", "activation_embed"))
    x = self.blocks(x)
    return x if self.norm is None else self.norm(x)
