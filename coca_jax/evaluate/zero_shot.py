"""Zero-shot classification (Section 4.2): class names x prompt templates -> classifier.

Legend: N images, C classes, P prompt templates, E joint embedding width.

Each class is the mean of its P prompt embeddings, re-normalised (CLIP's prompt
ensemble); an image's prediction ranks the classes by cosine similarity.
"""

from typing import Callable, Sequence

import numpy as np

from coca_jax.evaluate import retrieval


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def class_embeddings(
  embed_texts: Callable[[list[str]], np.ndarray],
  class_names: Sequence[str],
  templates: Sequence[str],
) -> np.ndarray:
  """embed_texts: list of N strings -> [N, E] embeddings. Returns [C, E], unit norm."""
  prompts = [template.format(name) for name in class_names for template in templates]
  embeddings = np.asarray(embed_texts(prompts)).reshape(len(class_names), len(templates), -1)
  return l2_normalize(l2_normalize(embeddings).mean(axis=1))


def top_k_accuracy(
  scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
  """scores [N, C], labels [N] int -> {"top{k}": fraction whose label is among the k
  highest scores}. Ties are broken at random, in expectation (`retrieval.expected_recall`:
  collapsed embeddings score chance, not the share of class 0 as a stable sort gave). A
  label outside [0, C) or a non-finite score is an error (either had counted as a top-1
  hit)."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  bad = labels[(labels < 0) | (labels >= scores.shape[1])]
  if bad.size:
    raise ValueError(
      f"zero-shot labels {sorted(set(bad.tolist()))[:5]} outside the {scores.shape[1]} classes"
    )
  if not np.all(np.isfinite(scores)):
    raise ValueError("zero-shot: the class scores have non-finite entries (NaN embeddings?)")
  is_label = np.arange(scores.shape[1])[None, :] == labels[:, None]
  ranked = retrieval.ranks(scores, is_label)
  return {f"top{k}": retrieval.expected_recall(*ranked, k) for k in ks}


def evaluate(
  image_embeddings: np.ndarray,
  labels: np.ndarray,
  classifier: np.ndarray,
  ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
  """image_embeddings [N, E] (unit), labels [N], classifier [C, E] -> top-k accuracies."""
  return top_k_accuracy(image_embeddings @ classifier.T, labels, ks)


def evaluate_among(
  image_embeddings: np.ndarray,
  labels: np.ndarray,
  classifier: np.ndarray,
  classes: Sequence[int],
  ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
  """Zero-shot among a subset of the classes: the images labelled with one of `classes`
  (indices into C), ranked against those classes' rows of `classifier` only. Cut-offs k
  >= len(classes) are left out (always 1)."""
  classes = np.asarray(classes)
  rows = np.isin(labels, classes)
  if not rows.any():
    raise ValueError(f"no image of classes {classes.tolist()} among {len(labels)} examples")
  position = {c: i for i, c in enumerate(classes.tolist())}
  subset_labels = np.asarray([position[int(label)] for label in np.asarray(labels)[rows]])
  scores = image_embeddings[rows] @ classifier[classes].T
  return top_k_accuracy(scores, subset_labels, [k for k in ks if k < len(classes)])


def chance(num_classes: int, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """Accuracy of a uniformly random ranking: k / C."""
  return {f"top{k}": min(k, num_classes) / num_classes for k in ks}
