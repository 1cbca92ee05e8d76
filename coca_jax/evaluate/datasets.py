"""Held-out evaluation sets as plain arrays: what every evaluator consumes.

Legend: N examples, H/W image size, C classes.

The evaluators only see these two containers; `load` is the one place that knows how
the data package provides them, so wiring a new source is a change here only.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass
class ClassificationSet:
  """images [N, H, W, 3] float32 preprocessed as in eval; labels [N] int; C class names."""

  images: np.ndarray
  labels: np.ndarray
  class_names: list[str]
  name: str = "classification"

  def take(self, n: int) -> "ClassificationSet":
    return (
      self if not n else dataclasses.replace(self, images=self.images[:n], labels=self.labels[:n])
    )


@dataclasses.dataclass
class CaptionSet:
  """images [N, H, W, 3] float32 preprocessed; captions: N lists of reference strings."""

  images: np.ndarray
  captions: list[list[str]]
  name: str = "alt_text"

  def take(self, n: int) -> "CaptionSet":
    return (
      self
      if not n
      else dataclasses.replace(self, images=self.images[:n], captions=self.captions[:n])
    )

  def flat_texts(self) -> tuple[list[str], np.ndarray]:
    """-> (all J captions, [J] index of each caption's image)."""
    texts = [c for caps in self.captions for c in caps]
    owner = np.asarray([i for i, caps in enumerate(self.captions) for _ in caps], np.int64)
    return texts, owner


@dataclasses.dataclass
class EvalSets:
  classification: ClassificationSet | None = None
  alt_text: CaptionSet | None = None


def synthetic(
  image_size: int, num_examples: int = 64, num_classes: int = 10, seed: int = 0
) -> EvalSets:
  """Random images with made-up class names and captions: for smoke tests and the
  synthetic training source (metrics near chance by construction)."""
  rng = np.random.default_rng(seed)
  names = [f"class {chr(ord('a') + c)}" for c in range(num_classes)]
  images = rng.standard_normal((num_examples, image_size, image_size, 3)).astype(np.float32)
  labels = rng.integers(0, num_classes, num_examples)
  words = ["red", "green", "blue", "smiling", "face", "cat", "dog", "flag", "heart", "star"]
  captions = [
    [" ".join(rng.choice(words, 3)) for _ in range(1 + i % 2)]  # 1 or 2 captions per image
    for i in range(num_examples)
  ]
  return EvalSets(
    classification=ClassificationSet(images, labels, names, name="synthetic_classes"),
    alt_text=CaptionSet(images, captions, name="synthetic_captions"),
  )


def load(config) -> EvalSets:
  """The configured held-out sets: Fashion-MNIST test (zero-shot, frozen features) and
  the emoji validation split (retrieval, captioning), preprocessed for the model."""
  if config.data.get("source", "") == "synthetic":
    return synthetic(config.model.vision.image_size, seed=config.data.seed)
  try:
    from coca_jax.data import eval_sets  # provided by the data pipeline
  except ImportError as e:
    raise RuntimeError(
      "evaluation needs held-out sets from coca_jax.data.eval_sets (not available: "
      f"{e}); pass `datasets=` to coca_jax.evaluate.run or set config.eval.evals=''"
    ) from e
  classification = eval_sets.classification(config)
  alt_text = eval_sets.alt_text(config)
  return EvalSets(
    classification=ClassificationSet(
      np.asarray(classification["images"], np.float32),
      np.asarray(classification["labels"]),
      list(classification["class_names"]),
      name=classification.get("name", "fashion_mnist_test"),
    ),
    alt_text=CaptionSet(
      np.asarray(alt_text["images"], np.float32),
      [list(c) for c in alt_text["captions"]],
      name=alt_text.get("name", "emoji_validation"),
    ),
  )
