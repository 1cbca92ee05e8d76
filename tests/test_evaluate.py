"""Evaluators: retrieval and zero-shot metrics on hand-worked cases, CIDEr-D against an
independent implementation, and the whole suite on a tiny model."""

import collections
import math
import pathlib
import shutil
import subprocess
import unicodedata

import numpy as np
import pytest

from coca_jax import evaluate, predict
from coca_jax.data import eval_sets
from coca_jax.data import vocab as vocab_lib
from coca_jax.evaluate import captioning, retrieval, zero_shot
from coca_jax.models import coca
from configs import tiny

# ---- retrieval


def test_identity_similarity_gives_perfect_recall():
  metrics = retrieval.recall_at_k(np.eye(5), np.arange(5), ks=(1, 5))
  assert all(v == 1.0 for v in metrics.values()), metrics


def test_known_permutation_gives_known_recall():
  # Image i's most similar text is text perm[i]; the true text of image i is text i.
  # perm fixes 0 and 1 only -> image->text R@1 = 2/4; with scores 1 (perm) and 0.5
  # (true text), the true text is 2nd for the other images -> R@2 = 1.
  perm = np.array([0, 1, 3, 2])
  similarity = np.zeros((4, 4))
  similarity[np.arange(4), np.arange(4)] = 0.5
  similarity[np.arange(4), perm] = 1.0
  metrics = retrieval.recall_at_k(similarity, np.arange(4), ks=(1, 2))
  assert metrics["image_to_text_r1"] == 0.5
  assert metrics["image_to_text_r2"] == 1.0
  # Text 3's best image is image 2 (score 1) then image 3 (0.5): same counts.
  assert metrics["text_to_image_r1"] == 0.5
  assert metrics["text_to_image_r2"] == 1.0


def test_several_captions_per_image():
  # Image 0 owns texts 0 and 1, image 1 owns text 2.
  owner = np.array([0, 0, 1])
  similarity = np.array(
    [
      [0.1, 0.9, 0.5],  # image 0: best text 1 (its own) -> hit at 1
      [0.8, 0.4, 0.3],  # image 1: texts 0 and 1, then text 2 (own) -> 3rd
    ]
  )
  metrics = retrieval.recall_at_k(similarity, owner, ks=(1, 2, 3))
  assert metrics["image_to_text_r1"] == 0.5 and metrics["image_to_text_r2"] == 0.5
  assert metrics["image_to_text_r3"] == 1.0
  # texts: 0 -> best image 1 (miss at 1); 1 -> image 0 (hit); 2 -> image 0 (miss at 1).
  assert metrics["text_to_image_r1"] == pytest.approx(1 / 3)
  assert metrics["text_to_image_r2"] == 1.0


def test_retrieval_chance_levels():
  chance = retrieval.chance(np.arange(10), 10, ks=(1, 5))
  assert chance["text_to_image_r1"] == pytest.approx(0.1)
  assert chance["image_to_text_r5"] == pytest.approx(0.5)  # one caption among 10, 5 draws


# ---- zero-shot


def test_top_k_accuracy_by_hand():
  scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
  labels = np.array([1, 1, 0])  # ranks: 0, 1, 2
  assert zero_shot.top_k_accuracy(scores, labels, ks=(1, 2, 3)) == {
    "top1": 1 / 3,
    "top2": 2 / 3,
    "top3": 1.0,
  }
  # Ties in expectation: every score equal over 4 classes gives k / 4 whatever the label
  # (a stable sort gave 1.0 for class 0 and 0.0 at top-1 for the others); a label tied
  # with one other class behind one ahead is a top-2 hit half the time.
  flat = zero_shot.top_k_accuracy(np.zeros((4, 4)), np.arange(4), ks=(1, 3))
  assert flat == pytest.approx({"top1": 0.25, "top3": 0.75})
  half = zero_shot.top_k_accuracy(np.array([[0.9, 0.5, 0.5, 0.1]]), np.array([2]), ks=(1, 2, 3))
  assert half == pytest.approx({"top1": 0.0, "top2": 0.5, "top3": 1.0})


def test_prompt_ensemble_is_mean_of_normalised_then_normalised():
  vectors = {"a cat": [3.0, 0.0], "the cat": [0.0, 1.0], "a dog": [1.0, 0.0], "the dog": [2.0, 0.0]}
  classifier = zero_shot.class_embeddings(
    lambda texts: np.asarray([vectors[t] for t in texts]), ["cat", "dog"], ["a {}", "the {}"]
  )
  np.testing.assert_allclose(classifier, [[math.sqrt(0.5), math.sqrt(0.5)], [1.0, 0.0]], rtol=1e-6)
  images = np.array([[0.0, 1.0], [1.0, 0.0]])
  assert zero_shot.evaluate(images, np.array([0, 1]), classifier, ks=(1,)) == {"top1": 1.0}


# ---- captioning


def cider_d_by_hand(candidates, references, sigma=6.0):
  """CIDEr-D (Vedantam et al. 2015, as in the COCO toolkit) from its definition:
  tf-idf n-gram vectors (idf over the references of the corpus), counts of the candidate
  clipped by the reference's, Gaussian penalty on the length difference, x10, averaged
  over references, n-gram orders 1..4 and images. Inputs are already-normalised text."""

  def grams(sentence, n):
    words = sentence.split()
    return collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

  document_frequency = collections.Counter()
  for refs in references:
    document_frequency.update({g for r in refs for n in range(1, 5) for g in grams(r, n)})
  log_images = math.log(len(references))

  def tfidf(sentence, n):
    return {
      g: c * (log_images - math.log(max(1, document_frequency[g])))
      for g, c in grams(sentence, n).items()
    }

  per_image = []
  for candidate, refs in zip(candidates, references):
    per_ref = []
    for ref in refs:
      orders = []
      for n in range(1, 5):
        vc, vr = tfidf(candidate, n), tfidf(ref, n)
        norm_c = math.sqrt(sum(v * v for v in vc.values()))
        norm_r = math.sqrt(sum(v * v for v in vr.values()))
        dot = sum(min(v, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, v in vc.items())
        cosine = dot / (norm_c * norm_r) if norm_c and norm_r else 0.0
        delta = len(candidate.split()) - len(ref.split())
        orders.append(cosine * math.exp(-(delta**2) / (2 * sigma**2)))
      per_ref.append(10.0 * sum(orders) / 4)
    per_image.append(sum(per_ref) / len(per_ref))
  return sum(per_image) / len(per_image)


def test_cider_matches_an_independent_implementation():
  predictions = ["A red heart!", "a blue star", "Smiling face, with sunglasses."]
  references = [
    ["a red heart", "red heart symbol", "a heart that is red"],
    ["a green star", "blue star shape"],
    ["smiling face with sunglasses", "a cool smiling face", "face with sunglasses"],
  ]
  expected = cider_d_by_hand(
    ["a red heart", "a blue star", "smiling face with sunglasses"], references
  )
  scores = captioning.score(predictions, references)
  assert scores["cider"] == pytest.approx(expected, rel=1e-9)
  assert expected > 0.5  # the example is not degenerate
  assert 0 < scores["bleu4"] < 1


def test_bleu4_equals_a_hand_computed_corpus_score():
  """Corpus BLEU-4 (Papineni et al. 2002; pycocoevalcap's closest reference length).
  Clipped n-gram matches over both captions: 1-grams 8/8, 2-grams 4/6 ("red heart",
  "heart on", "on a"; "blue star"), 3-grams 2/4 ("red heart on", "heart on a"), 4-grams
  1/3 ("red heart on a"). Candidate length 6 + 2 = 8 against closest reference lengths
  8 + 2 = 10: brevity penalty exp(1 - 10/8)."""
  scores = captioning.score(
    ["a red heart on a card", "blue star"],
    [["a big red heart on a white card"], ["a blue star shape", "blue star"]],
  )
  expected = math.exp(1 - 10 / 8) * (1 * 4 / 6 * 2 / 4 * 1 / 3) ** (1 / 4)
  assert scores["bleu4"] == pytest.approx(expected, rel=1e-6)


def test_bleu4_of_an_exact_match_is_one():
  scores = captioning.score(["a cat on a red mat"], [["a cat on a red mat"]])
  assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)


# (text, what the COCO toolkit's PTBTokenizer gives: Stanford PTBTokenizer 3.4.1 from
# pycocoevalcap's jar with -lowerCase, the toolkit's punctuation tokens removed), copied
# from the jar's output.
PTB_CASES = [
  ("A Cat's hat, on   a MAT.", "a cat 's hat on a mat"),
  ("A man's t-shirt (blue)!", "a man 's t-shirt -lrb- blue -rrb-"),
  ("person: medium-dark skin tone", "person medium-dark skin tone"),
  ("Piñata; left-right arrow...", "piñata left-right arrow"),
  ("a sign saying 'hello'", "a sign saying hello"),
  ("Man\u2019s shoe, \u2018fine\u2019", "man 's shoe fine"),
  ("a 3.5 inch screen", "a 3.5 inch screen"),
  ("1,000 people at 2:30", "1,000 people at 2:30"),
  ("a 50% sale & $5 #1 deal", "a 50 % sale & $ 5 # 1 deal"),
  ("He doesn't know; can't won't", "he does n't know ca n't wo n't"),
  ("A cannot sign, gonna go", "a can not sign gon na go"),
  ("a w/ b and/or c", "a w / b and/or c"),
  ("The E.U. flag at 5 p.m. in St. Louis", "the e.u. flag at 5 p.m. in st. louis"),
  ("o'clock and ma\u2019am, I'm sure they'll", "o'clock and ma\u2019am i 'm sure they 'll"),
  ("sparkles: *, magic ** and ??", "sparkles * magic ** and ??"),
  ("check \u2713 mark \u2764, a cat \U0001f600 with", "check \u2713 mark \u2764 a cat with"),
  ("a man \u2014 with a dash \u2013 here -- yes....", "a man with a dash here yes"),
  (
    "it costs \u20ac5 or \u00a33, a 12-year-old's bike",
    "it costs $ 5 or # 3 a 12-year-old 's bike",
  ),
  ("x + y = z < w", "x + y = z < w"),
  (
    "thumbs down: -1, bad; thumbs up: +1 (-3.5), 2x+1 at -5c",
    "thumbs down -1 bad thumbs up +1 -lrb- -3.5 -rrb- 2x +1 at -5 c",
  ),
  ("a --1 or +-1, 5-3 and 1.5-2", "a 1 or + -1 5-3 and 1.5-2"),
  ("what!? wow?! a !!? mark!", "what !? wow ?! a !!? mark"),
  # Review helper-71's cases (fifteenth session): the jar's joins and abbreviations.
  ("an AT&T phone, Q&A and R&B; a&b", "an at&t phone q&a and r&b a & b"),
  (
    "A man on a horse.The horse, node.js and v1.2 at www.x.com",
    "a man on a horse.the horse node.js and v1 .2 at www.x.com",
  ),
  ("plan b. or the letter A. and x...y, a .. b", "plan b. or the letter a. and x. y a b"),
  (
    "a Ph.D. student on Jan. 3 at Mt. Fuji Inc., No. 5 and No.1 vs Gen. Lee",
    "a ph.d. student on jan. 3 at mt. fuji inc. no. 5 and no. 1 vs gen. lee",
  ),
  (
    "a \u2026 b, \u00abx\u00bb and a_b or x__y _z_ and a .5 ratio, dog.1",
    "a b x and a_b or x __ y _ z _ and a .5 ratio dog .1",
  ),
  # Review helper-84's cases (eighteenth session): invisible characters of web alt-text,
  # emoji sequences, HTML entities, a decomposed accent (the jar echoes it decomposed:
  # compared in NFC).
  ("a dog\u200bsitting\u200b", "a dog sitting"),
  ("a dog\xadsitting\ufeff and a\u200ecat\u2060", "a dogsitting and a cat"),
  ("a family \U0001f468\u200d\U0001f469\u200d\U0001f467 photo", "a family photo"),
  ("i \u2764\ufe0f you, press 1\ufe0f\u20e3 now", "i \u2764 you press 1 now"),
  ("Tom &amp; Jerry say &quot;hi&quot; &lt;3", "tom & jerry say hi < 3"),
  ("a cafe\u0301 sign", "a caf\u00e9 sign"),
]


@pytest.mark.parametrize("text, ptb", PTB_CASES)
def test_normalize_gives_the_coco_toolkits_ptb_tokens(text, ptb):
  assert captioning.normalize(text) == ptb


@pytest.mark.skipif(shutil.which("java") is None, reason="the COCO toolkit's tokenizer needs Java")
def test_normalize_equals_the_coco_toolkits_tokenizer_run_by_java(tmp_path):
  """The toolkit's own PTBTokenizer (its jar; run here on a scratch file, as the toolkit
  would write one inside the installed package) on the cases above."""
  from pycocoevalcap.tokenizer import ptbtokenizer

  jar = pathlib.Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
  path = tmp_path / "captions.txt"
  path.write_text("\n".join(text for text, _ in PTB_CASES), encoding="utf-8")
  command = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer"]
  out = subprocess.run(
    [*command, "-preserveLines", "-lowerCase", str(path)],
    capture_output=True,
    text=True,
    encoding="utf-8",
    check=True,
  ).stdout.splitlines()
  toolkit = [
    " ".join(
      w for w in unicodedata.normalize("NFC", line).split() if w not in ptbtokenizer.PUNCTUATIONS
    )
    for line in out
  ]
  assert [captioning.normalize(text) for text, _ in PTB_CASES] == toolkit


def test_ties_are_broken_at_random_in_expectation_and_nan_is_an_error():
  """A match tied with one non-match is a hit at K = 1 half the time (one query of two
  each way); collapsed
  embeddings (every score equal) give chance, not 1.0; NaN is an error."""
  half = retrieval.recall_at_k(np.array([[1.0, 1.0], [0.0, 1.0]]), [0, 1], ks=(1, 2))
  assert half == pytest.approx(
    dict(image_to_text_r1=0.75, text_to_image_r1=0.75, image_to_text_r2=1.0, text_to_image_r2=1.0)
  )
  text_image = np.arange(10)  # one caption per image: 9 tied non-matches per query
  tied = retrieval.recall_at_k(np.ones((10, 10)), text_image, ks=(1, 5))
  assert tied == pytest.approx(
    dict(image_to_text_r1=0.1, text_to_image_r1=0.1, image_to_text_r5=0.5, text_to_image_r5=0.5)
  )
  # Two captions per image, every score equal: an image's 2 captions and 4 others tie,
  # so K = 1 misses with probability 4/6 and K = 2 with 4/6 x 3/5 (both chance).
  two_each = retrieval.recall_at_k(np.ones((3, 6)), [0, 0, 1, 1, 2, 2], ks=(1, 2))
  assert two_each["image_to_text_r1"] == pytest.approx(1 / 3)
  assert two_each["image_to_text_r2"] == pytest.approx(0.6)
  assert two_each["text_to_image_r1"] == pytest.approx(1 / 3)
  # One caption ahead, then a match tied with a second match and a non-match: K = 2 has
  # one slot among 3 tied texts, 2 of them matches, a hit 2/3 of the time.
  mixed = retrieval.recall_at_k(np.array([[0.5, 0.5, 0.9, 0.5]]), [0, 0, 1, 1], ks=(1, 2, 3))
  assert mixed["image_to_text_r1"] == 0.0
  assert mixed["image_to_text_r2"] == pytest.approx(2 / 3)
  assert mixed["image_to_text_r3"] == 1.0
  with pytest.raises(ValueError, match="non-finite"):
    retrieval.recall_at_k(np.full((10, 20), np.nan), text_image)
  with pytest.raises(ValueError, match=r"labels \[5, 7\] outside the 3 classes"):
    zero_shot.top_k_accuracy(np.zeros((3, 3)), [0, 5, 7])
  with pytest.raises(ValueError, match="non-finite"):
    zero_shot.top_k_accuracy(np.full((2, 3), np.nan), [0, 1])


# ---- the whole suite on a tiny model


class RecordingWriter:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.update({(step, k): v for k, v in scalars.items()})

  def flush(self):
    pass


@pytest.fixture(scope="module")
def vocab(sentencepiece_model):
  return vocab_lib.load(sentencepiece_model)


@pytest.mark.slow  # every evaluation of the suite on a tiny model (~12 s)
def test_run_all_evals_on_a_tiny_model(tmp_path, vocab):
  config = tiny.get_config()
  config.eval.evals = "zero_shot,retrieval,captioning,frozen"
  config.eval.batch_size = 16
  config.eval.num_examples = 24
  config.eval.frozen.steps = 5
  config.eval.frozen.batch_size = 8
  config.eval.captioning.gallery_size = 4
  model = coca.build(config.model, seed=0)
  sets = eval_sets.synthetic(config.model.vision.image_size, num_examples=40)
  writer = RecordingWriter()
  predictor = predict.Predictor(model, config, vocab, config.eval.batch_size)
  metrics = evaluate.run(
    predictor, config, step=7, workdir=str(tmp_path), writer=writer, datasets=sets
  )
  expected = {
    "zero_shot/top1",
    "zero_shot/top5",
    "captioning/cider",
    "captioning/bleu4",
    "frozen/accuracy",
    "frozen/train_accuracy",
  } | {f"retrieval/{d}_r{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
  counts = {"frozen/train_examples", "frozen/test_examples", "frozen/from_train_split"}
  assert set(metrics) == expected | counts
  assert all(0.0 <= metrics[k] <= 10.0 and np.isfinite(metrics[k]) for k in expected), metrics
  # Synthetic sets have no train split: the probe splits the 24 eval examples in half.
  assert [metrics[k] for k in sorted(counts)] == [0.0, 12.0, 12.0]
  assert (7, "eval/zero_shot/top1") in writer.scalars
  gallery = tmp_path / "eval" / "captions_7.html"
  page = gallery.read_text()
  assert page.count("data:image/png;base64,") == 4 and sets.alt_text.captions[0][0] in page
  chance = evaluate.chance_levels(config, sets)
  assert chance["zero_shot/top1"] == pytest.approx(0.1)
  text = evaluate.report(metrics, chance)
  assert "zero_shot/top1" in text and "0.1000" in text


def test_the_report_puts_an_evals_own_chance_beside_its_top_k():
  """The video eval reports "video/chance" (1 / C): its top-k rows showed "-" in the chance
  column (helper-94). C = 10 here."""
  metrics = {"video/chance": 0.1, "video/top1": 0.5, "video/zero_shot/top5": 0.7}
  rows = {line.split()[0]: line.split()[1:] for line in evaluate.report(metrics).splitlines()}
  assert rows["video/top1"] == ["0.5000", "0.1000"]
  assert rows["video/zero_shot/top5"] == ["0.7000", "0.5000"]
  assert rows["video/chance"] == ["0.1000", "-"]


def test_an_empty_eval_split_is_an_error_naming_the_source(monkeypatch):
  """No row (an empty split, or every row rejected) reached the model as [0]-shaped
  images: "image of shape (8,) does not match config image_size"."""
  config = tiny.get_config()
  monkeypatch.setattr(eval_sets, "_rows", lambda *args: iter(()))
  with pytest.raises(
    ValueError,
    match=r"jft_style eval set is empty: config.data.jft_style.tfds_name='coca_fashion_mnist"
    r":1.0.0' \(split config.data.jft_style.eval_split='test'\)",
  ):
    eval_sets._classification(config, "validation")
  with pytest.raises(ValueError, match=r"split config.data.jft_style.train_split='train'"):
    eval_sets._classification(config, "train")
  config.data.alt_text.files = "captions-*.tfrecord"
  with pytest.raises(
    ValueError, match=r"alt_text eval set is empty: config.data.alt_text.files='captions-\*"
  ):
    eval_sets._alt_text(config)


@pytest.mark.parametrize("n", [-1, True])
def test_num_examples_must_be_a_count(n):
  """-1 read every row, then numpy's [:-1] dropped the last one."""
  config = tiny.get_config()
  config.eval.evals = "zero_shot"
  config.eval.num_examples = n
  with pytest.raises(ValueError, match=r"config.eval.num_examples=.* must be an integer >= 0"):
    evaluate.suite.enabled_evals(config.eval)
