"""Task heads of CoCa (Sections 4.2-4.3 of the paper): a NEW attentional pooler with one
query over a set of tokens, then a linear classifier.

Legend: B batch, M tokens, D width, C classes.

- VQA (4.3), `CoCa.vqa_head`: over the multimodal decoder's output tokens of the
  question (before the vocabulary projection; the question's padding masked), C =
  config.model.vqa.num_answers answers.
- Video (4.2), `CoCa.video_head`: over the image encoder's tokens of every frame of a
  clip, [B, F*N, D] (no time embedding: the pooler attends over the set of all frames'
  tokens; "we learn an additional pooler on top of the spatial and temporal feature
  tokens"), C = config.model.video.num_classes actions. Zero-shot video classification
  and retrieval need no head (`CoCa.encode_video`).
- The frozen-feature probe (4.2, `evaluate/frozen.py`): over the frozen image encoder's
  tokens, trained on its own.

The model's heads exist only when their class count is > 0, as new submodules
(`vqa_head/pooler/*`, `vqa_head/classifier/*`, likewise `video_head`), so that
`config.train.init_from` loads every pretrained parameter and initialises them fresh.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from coca_jax.models import layers
from coca_jax.models.pooler import AttentionalPooler


class PooledClassifier(nnx.Module):
  """tokens [B, M, D] (optional mask [B, M], 1 = attend) -> class logits [B, C] float32."""

  def __init__(self, width: int, heads: int, num_classes: int, *, eps, dtype, rngs: nnx.Rngs):
    self.pooler = AttentionalPooler(1, width, heads, eps=eps, dtype=dtype, rngs=rngs)
    # Replicated over the classes (config.SHARDING_RULES `classes`): any count fits.
    self.classifier = layers.Dense(
      width, num_classes, ("embed", "classes"), dtype=dtype, rngs=rngs, f32_output=True
    )

  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    pooled = self.pooler(tokens, mask)[:, 0]
    return self.classifier(pooled).astype(jnp.float32)
