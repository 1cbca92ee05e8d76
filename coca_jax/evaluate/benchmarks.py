"""The public benchmark recipes: zero-shot classification (ImageNet, ImageNet-V2, CIFAR)
and image-text retrieval + captioning (COCO Karpathy test, Flickr30k).

Legend: N images, C classes, J captions (all captions of all images), E embedding width.

    python -m coca_jax.evaluate --export=DIR --config=configs/eval/imagenet.py

- zero-shot: CLIP's class names x its prompt templates (coca_jax/data/benchmark_names/),
  the mean of each class's normalised prompt embeddings (evaluate/zero_shot.py); the
  split's images ranked against the C classes: "zero_shot/top1", "zero_shot/top5".
- captions: image->text Recall@K counts an image when ANY of its captions is among its K
  nearest texts, text->image counts each caption whose image is among its K nearest
  images (evaluate/retrieval.py), over all J captions as in CLIP's and open_clip's COCO
  numbers: "retrieval/image_to_text_r1", ...; with config.eval.benchmarks.captioning,
  one caption per image decoded per config.eval.decode and scored against all of the
  image's captions: "captioning/cider", "captioning/bleu4" (evaluate/captioning.py).
Counts ("examples"; "images", "texts") say how much of the split was read.
"""

import numpy as np

from coca_jax import predict
from coca_jax.data import benchmarks as data
from coca_jax.data import eval_sets
from coca_jax.evaluate import captioning, retrieval, zero_shot

NAMES = tuple(data.BENCHMARKS)


def run(predictor: predict.Predictor, config, name: str) -> dict[str, float]:
  """The recipe of benchmark `name` (a key of coca_jax.data.benchmarks.BENCHMARKS)."""
  benchmark = data.BENCHMARKS[name]
  if benchmark.kind == "classification":
    return _zero_shot(predictor, config, benchmark)
  return _captions(predictor, config, benchmark)


def _zero_shot(predictor: predict.Predictor, config, benchmark) -> dict[str, float]:
  templates = data.templates(benchmark, config.eval.benchmarks.templates)  # checked first
  embeddings, labels = [], []
  for batch in data.batches(benchmark, config):  # a missing dataset fails here, early
    embeddings.append(predictor.embed_images(batch["image"]))
    labels.append(batch["label"])
  if not labels:
    raise ValueError(f"benchmark {benchmark.name!r}: split {benchmark.split!r} has no rows")
  labels = np.concatenate(labels)
  classifier = zero_shot.class_embeddings(
    predictor.embed_texts, data.class_names(benchmark), templates
  )
  scores = zero_shot.evaluate(
    np.concatenate(embeddings), labels, classifier, config.eval.zero_shot.top_k
  )
  return dict({f"zero_shot/{k}": v for k, v in scores.items()}, examples=float(len(labels)))


def _captions(predictor: predict.Predictor, config, benchmark) -> dict[str, float]:
  caption_images = config.eval.benchmarks.captioning
  embeddings, references, predictions = [], [], []
  for batch in data.batches(benchmark, config):
    embeddings.append(predictor.embed_images(batch["image"]))
    references.extend(batch["captions"])
    if caption_images:
      # Sampled captions key each image by its row in the split, as one call would.
      predictions.extend(
        predictor.caption(batch["image"], seed=config.eval.decode.seed, first_row=len(predictions))
      )
  if not references:
    raise ValueError(f"benchmark {benchmark.name!r}: split {benchmark.split!r} has no rows")
  texts, owner = eval_sets.flat_texts(references)
  similarity = np.concatenate(embeddings) @ predictor.embed_texts(texts).T  # [N, J]
  recall = retrieval.recall_at_k(similarity, owner, config.eval.retrieval.recall_at)
  result = {f"retrieval/{k}": v for k, v in recall.items()}
  if caption_images:
    scores = captioning.score(predictions, references)
    result.update({f"captioning/{k}": v for k, v in scores.items()})
  return dict(result, images=float(len(references)), texts=float(len(texts)))


def chance(config, name: str) -> dict[str, float]:
  """Zero-shot top-k of a random ranking over the benchmark's classes (k / C); {} for
  the caption benchmarks (their chance depends on the captions read: ~K / N)."""
  benchmark = data.BENCHMARKS[name]
  if benchmark.kind != "classification":
    return {}
  classes = len(data.class_names(benchmark))
  return {
    f"zero_shot/{k}": v for k, v in zero_shot.chance(classes, config.eval.zero_shot.top_k).items()
  }
