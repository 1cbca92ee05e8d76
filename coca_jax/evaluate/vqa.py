"""VQA metrics (Section 4.3 of the paper; Antol et al. 2015): soft accuracy and baselines.

Legend: N questions, A answer vocabulary.

The standard VQA accuracy. A prediction and the question's human answers are compared after
`coca_jax.data.answers.normalize_answer`, the official answer processing (case, spacing,
punctuation, number words to digits, articles dropped, missing apostrophes restored). The
credit of a prediction that k annotators gave is `coca_jax.data.answers.vqa_score`: with 10
human answers (VQA v1/v2) the official mean over the 10 leave-one-annotator-out subsets of
min(k' / 3, 1), k' the matches among the other 9 (k = 1, 2, 3, >= 4 -> 0.3, 0.6, 0.9, 1);
with any other number (the demo set has 3 or 4) the plain min(k / 3, 1), since the official
rule is defined for 10. Training targets (`answer_scores`) use the same credit.
"""

import collections
import functools
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from coca_jax import predict
from coca_jax.data.answers import answer_counts, normalize_answer, vqa_score


def answer_score(prediction: str, answers: Sequence[str]) -> float:
  """The VQA accuracy of `prediction` against one question's human `answers` (one per
  annotator), both normalised: with exactly 10 answers the official leave-one-annotator-out
  mean (1, 2, 3, >= 4 matching -> 0.3, 0.6, 0.9, 1.0), otherwise the plain
  min(#matching / 3, 1) (`coca_jax.data.answers.vqa_score`)."""
  prediction = normalize_answer(prediction)
  matches = sum(normalize_answer(a) == prediction for a in answers)
  return vqa_score(matches, len(answers))


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
  answer (blind to the image; an unseen question gets the overall majority answer)."""
  by_question = collections.defaultdict(collections.Counter)
  for question, given in zip(train_questions, train_answers):
    by_question[question].update(normalize_answer(a) for a in given)
  overall = answer_counts(train_answers).most_common(1)[0][0]
  predictions = [
    by_question[q].most_common(1)[0][0] if by_question.get(q) else overall for q in questions
  ]
  return soft_accuracy(predictions, answers)


@functools.lru_cache(maxsize=8)
def _answer_logits_fn(graphdef):
  return jax.jit(
    lambda params, images, ids, mask: nnx.merge(graphdef, params).vqa_logits(images, ids, mask)
  )


def predict_answers(predictor, images: np.ndarray, text: dict, vocabulary: Sequence[str]):
  """images [N, S, S, 3], the questions' text arrays {"ids", "mask"} [N, T] -> N answers:
  the arg-max of the model's VQA head over `vocabulary`."""
  fn = _answer_logits_fn(predictor.graphdef)
  (logits,) = predict.map_in_batches(
    lambda x, i, m: predictor._call(fn, x, i, m),
    [images, text["ids"], text["mask"]],
    predictor.batch_size,
  )
  return [vocabulary[int(k)] for k in np.argmax(np.asarray(logits), axis=-1)]


def evaluate(predictor, eval_set: dict, vocabulary, train_questions, train_answers) -> dict:
  """The model's soft accuracy on `eval_set` (coca_jax.data.vqa.eval_set) beside two
  image-blind baselines from the training answers: the majority answer, and the most
  frequent answer of each question string."""
  predictions = predict_answers(predictor, eval_set["images"], eval_set["text"], vocabulary)
  majority = answer_counts(train_answers).most_common(1)[0][0]
  return dict(
    accuracy=soft_accuracy(predictions, eval_set["answers"]),
    majority_baseline=majority_baseline(majority, eval_set["answers"]),
    question_prior_baseline=question_prior_baseline(
      train_questions, train_answers, eval_set["questions"], eval_set["answers"]
    ),
    examples=float(len(predictions)),
  )
