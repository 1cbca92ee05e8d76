"""VQA answers: normalisation, counts, the answer vocabulary and soft targets.

Legend: N questions, A answer vocabulary.

Pure Python / NumPy (no TensorFlow): the data pipeline builds targets with it and the
evaluator (coca_jax/evaluate/vqa.py) scores predictions with the same normalisation and the
same credit, so a training target is exactly the credit the metric would give that answer.

A question's answers hold one string per human annotator. Strings are compared after
`normalize_answer` (the answer processing of the VQA evaluation, Antol et al. 2015). The
credit of an answer that k of the n annotators gave (`vqa_score`): with n = 10, as in VQA
v1/v2, the official mean over the 10 leave-one-annotator-out subsets of min(matches among
the other 9 / 3, 1), i.e. 0, 0.3, 0.6, 0.9, 1 for k = 0, 1, 2, 3, >= 4; with any other n
(the demo set has 3 or 4) the plain min(k / 3, 1), as the official rule is defined for 10;
with n = 1 or 2, min(k / n, 1) (a correct single reference is full credit).
"""

import collections
import itertools
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

# Characters the VQA evaluation strips or turns into spaces. Periods are handled apart (kept
# before a digit: "2.5"); apostrophes, colons, "&", "%", "$", "#", "*" and the like are kept.
PUNCTUATION = ';/[]{}()<>=+-_\\"`@,?!'
NUMBER_WORDS = {
  "none": "0",  # the official map counts "none" as zero too
  "zero": "0",
  "one": "1",
  "two": "2",
  "three": "3",
  "four": "4",
  "five": "5",
  "six": "6",
  "seven": "7",
  "eight": "8",
  "nine": "9",
  "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# Common English contractions; an answer word spelt without (some of) its apostrophes is
# restored to one of these. Left out: those whose bare spelling is an everyday word of its
# own ("its", "ill", "id", "hell", "shell", "shed", "wed", "well", "were", "lets", "whore"),
# which annotators mean as that word.
CONTRACTIONS = (
  "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
  "hasn't haven't he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've "
  "it'll ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock "
  "oughtn't shan't she'd've she's should've shouldn't shouldn't've somebody'd "
  "somebody'll somebody's someone'd someone'll someone's something'd something'll "
  "something's that'd that'll that's there'd there'd've there'll there're there's they'd "
  "they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll "
  "what're what's what've when's where'd where's where've who'd who'd've who'll who's "
  "who've why'd why'll why're why's won't would've wouldn't wouldn't've y'all "
  "you'd you'd've you'll you're you've"
).split()
# A comma between digits ("1,000") makes every stripped character go without a space.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
LEAVE_ONE_OUT_ANSWERS = 10  # VQA v1/v2 collect 10 answers per question (Antol et al. 2015)


def _apostrophe_dropped_spellings(word: str) -> list[str]:
  """Every spelling of `word` with one or more of its apostrophes left out:
  "couldn't've" -> ["couldntve", "couldnt've", "couldn'tve"]."""
  first, *rest = word.split("'")
  spellings = (
    first + "".join(mark + piece for mark, piece in zip(marks, rest))
    for marks in itertools.product(("", "'"), repeat=len(rest))
  )
  return [s for s in spellings if s != word]


# Annotators often drop some or all of a contraction's apostrophes ("dont", "couldnt've"):
# every such spelling maps to the full one.
MISSING_APOSTROPHES = {
  spelling: word for word in CONTRACTIONS for spelling in _apostrophe_dropped_spellings(word)
}


def _strip_punctuation(text: str) -> str:
  """The VQA evaluation's punctuation rule: a PUNCTUATION character is deleted when it
  touches a space anywhere in `text` or `text` has a digit-comma-digit ("1,000" -> "1000"),
  otherwise replaced by a space ("black-and-white" -> "black and white"); a period is
  deleted unless a digit follows it ("yes." -> "yes", "2.5" unchanged)."""
  joined = bool(_DIGIT_COMMA_DIGIT.search(text))
  out = text
  for p in PUNCTUATION:
    touches_space = f"{p} " in text or f" {p}" in text
    out = out.replace(p, "" if touches_space or joined else " ")
  return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _normalize_word(word: str) -> str:
  """One lower-case word: number words to digits, then missing apostrophes restored."""
  word = NUMBER_WORDS.get(word, word)
  return MISSING_APOSTROPHES.get(word, word)


def normalize_answer(answer: str) -> str:
  """The answer processing of the VQA evaluation (Antol et al. 2015; the rules of the
  official VQA v2 evaluation script), applied alike to predictions and human answers:
  whitespace (newlines, tabs) becomes single spaces and the ends are trimmed; punctuation
  is stripped (`_strip_punctuation`: "yes." -> "yes", "1,000" -> "1000", "2.5" kept);
  lower case; number words zero..ten (and "none") become digits ("two" -> "2"); the
  articles a, an, the are dropped ("a dog" -> "dog"); contractions missing apostrophes
  are restored ("dont" -> "don't"). The official script gets human answers already
  processed from the VQA annotations; here the raw ones go through the same steps."""
  text = _strip_punctuation(" ".join(answer.split()))
  words = [_normalize_word(w) for w in text.lower().split()]
  return " ".join(w for w in words if w not in ARTICLES)


def vqa_score(matches: int, num_answers: int) -> float:
  """The credit of an answer that `matches` of a question's `num_answers` human answers
  agree with. 10 answers: the official mean over the 10 leave-one-annotator-out subsets of
  min(matches among the other 9 / 3, 1) (an agreeing annotator left out leaves
  matches - 1, any other leaves matches): 0, 0.3, 0.6, 0.9, 1.0 for 0..>=4 matches. Any
  other number of answers (the demo's 3 or 4): the plain min(matches / 3, 1); fewer than
  3 (one reference answer, as in GQA-style data): full credit takes all of them,
  min(matches / num_answers, 1), where / 3 would cap a correct answer at 1/3 or 2/3."""
  if num_answers != LEAVE_ONE_OUT_ANSWERS:
    return min(matches / min(3.0, num_answers), 1.0) if num_answers else 0.0
  left_out_agreeing = matches * min((matches - 1) / 3.0, 1.0) if matches else 0.0
  left_out_other = (num_answers - matches) * min(matches / 3.0, 1.0)
  return (left_out_agreeing + left_out_other) / num_answers


def has_answers(answers: Sequence[str]) -> bool:
  """Whether a question's human `answers` can score a prediction and give a training
  target: at least one is left non-empty by the answer processing (`normalize_answer`)."""
  return any(normalize_answer(a) for a in answers)


def answer_counts(answers: Iterable[Sequence[str]]) -> collections.Counter:
  """How often each (normalised) answer was given, over every annotation. What the
  processing leaves empty ("?", "the") is no answer: it is not counted, so it is never
  in the vocabulary, a training target or a baseline's prediction."""
  normalized = (normalize_answer(a) for question in answers for a in question)
  return collections.Counter(filter(None, normalized))


def by_frequency(counts: Mapping[str, int]) -> list[str]:
  """Answers, most frequent first, ties alphabetical: the one order of the answer
  vocabulary and the VQA baselines (not the training files' order)."""
  return sorted(counts, key=lambda answer: (-counts[answer], answer))


def answer_vocabulary(answers: Iterable[Sequence[str]], size: int) -> list[str]:
  """The `size` most frequent (normalised) training answers (`by_frequency`), padded
  with never-given placeholders "<unused k>" when fewer distinct answers exist."""
  vocabulary = by_frequency(answer_counts(answers))[:size]
  return vocabulary + [f"<unused {k}>" for k in range(size - len(vocabulary))]


def answer_scores(answers: Sequence[Sequence[str]], vocabulary: Sequence[str]) -> np.ndarray:
  """[N, A] float32: `vqa_score` of each vocabulary answer for each question, the credit
  the evaluation gives that answer (the training targets; answers outside the vocabulary
  are dropped)."""
  index = {answer: i for i, answer in enumerate(vocabulary)}
  scores = np.zeros((len(answers), len(vocabulary)), np.float32)
  for row, question in enumerate(answers):
    for answer, count in answer_counts([question]).items():
      if answer in index:
        scores[row, index[answer]] = vqa_score(count, len(question))
  return scores
