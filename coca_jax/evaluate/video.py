"""Video classification metrics (Section 4.2 of the paper): zero-shot and the video head.

Legend: N clips, F frames, S image size, C classes, E joint embedding width.

Zero-shot: each clip's embedding is the mean of its frames' image embeddings
(`CoCa.encode_video`), ranked against the class names' prompt-ensemble embeddings
(evaluate/zero_shot.py, the same templates as image zero-shot). The video head (when the
model has one): the arg-max of its logits. Beside them chance, 1 / C.
"""

import numpy as np

from coca_jax import predict
from coca_jax.evaluate import zero_shot


def evaluate(predictor: predict.Predictor, eval_set: dict, templates, has_head: bool) -> dict:
  """eval_set: {"clips" [N,F,S,S,3], "labels" [N], "class_names" [C]} (data.video.eval_set)
  -> {"zero_shot/top1", "zero_shot/top5", "top1" (with a head), "chance", "examples"}."""
  names, labels = eval_set["class_names"], eval_set["labels"]
  classifier = zero_shot.class_embeddings(predictor.embed_texts, names, templates)
  ks = (1, 5) if len(names) > 5 else (1,)
  scores = zero_shot.evaluate(predictor.embed_videos(eval_set["clips"]), labels, classifier, ks)
  result = {f"zero_shot/{k}": v for k, v in scores.items()}
  if has_head:
    logits = predictor.video_logits(eval_set["clips"])
    result["top1"] = float(np.mean(np.argmax(logits, axis=-1) == labels))
  result["chance"] = 1.0 / len(names)
  result["examples"] = float(len(labels))
  return result
