"""Image-text retrieval: Recall@K in both directions over a whole split.

Legend: I images, J texts (captions; an image may have several), K cut-off.

image -> text: an image counts as retrieved at K when ANY of its captions is among the
K texts most similar to it. text -> image: a caption counts when ITS image is among the
K images most similar to it.
"""

from typing import Sequence

import numpy as np


def ranks(similarity: np.ndarray, is_match: np.ndarray):
  """similarity, is_match [Q, G] -> [Q] each of: non-matches scoring above the best
  match, non-matches scoring exactly as it, matches scoring exactly as it (>= 1 where
  the query has a match)."""
  best_match = np.max(np.where(is_match, similarity, -np.inf), axis=1, keepdims=True)
  at_best = similarity == best_match
  ahead = np.sum((similarity > best_match) & ~is_match, axis=1)
  return ahead, np.sum(at_best & ~is_match, axis=1), np.sum(at_best & is_match, axis=1)


def expected_recall(ahead: np.ndarray, tied: np.ndarray, matches: np.ndarray, k: int) -> float:
  """Recall at k with ties broken at random, in expectation: the `tied` non-matches and
  `matches` matches that share the best match's score come in a uniform order after the
  `ahead` ones, and the query is missed when the s = k - ahead slots left hold none of
  the matches: prod_{i<s} (tied - i) / (tied + matches - i). Equal scores are real on
  COCO-style sets (one caption string under two images); collapsed embeddings (every
  score equal) give chance, not 1.0 as counting only strictly higher scores did."""
  slots = np.clip(k - ahead, 0, tied + matches)
  miss = np.ones(len(ahead))
  for i in range(int(slots.max(initial=0))):
    # Where i >= slots the factor is 1; where a query has no match, every factor is 1.
    live = i < slots
    miss[live] *= (tied[live] - i) / (tied[live] + matches[live] - i)
  return float(np.mean(1 - miss))


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
  image_to_text = ranks(similarity, is_match)
  text_to_image = ranks(similarity.T, is_match.T)
  metrics = {}
  for k in ks:
    metrics[f"image_to_text_r{k}"] = expected_recall(*image_to_text, k)
    metrics[f"text_to_image_r{k}"] = expected_recall(*text_to_image, k)
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
