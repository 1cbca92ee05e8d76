"""Image-text retrieval: Recall@K in both directions over a whole split.

Legend: I images, J texts (captions; an image may have several), K cut-off.

image -> text: an image counts as retrieved at K when ANY of its captions is among the
K texts most similar to it. text -> image: a caption counts when ITS image is among the
K images most similar to it.
"""

from typing import Sequence

import numpy as np


def _rank_of_best_match(similarity: np.ndarray, is_match: np.ndarray) -> np.ndarray:
  """similarity, is_match [Q, G] -> [Q] 0-based rank of the best-ranked match.

  Rank = number of non-matching candidates scoring at least as high as the best match:
  ties count against the query, so collapsed embeddings (every score equal) rank last,
  not first.
  """
  best_match = np.max(np.where(is_match, similarity, -np.inf), axis=1, keepdims=True)
  return np.sum((similarity >= best_match) & ~is_match, axis=1)


def recall_at_k(
  similarity: np.ndarray, text_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
  """similarity [I, J] (image i vs text j), text_image [J] int (the image of each text).

  Returns {"image_to_text_r{k}", "text_to_image_r{k}"} in [0, 1].
  """
  num_images = similarity.shape[0]
  text_image = np.asarray(text_image)
  if not np.all(np.isfinite(similarity)):
    raise ValueError("retrieval: the similarity matrix has non-finite entries (NaN embeddings?)")
  is_match = np.arange(num_images)[:, None] == text_image[None, :]  # [I, J]
  image_rank = _rank_of_best_match(similarity, is_match)
  text_rank = _rank_of_best_match(similarity.T, is_match.T)
  metrics = {}
  for k in ks:
    metrics[f"image_to_text_r{k}"] = float(np.mean(image_rank < k))
    metrics[f"text_to_image_r{k}"] = float(np.mean(text_rank < k))
  return metrics


def chance(
  text_image: np.ndarray, num_images: int, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
  """Recall@K of a random ranking: text->image K/I; image->text the probability that K
  random texts of J include one of the image's c captions, averaged over images."""
  text_image = np.asarray(text_image)
  num_texts = len(text_image)
  captions_per_image = np.bincount(text_image, minlength=num_images)
  out = {}
  for k in ks:
    # P(no caption of the image among K draws without replacement) = prod_{t<K} (J-c-t)/(J-t)
    miss = np.ones(num_images)
    for t in range(min(k, num_texts)):
      miss *= np.clip(num_texts - captions_per_image - t, 0, None) / (num_texts - t)
    out[f"image_to_text_r{k}"] = float(np.mean(1 - miss))
    out[f"text_to_image_r{k}"] = min(k, num_images) / num_images
  return out
