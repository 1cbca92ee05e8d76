"""The video head of CoCa (Section 4.2 of the paper): action recognition over frames.

Legend: B batch (clips), F frames per clip, N image tokens per frame, D width,
C classes (config.model.video.num_classes).

    clip [B, F, H, W, 3] -> the shared image encoder, each frame on its own
         -> frame tokens [B, F, N, D] -> space x time tokens [B, F*N, D]
         -> NEW attentional pooler (1 query) -> [B, D] -> linear classifier -> [B, C]

("we learn an additional pooler on top of the spatial and temporal feature tokens with a
softmax cross-entropy loss"). Zero-shot video classification and video-text retrieval
need no head: the clip embedding is the mean of its frame embeddings
(`CoCa.encode_video`). The head is built only when num_classes > 0, as new submodules of
CoCa (`video_head/pooler`, `video_head/classifier`), so `config.train.init_from` loads
every pretrained parameter and initialises these fresh.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from coca_jax.models import layers
from coca_jax.models.pooler import AttentionalPooler


class VideoHead(nnx.Module):
  """frame tokens [B, F, N, D] -> class logits [B, C] float32."""

  def __init__(self, width: int, heads: int, num_classes: int, *, eps, dtype, rngs: nnx.Rngs):
    self.pooler = AttentionalPooler(1, width, heads, eps=eps, dtype=dtype, rngs=rngs)
    self.classifier = layers.Dense(
      width, num_classes, ("embed", "classes"), dtype=dtype, rngs=rngs, f32_output=True
    )

  def __call__(self, frame_tokens: jax.Array) -> jax.Array:
    batch, frames, tokens, width = frame_tokens.shape
    # No time embedding: the pooler attends over the set of all frames' tokens.
    space_time = frame_tokens.reshape(batch, frames * tokens, width)
    pooled = self.pooler(space_time)[:, 0]
    return self.classifier(pooled).astype(jnp.float32)
