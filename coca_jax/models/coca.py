"""The CoCa model (Yu et al. 2022, arXiv 2205.01917).

Legend: B batch, H/W image size, N image tokens, Q caption-pooler queries (256 in the
paper), T text length, D width, E joint embedding width, V vocabulary, F frames of a
video clip.

    image -> ViT -> tokens [B,N,D] -> caption pooler -> caption tokens [B,Q,D]
                                        -> contrastive pooler ("cascade": reads the
                                           caption tokens; "parallel": reads [B,N,D])
                                        -> [B,1,D] -> projection -> image embedding [B,E]
    text  -> unimodal decoder (+[CLS]) -> [CLS] -> projection -> text embedding [B,E]
          -> multimodal decoder (cross-attends caption tokens) -> logits [B,T,V]

open_clip's CoCa (pooler mode "single", configs/open_clip/) has ONE pooler:

    image -> ViT (class token) -> [B,N+1,D_v] -> pooler (Q queries) -> LN -> [B,Q,D]
             output 0 -> projection -> image embedding [B,E]; outputs 1.. -> caption
             tokens [B,Q-1,D]
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coca_jax import config as config_lib
from coca_jax.models import layers
from coca_jax.models.heads import PooledClassifier
from coca_jax.models.pooler import AttentionalPooler
from coca_jax.models.text import TextDecoder
from coca_jax.models.vit import VisionEncoder

POOLER_MODES = ("cascade", "parallel", "single")


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """[..., E] -> [..., E] of unit L2 norm over the last axis (a norm below eps divides
  by eps: a zero vector stays zero)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), eps * eps))


def log_inv_temperature_range(temperature_config) -> tuple[float, float]:
  """(log(1/max), log(1/min)): the range of `CoCa.log_inv_temperature` for
  `config.model.temperature`."""
  return float(np.log(1.0 / temperature_config.max)), float(np.log(1.0 / temperature_config.min))


class CoCa(nnx.Module):
  """Image encoder, two attentional poolers, text decoder, learnable temperature."""

  def __init__(self, model_config, *, rngs: nnx.Rngs):
    cfg = model_config
    option = functools.partial(config_lib.model_option, cfg)
    if cfg.pooler.mode not in POOLER_MODES:
      raise ValueError(f"config.model.pooler.mode={cfg.pooler.mode!r}; use one of {POOLER_MODES}")
    dtype = jnp.dtype(cfg.dtype)
    width, heads, eps = cfg.width, cfg.heads, cfg.layer_norm_eps
    vision_width = option("vision.width") or width
    pooler_heads = option("pooler.heads") or heads
    self.pooler_mode = cfg.pooler.mode
    self.vision = VisionEncoder(cfg, rngs=rngs)
    single = self.pooler_mode == "single"
    if single and cfg.pooler.caption_queries < 2:
      raise ValueError(
        f"config.model.pooler.caption_queries={cfg.pooler.caption_queries}: the single "
        "pooler needs 2 or more (query 0 is the image embedding, the rest caption tokens)"
      )
    # Zero queries make a (0, D) query parameter: no caption tokens, and the image
    # embedding a mean over no contrastive queries (NaN). open_clip_layout sets
    # contrastive_queries=0 for its single pooler.
    for key in () if single else ("contrastive_queries", "caption_queries"):
      if cfg.pooler[key] < 1:
        raise ValueError(
          f"config.model.pooler.{key}={cfg.pooler[key]}: pooler mode {cfg.pooler.mode!r} "
          'needs 1 or more (0 fits only open_clip\'s mode "single" for contrastive_queries)'
        )
    pooler = functools.partial(
      AttentionalPooler,
      width=width,
      heads=pooler_heads,
      eps=eps,
      dtype=dtype,
      rngs=rngs,
      key_bias=option("attention_key_bias"),
    )
    self.caption_pooler = pooler(
      cfg.pooler.caption_queries, input_width=vision_width, query_norm=single
    )
    self.contrastive_pooler = (
      None
      if single
      else pooler(
        cfg.pooler.contrastive_queries,
        input_width=width if self.pooler_mode == "cascade" else vision_width,
      )
    )
    self.image_projection = layers.Dense(
      width,
      cfg.embed_dim,
      ("embed", "joint"),
      dtype=dtype,
      rngs=rngs,
      use_bias=False,
      f32_output=True,
    )
    self.text = TextDecoder(cfg, rngs=rngs)
    self.text_projection = layers.Dense(
      width,
      cfg.embed_dim,
      ("embed", "joint"),
      dtype=dtype,
      rngs=rngs,
      use_bias=False,
      f32_output=True,
    )
    # Section 4.3: a new pooler + classifier over the multimodal decoder's outputs
    # (models/heads.py).
    # Absent (None) unless asked for, so pretraining models and exports are unchanged;
    # configs written before the key existed (old exports) have no `vqa` block.
    vqa = cfg.get("vqa")
    num_answers = int(vqa.num_answers) if vqa is not None else 0
    self.vqa_head = (
      PooledClassifier(width, heads, num_answers, eps=eps, dtype=dtype, rngs=rngs)
      if num_answers
      else None
    )
    # Section 4.2: a new pooler over all frames' tokens + classifier (models/heads.py);
    # absent unless config.model.video.num_classes > 0, as the VQA head.
    video = cfg.get("video")
    num_classes = int(video.num_classes) if video is not None else 0
    vision_heads = option("vision.heads") or heads
    self.video_head = (
      PooledClassifier(vision_width, vision_heads, num_classes, eps=eps, dtype=dtype, rngs=rngs)
      if num_classes
      else None
    )
    t = cfg.temperature
    if not 0 < t.min <= t.init <= t.max:
      raise ValueError(f"config.model.temperature needs 0 < min <= init <= max, got {dict(t)}")
    # Stored as log(1/tau) (CLIP's logit scale) so the optimizer moves it multiplicatively.
    self.log_inv_temperature = nnx.Param(
      jnp.asarray(np.log(1.0 / t.init), jnp.float32), out_sharding=()
    )

  def temperature(self) -> jax.Array:
    """tau = exp(-log_inv_temperature), a float32 scalar.

    Not clipped here: the optimizer keeps log_inv_temperature in
    `log_inv_temperature_range` after every update (`optim.keep_in_range`) and init
    is validated, so tau stays in [config min, config max]. A clip here would only
    bend the gradient: zero past the bound and halved on it (jnp.clip's gradient is
    0.5 where the input equals a bound), where the parameter rests once clamped.
    """
    return jnp.exp(-self.log_inv_temperature[...])

  def encode_image(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
    """image [B, H, W, 3] -> (L2-normalised image embedding [B, E] f32,
    caption tokens [B, Q, D]; Q - 1 of them with the single pooler)."""
    tokens = self.vision(image)
    caption_tokens = self.caption_pooler(tokens)
    if self.pooler_mode == "single":
      return l2_normalize(self.image_projection(caption_tokens[:, 0])), caption_tokens[:, 1:]
    pooled = self.contrastive_pooler(caption_tokens if self.pooler_mode == "cascade" else tokens)
    # With more than one contrastive query (an ablation of the paper) average them.
    image_embedding = self.image_projection(pooled.mean(axis=1))
    return l2_normalize(image_embedding), caption_tokens

  def encode_text(self, text_ids: jax.Array, text_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ids, mask [B, T] -> (L2-normalised text embedding [B, E] f32, unimodal tokens [B, T, D])."""
    text_tokens, cls = self.text.unimodal_forward(text_ids, text_mask)
    return l2_normalize(self.text_projection(cls)), text_tokens

  def caption_logits(self, unimodal_tokens, caption_tokens, text_mask) -> jax.Array:
    """Multimodal decoder: unimodal tokens [B, T, D], caption tokens [B, Q, D], text mask
    [B, T] -> next-token logits [B, T, V] float32."""
    return self.text.multimodal_forward(unimodal_tokens, caption_tokens, text_mask)

  def vqa_logits(self, image: jax.Array, question_ids, question_mask) -> jax.Array:
    """image [B,H,W,3], question ids/mask [B,T] -> answer logits [B,A] float32."""
    if self.vqa_head is None:
      raise ValueError("this model has no VQA head: set config.model.vqa.num_answers > 0")
    _, caption_tokens = self.encode_image(image)
    text_tokens, _ = self.text.unimodal_forward(question_ids, question_mask)
    hidden = self.text.multimodal_tokens(text_tokens, caption_tokens, question_mask)
    return self.vqa_head(hidden, question_mask)

  def encode_video(self, clips: jax.Array) -> jax.Array:
    """clips [B, F, H, W, 3] -> L2-normalised clip embedding [B, E] f32: the mean of the
    frames' (unit) image embeddings, normalised again (Section 4.2: zero-shot video
    classification and video-text retrieval with the frames encoded independently)."""
    batch, frames = clips.shape[:2]
    frame_embeddings, _ = self.encode_image(clips.reshape(batch * frames, *clips.shape[2:]))
    return l2_normalize(frame_embeddings.reshape(batch, frames, -1).mean(axis=1))

  def video_logits(self, clips: jax.Array) -> jax.Array:
    """clips [B, F, H, W, 3] -> class logits [B, C] float32 of the video head."""
    if self.video_head is None:
      raise ValueError("this model has no video head: set config.model.video.num_classes > 0")
    batch, frames = clips.shape[:2]
    tokens = self.vision(clips.reshape(batch * frames, *clips.shape[2:]))  # [B F, N, D]
    return self.video_head(tokens.reshape(batch, frames * tokens.shape[1], tokens.shape[2]))

  def __call__(self, batch: dict) -> dict:
    """batch: {"image": [B,H,W,3], "text": {"ids", "mask": [B,T]}} -> model outputs.

    Returns {"image_embedding": [B,E], "text_embedding": [B,E], "logits": [B,T,V],
    "temperature": scalar}, plus "vqa_logits": [B,A] with a VQA head (the text is then
    the question). A video batch {"video": [B,F,H,W,3], "label": [B]} (a model with a
    video head) gives {"video_logits": [B,C], "temperature"} only.
    """
    if "video" in batch:
      return dict(video_logits=self.video_logits(batch["video"]), temperature=self.temperature())
    mask = batch["text"]["mask"]
    image_embedding, caption_tokens = self.encode_image(batch["image"])
    text_embedding, unimodal_tokens = self.encode_text(batch["text"]["ids"], mask)
    hidden = self.text.multimodal_tokens(unimodal_tokens, caption_tokens, mask)
    outputs = dict(
      image_embedding=image_embedding,
      text_embedding=text_embedding,
      logits=self.text.vocab_logits(hidden),
      temperature=self.temperature(),
    )
    if self.vqa_head is not None:
      outputs["vqa_logits"] = self.vqa_head(hidden, mask)
    return outputs


ATTENTION_CHOICES = ("auto",) + layers.ATTENTION_IMPLEMENTATIONS


def attention_implementation(model_config, backend: str | None = None) -> str:
  """config.model.attention, with "auto" resolved for `backend` (default: jax's).

  "auto" is "cudnn" on GPUs with bfloat16 / float16 compute, "einsum" elsewhere. On an
  H200 cuDNN's training gradients were as accurate as einsum's against a float32
  reference (`benchmarks/attention_parity.py`: relative L2 error 2.4e-2 vs 1.8e-2) and
  its captions agreed (greedy 100%, beam 3 94% of tokens at random initialisation,
  bfloat16 ties); CoCa-Base's step was 1.17x faster (README, "On one GPU").
  """
  implementation = config_lib.model_option(model_config, "attention")
  if implementation not in ATTENTION_CHOICES:
    raise ValueError(f"config.model.attention={implementation!r}; use one of {ATTENTION_CHOICES}")
  low_precision = model_config.dtype in ("bfloat16", "float16")
  if implementation == "auto":
    gpu = (backend or jax.default_backend()) == "gpu"
    return "cudnn" if gpu and low_precision else "einsum"
  if implementation == "cudnn" and not low_precision:
    # cuDNN's fused attention takes fp16/bf16 inputs only; jax would fail at trace time.
    raise ValueError(
      f"config.model.attention='cudnn' needs config.model.dtype bfloat16 or float16, "
      f"not {model_config.dtype!r} (or use attention 'auto', 'xla' or 'einsum')"
    )
  return implementation


def build(model_config, seed: int = 0) -> CoCa:
  """Constructs CoCa with sharding names recorded as metadata, not applied eagerly.

  Shardings are applied by `coca_jax.sharding` from the abstract state, so the same
  constructor serves eval_shape, single-device tests and sharded initialisation.
  """
  implementation = attention_implementation(model_config)
  with nnx.use_eager_sharding(False):
    model = CoCa(model_config, rngs=nnx.Rngs(seed))
  # A kernel choice, not a parameter layout: every attention layer (encoder, poolers,
  # decoder, task heads) runs the same one.
  for _, module in nnx.iter_modules(model):
    if isinstance(module, layers.Attention):
      module.implementation = implementation
  return model
