"""Video classification metrics (Section 4.2 of the paper): zero-shot and the video head.

Legend: N clips, F frames, S image size, C classes, E joint embedding width.

Zero-shot: each clip's embedding is the mean of its frames' image embeddings
(`CoCa.encode_video`), ranked against the class names' prompt-ensemble embeddings
(evaluate/zero_shot.py, the same templates as image zero-shot). The video head (when the
model has one): the arg-max of its logits. Beside them chance, 1 / C.
"""

from typing import Iterable, Sequence

import numpy as np

from coca_jax import predict
from coca_jax.evaluate import zero_shot


def evaluate(
  predictor: predict.Predictor,
  eval_sets: Iterable[dict],
  templates,
  has_head: bool,
  top_k: Sequence[int] = (1, 5),
) -> dict:
  """eval_sets: the eval split in parts (data.video.eval_sets), each {"clips"
  [n,F,S,S,3], "labels" [n], "class_names" [C]}, predicted one part at a time -> {
  "zero_shot/top{k}" for each k of top_k below C (config.eval.zero_shot.top_k; at C or
  more always 1), "top1" (with a head), "chance" (1 / C), "examples"}."""
  names, classifier = None, None
  embeddings, predicted, labels = [], [], []
  for part in eval_sets:
    if classifier is None:
      names = part["class_names"]
      classifier = zero_shot.class_embeddings(predictor.embed_texts, names, templates)
    embeddings.append(predictor.embed_videos(part["clips"]))
    if has_head:
      predicted.append(np.argmax(predictor.video_logits(part["clips"]), axis=-1))
    labels.append(part["labels"])
  labels = np.concatenate(labels)
  ks = [k for k in top_k if k < len(names)]
  scores = zero_shot.evaluate(np.concatenate(embeddings), labels, classifier, ks)
  result = {f"zero_shot/{k}": v for k, v in scores.items()}
  if has_head:
    result["top1"] = float(np.mean(np.concatenate(predicted) == labels))
  result["chance"] = 1.0 / len(names)
  result["examples"] = float(len(labels))
  return result
