"""Attentional pooler (Section 3.2 of the CoCa paper).

Legend: B batch, N input tokens, Q learnable queries, D width.

`Q` learnable queries attend to the input tokens in one multi-head attention layer; the
result is layer-normalised. CoCa uses two: the captioning pooler (Q = 256) feeds the
multimodal decoder, the contrastive pooler (Q = 1) gives the image embedding.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from coca_jax.models import layers


class AttentionalPooler(nnx.Module):
  """[B, N, D] tokens (optional [B, N] mask, 1 = attend) -> [B, Q, D] pooled tokens."""

  def __init__(
    self, num_queries: int, width: int, heads: int, *, eps: float, dtype, rngs: nnx.Rngs
  ):
    self.queries = layers.param(
      rngs, nnx.initializers.normal(0.02), (num_queries, width), ("queries", "embed")
    )
    self.input_norm = layers.LayerNorm(width, eps=eps, dtype=dtype, rngs=rngs)
    self.attention = layers.Attention(width, heads, dtype=dtype, rngs=rngs)
    self.norm = layers.LayerNorm(width, eps=eps, dtype=dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    batch = tokens.shape[0]
    queries = jnp.broadcast_to(
      self.queries[...].astype(self.dtype)[None], (batch, *self.queries.shape)
    )
    # mask [B, N] -> [B, 1 head, 1 query, N keys]; every row needs one token set.
    attn_mask = None if mask is None else mask.astype(bool)[:, None, None, :]
    pooled = self.attention(queries, self.input_norm(tokens), attn_mask)
    return self.norm(pooled)
