"""CoCa's text decoder: unimodal layers (+[CLS]) then multimodal layers.

Legend: B batch, T text length, S cache length, D width, V vocabulary, L layers,
Q caption-pooler queries, H heads, K head width.

The first half of the decoder (unimodal layers) is a causal text-only transformer; a
learnable [CLS] embedding is appended at the END of the padded sequence, at index T, and
its output is the text embedding (Section 3.2). Padding: [CLS] attends to every token
whose `mask` is 1 and to itself, never to padding, so the text embedding does not depend
on the padded length; text tokens attend causally and never see [CLS], which comes last.
The second half (multimodal layers) runs over the T text positions only (not [CLS]),
with causal self-attention and cross-attention to the captioning pooler's outputs, and
ends in vocabulary logits from an output projection untied from the input embedding.

open_clip's layout (config options, coca_jax/config.py MODEL_OPTIONS): [CLS] gets
position T's embedding too (`cls_position`); masks follow open_clip's legacy CoCa mask
(`mask_mode="open_clip_legacy"`: computed from the ids, not `mask`; see
`unimodal_mask`); the multimodal layers are "split" blocks (layers.Block) with a causal
mask only; the vocabulary projection has no bias.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from coca_jax import config as config_lib
from coca_jax import sharding
from coca_jax.models import layers

MASK_MODES = ("paper", "open_clip_legacy")


def unimodal_mask(ids: jax.Array, mask: jax.Array, mode: str, pad_id: int) -> jax.Array:
  """Self-attention mask [B, 1, T+1, T+1] bool of the unimodal stack over T tokens and
  [CLS] at index T.

  "paper": causal; keys are the real tokens (`mask` [B, T] 1) and [CLS]. Text tokens
  never see [CLS] (it comes last); [CLS] sees every real token and itself.
  "open_clip_legacy" (open_clip's CoCa, whose [CLS] column is off by one): causal; key 0
  always, key j >= 1 iff ids[j - 1] != pad_id, for every query. So [CLS] sees the real
  tokens, the first pad after them, and itself only when ids[T - 1] is not pad;
  `mask` is not read.
  """
  batch, length = ids.shape
  if mode == "paper":
    key_valid = jnp.concatenate([mask.astype(bool), jnp.ones((batch, 1), bool)], axis=1)
  elif mode == "open_clip_legacy":
    key_valid = jnp.concatenate([jnp.ones((batch, 1), bool), ids != pad_id], axis=1)
  else:
    raise ValueError(f"config.model.text.mask_mode={mode!r}; use one of {MASK_MODES}")
  return layers.causal_mask(length + 1, length + 1) & key_valid[:, None, None, :]


def pad_one_token(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [B, S, D] and its causal self-attention mask [B, 1, S, S] with a zero token
  appended: [B, S+1, D], [B, 1, S+1, S+1]. No earlier query sees the new key (nor could
  it under a causal mask), and the new query sees only itself, so the first S outputs
  are unchanged. cuDNN's fused training kernels take only even lengths
  (`layers.dot_product_attention`): the unimodal stack's T + 1 tokens (64 + [CLS] in
  CoCa-Base) ran XLA's attention instead. CoCa-Base on an H200, one run: 184.9 -> 182.2
  ms per step (README, "On one GPU")."""
  x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
  mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 1), (0, 1)))
  return x, mask.at[..., -1, -1].set(True)


class TextDecoder(nnx.Module):
  """Token embedding, unimodal stack with [CLS], multimodal stack, vocabulary logits."""

  def __init__(self, model_config, *, rngs: nnx.Rngs):
    cfg = model_config.text
    option = functools.partial(config_lib.model_option, model_config)
    dtype = jnp.dtype(model_config.dtype)
    width, heads, eps = model_config.width, model_config.heads, model_config.layer_norm_eps
    self.dtype = dtype
    self.max_len = cfg.max_len
    self.mask_mode = option("text.mask_mode")
    if self.mask_mode not in MASK_MODES:
      raise ValueError(f"config.model.text.mask_mode={self.mask_mode!r}; use one of {MASK_MODES}")
    self.pad_id = option("text.pad_id")
    self.cls_position = option("text.cls_position")
    embed_init = nnx.initializers.normal(0.02)
    self.token_embedding = layers.param(
      rngs, embed_init, (cfg.vocab_size, width), ("vocab", "embed")
    )
    positions = cfg.max_len + 1 if self.cls_position else cfg.max_len
    self.pos_embedding = layers.param(rngs, embed_init, (positions, width), ("length", "embed"))
    self.cls_embedding = layers.param(rngs, embed_init, (width,), ("embed",))

    def block(cross_attention):
      return lambda r: layers.Block(
        width,
        heads,
        cfg.mlp_dim,
        cross_attention=cross_attention,
        eps=eps,
        dtype=dtype,
        rngs=r,
        gelu_approximate=option("gelu_approximate"),
        key_bias=option("attention_key_bias"),
        multimodal_block=option("text.multimodal_block"),
      )

    self.unimodal = layers.LayerStack(
      block(False), cfg.unimodal_layers, model_config.remat_policy, rngs, model_config.scan_layers
    )
    self.cls_norm = layers.LayerNorm(width, eps=eps, dtype=dtype, rngs=rngs)
    self.multimodal = layers.LayerStack(
      block(True), cfg.multimodal_layers, model_config.remat_policy, rngs, model_config.scan_layers
    )
    self.final_norm = layers.LayerNorm(width, eps=eps, dtype=dtype, rngs=rngs)
    self.vocab_projection = layers.Dense(
      width,
      cfg.vocab_size,
      ("embed", "vocab"),
      dtype=dtype,
      rngs=rngs,
      use_bias=option("text.vocab_bias"),
      f32_output=True,
    )

  def embed(self, ids: jax.Array, offset=0) -> jax.Array:
    """ids [B, T] int32 at positions offset.. -> [B, T, D] token + position embeddings."""
    if ids.shape[1] > self.max_len:
      raise ValueError(
        f"text of length {ids.shape[1]} exceeds config.model.text.max_len={self.max_len}"
      )
    # FSDP: gather the table's width shards before the lookup (as XLA does for matmul
    # weights); a lookup into a width-sharded table forces a full rematerialisation.
    table = sharding.constrain(self.token_embedding[...], ("vocab", "activation_embed"))
    tokens = jnp.take(table, ids, axis=0)
    positions = jax.lax.dynamic_slice_in_dim(self.pos_embedding[...], offset, ids.shape[1], 0)
    x = (tokens + positions[None]).astype(self.dtype)
    return sharding.constrain(x, ("batch", "length", "activation_embed"))

  def unimodal_forward(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ids, mask [B, T] -> (text tokens [B, T, D], normed [CLS] output [B, D])."""
    x = self.embed(ids)
    batch, length = ids.shape
    cls = self.cls_embedding[...]
    if self.cls_position:
      cls = cls + self.pos_embedding[length]
    cls = jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, x.shape[-1]))
    x = jnp.concatenate([x, cls], axis=1)  # [B, T+1, D]; [CLS] at index T
    attn_mask = unimodal_mask(ids, mask, self.mask_mode, self.pad_id)
    if (length + 1) % 2 and self.unimodal.layers.self_attention.implementation == "cudnn":
      x, attn_mask = pad_one_token(x, attn_mask)
    x = self.unimodal(x, attn_mask)
    return x[:, :length], self.cls_norm(x[:, length])

  def multimodal_mask(self, mask: jax.Array) -> jax.Array:
    """Self-attention mask of the multimodal stack, [B or 1, 1, T, T] bool, from the text
    mask [B, T]: causal over real tokens ("paper") or causal only ("open_clip_legacy")."""
    length = mask.shape[1]
    causal = layers.causal_mask(length, length)
    if self.mask_mode == "open_clip_legacy":
      return causal
    return causal & mask.astype(bool)[:, None, None, :]

  def multimodal_tokens(
    self, text_tokens: jax.Array, caption_tokens: jax.Array, mask: jax.Array
  ) -> jax.Array:
    """text tokens [B, T, D], caption tokens [B, Q, D], mask [B, T] -> the multimodal
    decoder's normed output tokens [B, T, D], before the vocabulary projection (what the
    VQA head pools, Section 4.3)."""
    x = self.multimodal(text_tokens, self.multimodal_mask(mask), context=caption_tokens)
    return self.final_norm(x)

  def vocab_logits(self, multimodal_tokens: jax.Array) -> jax.Array:
    """[B, T, D] -> logits [B, T, V] float32."""
    logits = self.vocab_projection(multimodal_tokens)
    return sharding.constrain(logits, ("batch", "length", "vocab"))

  def multimodal_forward(
    self, text_tokens: jax.Array, caption_tokens: jax.Array, mask: jax.Array
  ) -> jax.Array:
    """text tokens [B, T, D], caption tokens [B, Q, D], mask [B, T] -> logits [B, T, V] f32."""
    return self.vocab_logits(self.multimodal_tokens(text_tokens, caption_tokens, mask))

  def init_cache(self, batch: int, length: int) -> dict:
    """Empty KV caches of both stacks for decoding up to `length` tokens.

    Returns {"unimodal": c, "multimodal": c} with c = {"key", "value": a tuple of one
    [B, S, H, K] per layer, "index": 0}: per-layer buffers, so that each step updates
    each in place (a stacked [L, ...] cache was sliced and restacked, copied, every step).
    With `mask_mode="open_clip_legacy"` the unimodal cache also holds "key_valid"
    [B, S + 1] bool: may key j be attended (`unimodal_mask`: key 0 always, key j >= 1
    iff token j - 1 is not pad). Token t decides key t + 1, hence the extra slot, which
    no query reads; slots not yet written are True, and the causal mask hides them.
    """

    def empty(stack):
      attention = stack.layers.self_attention
      _, _, heads, head_dim = attention.key.shape
      layers = tuple(
        jnp.zeros((batch, length, heads, head_dim), self.dtype) for _ in range(stack.num_layers)
      )
      return dict(key=layers, value=layers, index=jnp.int32(0))

    unimodal = empty(self.unimodal)
    if self.mask_mode == "open_clip_legacy":
      unimodal["key_valid"] = jnp.ones((batch, length + 1), bool)
    return dict(unimodal=unimodal, multimodal=empty(self.multimodal))

  def decoding_layers(self, caption_tokens: jax.Array) -> dict:
    """Both stacks' layers for `decode_step`, sliced out once per decode call:
    {"unimodal", "multimodal": `LayerStack.unstack`}, the multimodal layers with their
    cross-attention keys/values of caption_tokens [B, N, D] ([B, H, N, K] each)."""
    return dict(
      unimodal=self.unimodal.unstack(), multimodal=self.multimodal.unstack(caption_tokens)
    )

  def decode_step(self, ids: jax.Array, cache: dict, decoding_layers: dict) -> tuple:
    """Runs new tokens through both stacks using and extending the KV caches.

    Args:
      ids: [B, t] new tokens at positions cache index .. index + t - 1.
      cache: from `init_cache` or a previous step.
      decoding_layers: `decoding_layers(caption_tokens)`.
    Returns:
      (logits [B, t, V] float32, new cache).
    """
    index = cache["unimodal"]["index"]
    x = self.embed(ids, offset=index)
    cache_len = cache["unimodal"]["key"][0].shape[1]
    mask = layers.causal_mask(ids.shape[1], cache_len, query_offset=index)
    unimodal_self_mask = mask
    if self.mask_mode == "open_clip_legacy":
      # `unimodal_mask` over the whole text so far: the tokens at index .. index + t - 1
      # decide keys index + 1 .. index + t; the multimodal stack stays causal only.
      key_valid = jax.lax.dynamic_update_slice_in_dim(
        cache["unimodal"]["key_valid"], ids != self.pad_id, index + 1, 1
      )
      unimodal_self_mask = mask & key_valid[:, None, None, :cache_len]
    x, unimodal_cache = self.unimodal.decode(
      x, unimodal_self_mask, cache["unimodal"], decoding_layers["unimodal"]
    )
    if self.mask_mode == "open_clip_legacy":
      unimodal_cache["key_valid"] = key_valid
    x, multimodal_cache = self.multimodal.decode(
      x, mask, cache["multimodal"], decoding_layers["multimodal"]
    )
    logits = self.vocab_projection(self.final_norm(x))
    return logits, dict(unimodal=unimodal_cache, multimodal=multimodal_cache)
