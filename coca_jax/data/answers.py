"""VQA answers: normalisation, counts, the answer vocabulary and soft targets.

Legend: N questions, A answer vocabulary.

Pure Python / NumPy (no TensorFlow): the data pipeline builds targets with it and the
evaluator (coca_jax/evaluate/vqa.py) scores predictions with the same normalisation.
A question's answers hold one string per human annotator; the VQA score of an answer is
min(#annotators who gave it / 3, 1) (Antol et al. 2015).
"""

import collections
from typing import Iterable, Sequence

import numpy as np


def normalize_answer(answer: str) -> str:
  return " ".join(answer.strip().lower().split())


def answer_counts(answers: Iterable[Sequence[str]]) -> collections.Counter:
  """How often each (normalised) answer was given, over every annotation."""
  return collections.Counter(normalize_answer(a) for question in answers for a in question)


def answer_vocabulary(answers: Iterable[Sequence[str]], size: int) -> list[str]:
  """The `size` most frequent training answers (ties: alphabetical), padded with
  never-given placeholders "<unused k>" when fewer distinct answers exist."""
  ranked = sorted(answer_counts(answers).items(), key=lambda item: (-item[1], item[0]))
  vocabulary = [answer for answer, _ in ranked[:size]]
  return vocabulary + [f"<unused {k}>" for k in range(size - len(vocabulary))]


def answer_scores(answers: Sequence[Sequence[str]], vocabulary: Sequence[str]) -> np.ndarray:
  """[N, A] float32: the VQA score of each vocabulary answer for each question (the
  training targets; answers outside the vocabulary are dropped)."""
  index = {answer: i for i, answer in enumerate(vocabulary)}
  scores = np.zeros((len(answers), len(vocabulary)), np.float32)
  for row, question in enumerate(answers):
    for answer, count in answer_counts([question]).items():
      if answer in index:
        scores[row, index[answer]] = min(count / 3.0, 1.0)
  return scores
