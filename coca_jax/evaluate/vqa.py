"""VQA metrics (Section 4.3 of the paper; Antol et al. 2015): soft accuracy and baselines.

Legend: N questions, A answer vocabulary.

The standard VQA accuracy. A prediction and the question's human answers are compared after
`coca_jax.data.answers.normalize_answer`, the official answer processing (case, spacing,
punctuation, number words to digits, articles dropped, missing apostrophes restored). The
credit of a prediction that k annotators gave is `coca_jax.data.answers.vqa_score`: with 10
human answers (VQA v1/v2) the official mean over the 10 leave-one-annotator-out subsets of
min(k' / 3, 1), k' the matches among the other 9 (k = 1, 2, 3, >= 4 -> 0.3, 0.6, 0.9, 1);
with any other number (the demo set has 3 or 4) the plain min(k / 3, 1), since the official
rule is defined for 10, and min(k / n, 1) for n = 1 or 2 human answers. Training targets
(`answer_scores`) use the same credit.

A question without human answers (none left after the answer processing: files without
annotations, such as VQA v2 test-dev, or answers like "?" or "the") has no accuracy: the
evaluation leaves it out of the accuracy and the baselines and counts it.
"""

import collections
from typing import Iterable, Sequence

import numpy as np
from absl import logging

from coca_jax.data.answers import (
  answer_counts,
  by_frequency,
  has_answers,
  normalize_answer,
  vqa_score,
)


def answer_score(prediction: str, answers: Sequence[str]) -> float:
  """The VQA accuracy of `prediction` against one question's human `answers` (one per
  annotator), both normalised: with exactly 10 answers the official leave-one-annotator-out
  mean (1, 2, 3, >= 4 matching -> 0.3, 0.6, 0.9, 1.0), otherwise the plain
  min(#matching / min(3, #answers), 1) (`coca_jax.data.answers.vqa_score`)."""
  prediction = normalize_answer(prediction)
  if not prediction:  # nothing left to match ("?" matching a "?" is no answer)
    return 0.0
  matches = sum(normalize_answer(a) == prediction for a in answers)
  return vqa_score(matches, len(answers))


def most_frequent_answer(train_answers: Sequence[Sequence[str]]) -> str:
  """The most frequent (normalised, non-empty) training answer, ties alphabetical (the
  answer vocabulary's first); a ValueError without any."""
  ranked = by_frequency(answer_counts(train_answers))
  if not ranked:
    raise ValueError(
      f"no training answers ({len(train_answers)} training questions, none with an answer): "
      "the VQA baselines and the answer vocabulary (config.model.vqa.num_answers) come from "
      "the answers of the training files, config.data.vqa.files"
    )
  return ranked[0]


def soft_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
  """Mean over questions of `answer_score`; `answers`: each question's human answers."""
  if len(predictions) != len(answers):
    raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
  if not answers:
    return 0.0
  return float(np.mean([answer_score(p, a) for p, a in zip(predictions, answers)]))


def majority_baseline(majority_answer: str, answers: Sequence[Sequence[str]]) -> float:
  """Soft accuracy of always answering the most frequent training answer."""
  return soft_accuracy([majority_answer] * len(answers), answers)


def question_prior_baseline(
  train_questions: Sequence[str],
  train_answers: Sequence[Sequence[str]],
  questions: Sequence[str],
  answers: Sequence[Sequence[str]],
) -> float:
  """Soft accuracy of answering each question string with its most frequent training
  answer (ties alphabetical; blind to the image; an unseen question gets the overall
  majority answer)."""
  by_question = collections.defaultdict(collections.Counter)
  for question, given in zip(train_questions, train_answers):
    by_question[question].update(answer_counts([given]))
  overall = most_frequent_answer(train_answers)
  predictions = [
    by_frequency(by_question[q])[0] if by_question.get(q) else overall for q in questions
  ]
  return soft_accuracy(predictions, answers)


def predict_answers(predictor, images: np.ndarray, text: dict, vocabulary: Sequence[str]):
  """images [N, S, S, 3], the questions' text arrays {"ids", "mask"} [N, T] -> N answers:
  the arg-max of the model's VQA head over `vocabulary`."""
  logits = predictor.vqa_logits(images, text["ids"], text["mask"])
  if logits.shape[-1] != len(vocabulary):
    raise ValueError(
      f"the VQA head scores {logits.shape[-1]} answers but the answer vocabulary has "
      f"{len(vocabulary)}: both are config.model.vqa.num_answers (the model's and the data's)"
    )
  return [vocabulary[int(k)] for k in np.argmax(logits, axis=-1)]


def _subset(eval_set: dict, keep: list[int]) -> dict:
  """The rows `keep` of an eval set."""
  return dict(
    eval_set,
    images=eval_set["images"][keep],
    text={k: v[keep] for k, v in eval_set["text"].items()},
    questions=[eval_set["questions"][i] for i in keep],
    answers=[eval_set["answers"][i] for i in keep],
  )


def evaluate(predictor, eval_sets: Iterable[dict], vocabulary, train=None) -> dict:
  """The model's soft accuracy on `eval_sets` (coca_jax.data.vqa.eval_sets: the eval split
  in parts, predicted one part at a time) beside two image-blind baselines from `train`,
  the training (questions, answers): the majority answer, and the most frequent answer of
  each question string (without `train`, e.g. an export evaluated away from its training
  files, the accuracy alone, with a warning). Questions without answers (`has_answers`)
  are left out of all three (their accuracy is undefined), counted in
  `unscored_examples` and logged; `examples` counts the scored ones. A ValueError naming
  the eval files when no question has answers."""
  if not len(vocabulary):
    raise ValueError(
      "the VQA answer vocabulary is empty: the head scores the top "
      "config.model.vqa.num_answers (> 0) answers of the training files, config.data.vqa.files"
    )
  if train is None:
    logging.warning(
      "VQA eval: no training files (config.data.vqa.files): the image-blind baselines "
      "(vqa/majority_baseline, vqa/question_prior_baseline) are skipped"
    )
  else:
    train_questions, train_answers = train
    majority = most_frequent_answer(train_answers)
  predictions, questions, answers = [], [], []
  read, where = 0, "the VQA eval set"
  for part in eval_sets:
    read += len(part["answers"])
    where = part.get("source", where)
    keep = [i for i, given in enumerate(part["answers"]) if has_answers(given)]
    if not keep:
      continue
    scored = part if len(keep) == len(part["answers"]) else _subset(part, keep)
    predictions += predict_answers(predictor, scored["images"], scored["text"], vocabulary)
    questions += scored["questions"]
    answers += scored["answers"]
  why = "no human answer left after the answer processing (data/answers.normalize_answer)"
  if not answers:
    raise ValueError(
      f"{where}: none of its {read} questions read has an answer to score against "
      f"({why}): the VQA accuracy is undefined without them; files without annotations, "
      "such as VQA v2 test-dev, cannot be evaluated here"
    )
  if len(answers) < read:
    logging.warning(
      "VQA eval: %d of %d questions of %s are unscored (%s) and left out of vqa/accuracy "
      "and the baselines (vqa/unscored_examples)",
      read - len(answers),
      read,
      where,
      why,
    )
  result = dict(
    accuracy=soft_accuracy(predictions, answers),
    examples=float(len(predictions)),
    unscored_examples=float(read - len(answers)),
  )
  if train is not None:
    result["majority_baseline"] = majority_baseline(majority, answers)
    result["question_prior_baseline"] = question_prior_baseline(
      train_questions, train_answers, questions, answers
    )
  return result
