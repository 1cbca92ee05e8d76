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
"""

import jax
import jax.numpy as jnp
from flax import nnx

from coca_jax import sharding
from coca_jax.models import layers


class TextDecoder(nnx.Module):
  """Token embedding, unimodal stack with [CLS], multimodal stack, vocabulary logits."""

  def __init__(self, model_config, *, rngs: nnx.Rngs):
    cfg = model_config.text
    dtype = jnp.dtype(model_config.dtype)
    width, heads, eps = model_config.width, model_config.heads, model_config.layer_norm_eps
    self.dtype = dtype
    self.max_len = cfg.max_len
    embed_init = nnx.initializers.normal(0.02)
    self.token_embedding = layers.param(
      rngs, embed_init, (cfg.vocab_size, width), ("vocab", "embed")
    )
    self.pos_embedding = layers.param(rngs, embed_init, (cfg.max_len, width), ("length", "embed"))
    self.cls_embedding = layers.param(rngs, embed_init, (width,), ("embed",))

    def block(cross_attention):
      return lambda r: layers.Block(
        width, heads, cfg.mlp_dim, cross_attention=cross_attention, eps=eps, dtype=dtype, rngs=r
      )

    self.unimodal = layers.LayerStack(
      block(False), cfg.unimodal_layers, model_config.remat_policy, rngs
    )
    self.cls_norm = layers.LayerNorm(width, eps=eps, dtype=dtype, rngs=rngs)
    self.multimodal = layers.LayerStack(
      block(True), cfg.multimodal_layers, model_config.remat_policy, rngs
    )
    self.final_norm = layers.LayerNorm(width, eps=eps, dtype=dtype, rngs=rngs)
    self.vocab_projection = layers.Dense(
      width, cfg.vocab_size, ("embed", "vocab"), dtype=dtype, rngs=rngs, f32_output=True
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
    cls = jnp.broadcast_to(self.cls_embedding[...].astype(self.dtype), (batch, 1, x.shape[-1]))
    x = jnp.concatenate([x, cls], axis=1)  # [B, T+1, D]; [CLS] at index T
    key_valid = jnp.concatenate([mask.astype(bool), jnp.ones((batch, 1), bool)], axis=1)
    attn_mask = layers.causal_mask(length + 1, length + 1) & key_valid[:, None, None, :]
    x, _ = self.unimodal(x, attn_mask)
    return x[:, :length], self.cls_norm(x[:, length])

  def multimodal_tokens(
    self, text_tokens: jax.Array, caption_tokens: jax.Array, mask: jax.Array
  ) -> jax.Array:
    """text tokens [B, T, D], caption tokens [B, Q, D], mask [B, T] -> the multimodal
    decoder's normed output tokens [B, T, D], before the vocabulary projection (what the
    VQA head pools, Section 4.3)."""
    length = text_tokens.shape[1]
    attn_mask = layers.causal_mask(length, length) & mask.astype(bool)[:, None, None, :]
    x, _ = self.multimodal(text_tokens, attn_mask, context=caption_tokens)
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

    Returns {"unimodal": c, "multimodal": c} with c = {"key", "value": [L, B, S, H, K],
    "index": 0}.
    """

    def empty(stack):
      attention = stack.layers.self_attention
      _, _, heads, head_dim = attention.key.shape
      shape = (stack.num_layers, batch, length, heads, head_dim)
      return dict(
        key=jnp.zeros(shape, self.dtype), value=jnp.zeros(shape, self.dtype), index=jnp.int32(0)
      )

    return dict(unimodal=empty(self.unimodal), multimodal=empty(self.multimodal))

  def decode_step(self, ids: jax.Array, cache: dict, cross_kv) -> tuple[jax.Array, dict]:
    """Runs new tokens through both stacks using and extending the KV caches.

    Args:
      ids: [B, t] new tokens at positions cache index .. index + t - 1.
      cache: from `init_cache` or a previous step.
      cross_kv: `multimodal.precompute_context(caption_tokens)`.
    Returns:
      (logits [B, t, V] float32, new cache).
    """
    index = cache["unimodal"]["index"]
    x = self.embed(ids, offset=index)
    cache_len = cache["unimodal"]["key"].shape[2]
    mask = layers.causal_mask(ids.shape[1], cache_len, query_offset=index)
    x, unimodal_cache = self.unimodal(x, mask, cache=cache["unimodal"])
    x, multimodal_cache = self.multimodal(x, mask, context=cross_kv, cache=cache["multimodal"])
    logits = self.vocab_projection(self.final_norm(x))
    return logits, dict(unimodal=unimodal_cache, multimodal=multimodal_cache)
