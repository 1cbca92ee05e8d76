"""Attentional pooler (Section 3.2 of the CoCa paper).

Legend: B batch, N input tokens, Q learnable queries, D width, D_in input width.

`Q` learnable queries attend to the input tokens in one multi-head attention layer; the
result is layer-normalised. CoCa uses two: the captioning pooler (Q = 256) feeds the
multimodal decoder, the contrastive pooler (Q = 1) gives the image embedding. open_clip's
CoCa uses one (pooler mode "single", coca_jax/models/coca.py): its inputs are wider than
its queries (`input_width`) and its queries are layer-normalised too (`query_norm`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from coca_jax import sharding
from coca_jax.models import layers


class AttentionalPooler(nnx.Module):
  """[B, N, D_in] tokens (optional [B, N] mask, 1 = attend) -> [B, Q, D] pooled tokens.

  input_width: D_in (default D). query_norm: LayerNorm on the queries before the
  attention (open_clip's ln_q). key_bias: see `layers.Attention`.
  """

  def __init__(
    self,
    num_queries: int,
    width: int,
    heads: int,
    *,
    eps: float,
    dtype,
    rngs: nnx.Rngs,
    input_width: int | None = None,
    query_norm: bool = False,
    key_bias: bool = False,
  ):
    input_width = input_width or width
    self.queries = layers.param(
      rngs, nnx.initializers.normal(0.02), (num_queries, width), ("queries", "embed")
    )
    self.input_norm = layers.LayerNorm(input_width, eps=eps, dtype=dtype, rngs=rngs)
    self.attention = layers.Attention(
      width, heads, dtype=dtype, rngs=rngs, kv_width=input_width, key_bias=key_bias
    )
    self.norm = layers.LayerNorm(width, eps=eps, dtype=dtype, rngs=rngs)
    self.query_norm = (
      layers.LayerNorm(width, eps=eps, dtype=dtype, rngs=rngs) if query_norm else None
    )
    self.dtype = dtype

  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    batch = tokens.shape[0]
    queries = self.queries[...].astype(self.dtype)
    if self.query_norm is not None:
      queries = self.query_norm(queries)
    queries = jnp.broadcast_to(queries[None], (batch, *self.queries.shape))
    # mask [B, N] -> [B, 1 head, 1 query, N keys]; every row needs one token set.
    attn_mask = None if mask is None else mask.astype(bool)[:, None, None, :]
    pooled = self.attention(queries, self.input_norm(tokens), attn_mask)
    return sharding.constrain(self.norm(pooled), ("batch", "queries", "activation_embed"))
