"""The VQA head of CoCa (Section 4.3 of the paper): classification over an answer vocabulary.

Legend: B batch, T question length, D width, A answers (config.model.vqa.num_answers).

    image -> encoder -> captioning pooler -> caption tokens
    question -> unimodal + multimodal decoder (cross-attends the caption tokens)
             -> output tokens [B, T, D] (before the vocabulary projection)
             -> NEW attentional pooler (1 query, question padding masked) -> [B, D]
             -> linear classifier -> answer logits [B, A]

The head is built only when num_answers > 0, as a new submodule of CoCa, `vqa_head`
(parameters `vqa_head/pooler/*` and `vqa_head/classifier/*`), so `config.train.init_from`
loads every pretrained parameter and initialises these fresh.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from coca_jax.models import layers
from coca_jax.models.pooler import AttentionalPooler


class VqaHead(nnx.Module):
  """multimodal decoder tokens [B, T, D], question mask [B, T] -> answer logits [B, A] f32."""

  def __init__(self, width: int, heads: int, num_answers: int, *, eps, dtype, rngs: nnx.Rngs):
    self.pooler = AttentionalPooler(1, width, heads, eps=eps, dtype=dtype, rngs=rngs)
    # Replicated over the answers (config.SHARDING_RULES `classes`).
    self.classifier = layers.Dense(
      width, num_answers, ("embed", "classes"), dtype=dtype, rngs=rngs, f32_output=True
    )

  def __call__(self, multimodal_tokens: jax.Array, mask: jax.Array) -> jax.Array:
    pooled = self.pooler(multimodal_tokens, mask)[:, 0]
    return self.classifier(pooled).astype(jnp.float32)
