"""VQA (Section 4.3): soft accuracy, the loss, the head, the data and the demo config."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_runs import tiny_config

from coca_jax import export, losses, train
from coca_jax import params as params_lib
from coca_jax import state as state_lib
from coca_jax.data import answers as answers_lib
from coca_jax.evaluate import vqa as vqa_eval
from coca_jax.models import coca
from configs import demo_vqa

# ---- metric ----


def test_soft_accuracy_hand_cases():
  answers = [
    ["sneaker", "sneaker", "sneaker", "footwear"],  # sneaker 3/3 -> 1, footwear 1/3
    ["red", "red", "blue"],  # red 2/3, blue 1/3
    ["cat"] * 5,  # more than 3 agree: still 1
    ["a", "b"],
  ]
  assert vqa_eval.answer_score("sneaker", answers[0]) == 1.0
  assert vqa_eval.answer_score("footwear", answers[0]) == pytest.approx(1 / 3)
  assert vqa_eval.answer_score(" Sneaker ", answers[0]) == 1.0  # normalised
  # (1 + 2/3 + 1 + 0) / 4
  got = vqa_eval.soft_accuracy(["sneaker", "red", "cat", "zebra"], answers)
  assert got == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
  # (1/3 + 1/3 + 0 + 1/2) / 4: with two answers one agreeing is half (min(k / n, 1))
  got = vqa_eval.soft_accuracy(["footwear", "blue", "dog", "b"], answers)
  assert got == pytest.approx(7 / 24)
  assert vqa_eval.majority_baseline("red", answers) == pytest.approx((2 / 3) / 4)


@pytest.mark.parametrize(
  "prediction, annotated",
  [("2", "two"), ("yes", "yes."), ("dog", "a dog"), ("1000", "1,000"), ("don't", "dont")],
)
def test_normalised_answers_get_full_credit(prediction, annotated):
  # Before the VQA answer processing, each of these scored 0.0 against 10 equal answers.
  assert vqa_eval.answer_score(prediction, [annotated] * 10) == 1.0


@pytest.mark.parametrize(
  "raw, want",
  [
    # whitespace: newlines, tabs and runs of spaces; ends trimmed
    ("  Red\tand\nwhite  ", "red and white"),
    # numbers: a comma between digits joins them; a period before a digit stays
    ("1,000", "1000"),
    ("2.5", "2.5"),
    (".5", ".5"),
    ("3.", "3"),
    ("10:30", "10:30"),
    # number words zero..ten (and "none") to digits; others unchanged
    ("Two", "2"),
    ("zero", "0"),
    ("ten", "10"),
    ("none", "0"),
    ("eleven", "eleven"),
    ("two dogs", "2 dogs"),
    # articles dropped as words only
    ("a dog", "dog"),
    ("An apple", "apple"),
    ("the man on the left", "man on left"),
    ("another", "another"),
    # punctuation: next to a space deleted, else a space; periods not before a digit deleted
    ("yes.", "yes"),
    ("black-and-white", "black and white"),
    ("black - white", "black white"),
    ("t-shirt/top", "t shirt top"),
    ("what?!", "what"),
    ("(a) cat", "cat"),
    ('"stop"', "stop"),
    ("a.m.", "am"),
    ("$3.50", "$3.50"),
    # contractions: apostrophes kept, missing ones restored
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("im", "i'm"),
    ("Its", "its"),  # an everyday word: left alone
    ("whats", "what's"),
    ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"),
    ("dog's", "dog's"),
  ],
)
def test_normalize_answer_vqa_rules(raw, want):
  assert answers_lib.normalize_answer(raw) == want


@pytest.mark.parametrize("k, want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_ten_answers_average_the_leave_one_out_subsets(k, want):
  # 10 subsets of 9: the k agreeing annotators left out leave k - 1 matches, the others k.
  answers = ["cat"] * k + ["dog", "bird", "cow", "fox", "owl", "ant", "bee", "elk", "emu", "yak"][
    k:
  ]
  assert vqa_eval.answer_score("cat", answers) == pytest.approx(want)
  assert answers_lib.vqa_score(k, 10) == pytest.approx(want)


def test_other_answer_counts_use_the_plain_formula():
  # 3 answers (the demo): min(k / 3, 1), no leave-one-out; 9 answers likewise.
  for k, want in [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0)]:
    assert vqa_eval.answer_score("cat", ["cat"] * k + ["dog"] * (3 - k)) == pytest.approx(want)
  assert vqa_eval.answer_score("cat", ["cat"] * 3 + ["dog"] * 6) == 1.0
  assert vqa_eval.answer_score("cat", ["cat"] * 2 + ["dog"] * 7) == pytest.approx(2 / 3)


def test_one_or_two_reference_answers_give_full_credit_when_all_agree():
  """Single-reference data (GQA-style): / 3 capped a correct answer at 1/3, in the metric
  and in the training targets."""
  assert vqa_eval.answer_score("cat", ["cat"]) == 1.0
  assert vqa_eval.answer_score("dog", ["cat"]) == 0.0
  assert vqa_eval.answer_score("cat", ["cat", "cat"]) == 1.0
  assert vqa_eval.answer_score("cat", ["cat", "dog"]) == pytest.approx(0.5)
  np.testing.assert_allclose(
    answers_lib.answer_scores([["cat"], ["cat", "dog"]], ["cat", "dog"]),
    [[1.0, 0.0], [0.5, 0.5]],
  )


def test_training_targets_equal_the_evaluation_credit():
  ten = ["two", "2", "a dog", "dog", "dog.", "Dog", "cat", "yes", "yes", "no"]
  vocabulary = ["2", "dog", "cat", "yes", "no", "bird"]
  scores = answers_lib.answer_scores([ten, ["Two", "2", "a cat"]], vocabulary)
  # 10 answers: 2 x2 -> 0.6, dog x4 -> 1.0, cat x1 -> 0.3, yes x2 -> 0.6, no x1 -> 0.3.
  np.testing.assert_allclose(scores[0], [0.6, 1.0, 0.3, 0.6, 0.3, 0.0], rtol=1e-6)
  # 3 answers: the plain formula, after normalisation ("Two" = "2", "a cat" = "cat").
  np.testing.assert_allclose(scores[1], [2 / 3, 0, 1 / 3, 0, 0, 0], rtol=1e-6)
  for row, answers in enumerate([ten, ["Two", "2", "a cat"]]):
    for column, answer in enumerate(vocabulary):
      assert scores[row, column] == pytest.approx(vqa_eval.answer_score(answer, answers))


def test_question_prior_baseline_and_vocabulary():
  train_q = ["what?", "what?", "what?", "which?"]
  train_a = [["x", "x", "y"], ["x"], ["y"], ["z", "z", "z"]]
  # overall counts: x 3, z 3, y 2 -> ties alphabetical; padded to 5
  assert answers_lib.answer_vocabulary(train_a, 5) == ["x", "z", "y", "<unused 0>", "<unused 1>"]
  assert answers_lib.answer_vocabulary(train_a, 2) == ["x", "z"]
  got = vqa_eval.question_prior_baseline(
    train_q, train_a, ["what?", "which?", "new?"], [["x"] * 3, ["z"], ["q"]]
  )
  assert got == pytest.approx((1 + 1 + 0) / 3)  # "z" is the one answer of "which?": 1
  scores = answers_lib.answer_scores([["x", "x", "y", "w"], ["z"] * 4], ["x", "z", "y"])
  np.testing.assert_allclose(scores, [[2 / 3, 0, 1 / 3], [0, 1, 0]], rtol=1e-6)


def test_baselines_break_ties_as_the_vocabulary_does_whatever_the_file_order():
  """Counter.most_common broke ties by first appearance: the majority baseline changed
  with the training files' order and could differ from the vocabulary's first answer."""
  for train_a in ([["yes", "yes"], ["no", "no"]], [["no", "no"], ["yes", "yes"]]):
    assert answers_lib.answer_vocabulary(train_a, 2) == ["no", "yes"]
    assert vqa_eval.most_frequent_answer(train_a) == "no"
    prior = vqa_eval.question_prior_baseline(["q?", "q?"], train_a, ["q?"], [["no"] * 3])
    assert prior == 1.0  # "q?" tied between yes and no: answered "no"


def test_what_the_processing_empties_is_no_answer():
  """ "?" and "the" normalise to "": it was the most frequent answer below, so it took a
  vocabulary slot, a full-credit training target, and an empty prediction scored."""
  train_a = [["?", "?", "?", "red"], ["the", "dog"], ["?"]]
  assert answers_lib.answer_vocabulary(train_a, 3) == ["dog", "red", "<unused 0>"]
  scores = answers_lib.answer_scores([["?", "?", "?", "red"]], ["dog", "red", "<unused 0>"])
  np.testing.assert_allclose(scores, [[0, 1 / 3, 0]], rtol=1e-6)
  assert vqa_eval.answer_score("?", ["?", "?", "?", "red"]) == 0.0
  assert vqa_eval.answer_score("red", ["?", "?", "?", "red"]) == pytest.approx(1 / 3)


def _fake_predictions(monkeypatch):
  """vqa_eval.predict_answers replaced: row i answers vocabulary[images[i, 0, 0, 0]];
  returns the list of the images it was given."""
  seen = []

  def predict_answers(predictor, images, text, vocabulary):
    seen.append(images)
    return [vocabulary[int(k)] for k in images[:, 0, 0, 0]]

  monkeypatch.setattr(vqa_eval, "predict_answers", predict_answers)
  return seen


def _eval_set(pixels, questions, answers, source="config.data.vqa.eval_files='eval.tfrecord'"):
  n = len(answers)
  images = np.zeros((n, 2, 2, 3), np.float32) + np.asarray(pixels, np.float32)[:, None, None, None]
  text = dict(ids=np.arange(n * 3).reshape(n, 3), mask=np.ones((n, 3), np.int32))
  return dict(images=images, text=text, questions=questions, answers=answers, source=source)


def test_questions_without_answers_are_left_out_and_counted(monkeypatch, caplog):
  """They scored 0 without a word: the accuracy here was (2/3 + 0 + 2/3 + 0) / 4 = 1/3."""
  seen = _fake_predictions(monkeypatch)
  vocabulary = ["red", "dog", "blue", "cat"]
  eval_set = _eval_set(
    pixels=[0, 3, 1, 3],  # predictions red, (cat), dog, (cat)
    questions=["what?", "what?", "which?", "which?"],
    answers=[
      ["red", "red", "blue"],  # red: 2/3
      [],  # no annotations (a test-dev style row)
      ["dog", "dog", "cat"],  # dog: 2/3
      ["the", "?"],  # nothing left after the answer processing
    ],
  )
  train_q, train_a = ["what?", "which?", "which?"], [["red"] * 2, ["dog"], ["dog"]]
  with caplog.at_level("WARNING"):
    got = vqa_eval.evaluate(None, [eval_set], vocabulary, (train_q, train_a))
  assert got == pytest.approx(
    dict(
      accuracy=(2 / 3 + 2 / 3) / 2,
      majority_baseline=(0 + 2 / 3) / 2,  # "dog" (3 votes to 2)
      question_prior_baseline=(2 / 3 + 2 / 3) / 2,  # what? -> red, which? -> dog
      examples=2.0,
      unscored_examples=2.0,
    )
  )
  assert [images[:, 0, 0, 0].tolist() for images in seen] == [[0, 1]]  # only scored rows
  lines = [r.getMessage() for r in caplog.records if "unscored" in r.getMessage()]
  assert len(lines) == 1 and "2 of 4 questions of config.data.vqa.eval_files=" in lines[0]

  # The split read in parts (as data.vqa.eval_sets gives it) scores the same: a part with
  # no answered question is left out whole, the counts add up.
  seen.clear()
  parts = [vqa_eval._subset(eval_set, rows) for rows in ([0, 1], [3], [2])]
  assert vqa_eval.evaluate(None, parts, vocabulary, (train_q, train_a)) == pytest.approx(got)
  assert [images[:, 0, 0, 0].tolist() for images in seen] == [[0], [1]]

  # Every question answered: nothing left out, nothing logged.
  caplog.clear()
  answered = _eval_set([0, 1], ["what?", "which?"], [["red"] * 3, ["cat"]])
  got = vqa_eval.evaluate(None, [answered], vocabulary, (train_q, train_a))
  assert got["accuracy"] == pytest.approx((1 + 0) / 2)
  assert (got["examples"], got["unscored_examples"]) == (2.0, 0.0)
  assert not [r for r in caplog.records if "unscored" in r.getMessage()]

  # Without the training files (an export evaluated elsewhere): the accuracy alone.
  caplog.clear()
  with caplog.at_level("WARNING"):
    alone = vqa_eval.evaluate(None, [answered], vocabulary)
  assert alone == pytest.approx(dict(accuracy=0.5, examples=2.0, unscored_examples=0.0))
  assert any("baselines" in r.getMessage() for r in caplog.records)


def test_an_eval_set_without_any_answer_is_an_error_naming_its_files(monkeypatch):
  """It scored 0.0 (every question credited nothing)."""
  _fake_predictions(monkeypatch)
  eval_set = _eval_set([0, 0], ["what?", "which?"], [[], ["a", " "]])
  with pytest.raises(
    ValueError,
    match=r"config.data.vqa.eval_files='eval.tfrecord': none of its 2 questions read has an "
    r"answer.*VQA accuracy is undefined",
  ):
    vqa_eval.evaluate(None, [eval_set], ["red"], (["what?"], [["red"]]))


def test_no_training_answers_or_vocabulary_is_a_value_error_naming_the_config(monkeypatch):
  """Each was a bare IndexError (most_common(1)[0] of no answers, vocabulary[k] of none);
  a head wider than the vocabulary silently predicted only its first answers."""
  import types

  predict_answers = vqa_eval.predict_answers
  _fake_predictions(monkeypatch)
  eval_set = _eval_set([0], ["what?"], [["red"] * 3])
  with pytest.raises(ValueError, match=r"answer vocabulary is empty.*config.model.vqa.num_answers"):
    vqa_eval.evaluate(None, [eval_set], [], (["what?"], [["red"]]))
  placeholders = answers_lib.answer_vocabulary([], 2)  # what no training answers give
  for train_a in ([], [[]], [["", "  "]]):
    with pytest.raises(ValueError, match=r"no training answers.*config.data.vqa.files"):
      vqa_eval.evaluate(None, [eval_set], placeholders, (["what?"] * len(train_a), train_a))
  with pytest.raises(ValueError, match="no training answers"):
    vqa_eval.question_prior_baseline([], [], ["what?"], [["red"]])

  predictor = types.SimpleNamespace(vqa_logits=lambda *arrays: np.zeros((1, 5), np.float32))
  with pytest.raises(ValueError, match="head scores 5 answers but the answer vocabulary has 3"):
    predict_answers(predictor, eval_set["images"], eval_set["text"], ["red", "dog", "cat"])


# ---- loss ----


def test_vqa_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 6)).astype(np.float32) * 3
  scores = np.minimum(rng.integers(0, 5, size=(4, 6)) / 3, 1).astype(np.float32)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  bce = -(scores * np.log(p) + (1 - scores) * np.log(1 - p))
  np.testing.assert_allclose(
    losses.vqa_loss(jnp.asarray(logits), jnp.asarray(scores)), bce.sum(1).mean(), rtol=1e-5
  )
  best = logits.argmax(1)
  np.testing.assert_allclose(
    losses.vqa_accuracy(jnp.asarray(logits), jnp.asarray(scores)),
    scores[np.arange(4), best].mean(),
    rtol=1e-6,
  )


# ---- model ----


def count(config) -> int:
  return params_lib.total(jax.eval_shape(lambda: jax.tree.map(jnp.asarray, _state(config))))


def _state(config):
  from flax import nnx

  return nnx.state(coca.build(config.model), nnx.Param)


def test_head_absent_by_default_and_sized_when_asked():
  config = tiny_config(1)
  assert config.model.vqa.num_answers == 0
  names = [
    "/".join(params_lib.path_names(p))
    for p, _ in jax.tree_util.tree_flatten_with_path(_state(config))[0]
  ]
  assert not [n for n in names if "vqa" in n]
  base = count(config)
  config.model.vqa.num_answers = 7
  width = config.model.width
  # pooler: query [1, D], 2 LayerNorms, attention (q, k, v, out kernels and biases)
  with_head = count(config)
  pooler = with_head - base - (width * 7 + 7)
  assert pooler > 0
  from flax import nnx

  from coca_jax.models.pooler import AttentionalPooler

  with nnx.use_eager_sharding(False):
    reference = AttentionalPooler(
      1, width, config.model.heads, eps=1e-6, dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
  assert pooler == params_lib.total(nnx.state(reference, nnx.Param))


def test_head_ignores_question_padding():
  config = tiny_config(1)
  config.model.vqa.num_answers = 5
  model = coca.build(config.model)
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(2, 60, size=(2, 8)), jnp.int32)
  mask = jnp.asarray([[1] * 5 + [0] * 3, [1] * 8], jnp.int32)
  logits = model.vqa_logits(image, ids, mask)
  assert logits.shape == (2, 5)
  other = ids.at[0, 5:].set(7)  # other tokens under the padding of row 0
  np.testing.assert_allclose(model.vqa_logits(image, other, mask), logits, rtol=1e-5, atol=1e-6)
  outputs = model(dict(image=image, text=dict(ids=ids, mask=mask)))
  np.testing.assert_allclose(outputs["vqa_logits"], logits, rtol=1e-5, atol=1e-6)


# ---- the demo config, on tiny shapes, from a tiny export ----


@pytest.mark.slow
def test_demo_config_trains_from_a_tiny_export(tmp_path):
  config = demo_vqa.get_config()
  tiny = tiny_config(1).model
  for key in ("width", "heads", "embed_dim"):
    config.model[key] = tiny[key]
  config.model.vision.layers = config.model.text.unimodal_layers = 1
  config.model.text.multimodal_layers = 1
  config.model.vision.mlp_dim = config.model.text.mlp_dim = 64
  config.model.vision.image_size = 16
  config.model.pooler.caption_queries = 8
  config.data.global_batch_size = 8
  config.data.shuffle_buffer = 64
  config.train.update(steps=4, log_every=2, eval_every=4, eval_steps=1, checkpoint_every=4)
  config.eval.num_examples = 16
  config.eval.batch_size = 8
  # The source: the same model without the head, as an export.
  source = config.copy_and_resolve_references()
  source.model.vqa.num_answers = 0
  run = state_lib.setup(source)
  export.write(
    state_lib.create(source, run)["params"], source, str(tmp_path / "src"), "float32", None
  )
  config.train.init_from = str(tmp_path / "src")

  final = train.train(config, str(tmp_path / "work"))
  assert final["step"] == 4
  assert 0.0 <= final["eval/vqa/accuracy"] <= 1.0
  assert 0.0 < final["eval/vqa/majority_baseline"] < 1.0
  assert final["eval/vqa/examples"] == 16
  for name in ("vqa/accuracy", "vqa/majority_baseline", "vqa/question_prior_baseline"):
    assert final[name] == final[f"eval/{name}"]  # config.eval.headline
  assert np.isfinite(final["vqa_loss"])

  # The run's answer vocabulary travels in its export; a finetune from that export whose
  # answers differ (other training files, the same count) is refused unless the head
  # starts fresh.
  from coca_jax import init_from

  exported = export.read_config(tmp_path / "work" / "export" / "config.json")
  answers = tuple(exported.data.vqa.answers)
  assert len(answers) == config.model.vqa.num_answers and answers[0]
  again = config.copy_and_resolve_references()
  again.train.init_from = str(tmp_path / "work" / "export")
  again.data = exported.data
  again.data.vqa.answers = (answers[1], answers[0], *answers[2:])
  run = state_lib.setup(again)
  with pytest.raises(
    ValueError, match=r"scores other answers .*\(2 of \d+ differ; row 0 is .* there"
  ):
    init_from.create(again, run)
  again.train.init_exclude = ("vqa_head/.*",)
  init_from.create(again, run)
  again.train.init_exclude = ("^vqa_head/classifier/",)  # what the error suggests: the
  init_from.create(again, run)  # pooler loaded, the classifier (its answers) fresh
  again.train.init_exclude = ()
  again.data.vqa.answers = answers
  init_from.create(again, run)


def test_the_run_fills_in_its_answer_vocabulary_and_an_export_keeps_its_own(
  tmp_path, sentencepiece_model
):
  """The answers were rebuilt from whatever the training files held at each use, so an
  export re-evaluated after they changed scored its rows as other answers."""
  from coca_jax.data import loader, vqa

  good = _write(
    tmp_path / "train.tfrecord",
    [(_png(), "what?", ["red"] * 3), (_png(), "which?", ["cat", "cat", "red"])],
  )
  config = _files_config(tmp_path, sentencepiece_model, good, good)
  resolved = loader.resolve(config)
  # red 4 votes, cat 2 (answers_lib.answer_vocabulary: by count), then 2 placeholders.
  assert resolved.data.vqa.answers[:2] == ("red", "cat") and len(resolved.data.vqa.answers) == 4
  assert loader.resolve(resolved).data.vqa.answers == resolved.data.vqa.answers
  kept = ("cat", "red", "x", "y")  # an export's own, in its order
  resolved.data.vqa.answers = kept
  assert vqa.answer_vocabulary(resolved.data, 4) == list(kept)
  with pytest.raises(ValueError, match=r"holds 4 answers but config.model.vqa.num_answers=3"):
    vqa.answer_vocabulary(resolved.data, 3)
  # The training files gone (an export evaluated elsewhere): its own vocabulary serves,
  # the baselines' training answers are None; without a stored vocabulary, an error.
  assert vqa.train_questions_and_answers(resolved.data) is not None
  resolved.data.vqa.files = str(tmp_path / "moved" / "*.tfrecord")
  assert vqa.train_questions_and_answers(resolved.data) is None
  assert vqa.answer_vocabulary(resolved.data, 4) == list(kept)
  resolved.data.vqa.answers = ()
  with pytest.raises(ValueError, match=r"config.data.vqa.files='.*moved.*' matches no"):
    vqa.answer_vocabulary(resolved.data, 4)


@pytest.mark.slow  # two tiny runs
def test_a_resume_keeps_the_runs_answers_when_the_training_files_change(
  tmp_path, sentencepiece_model
):
  """The answers were rebuilt from the files at the resume: one file more reordered
  them, and the restored classifier rows trained on as other answers (helper-92)."""
  first = _write(
    tmp_path / "a.tfrecord",
    [(_png(), "what?", ["blue"] * 3), (_png(), "which?", ["green", "blue"])],
  )
  config = _files_config(tmp_path, sentencepiece_model, first, first)
  config.train.steps = 2
  train.train(config, str(tmp_path / "run"))
  run_answers = json.loads((tmp_path / "run" / "config.json").read_text())["data"]["vqa"]
  assert run_answers["answers"][:2] == ["blue", "green"]
  _write(tmp_path / "b.tfrecord", [(_png(), "how?", ["green"] * 5)])  # green now first
  config = _files_config(tmp_path, sentencepiece_model, str(tmp_path / "*.tfrecord"), first)
  config.train.steps = 4
  assert train.train(config, str(tmp_path / "run"))["step"] == 4
  resumed = json.loads((tmp_path / "run" / "config.json").read_text())["data"]["vqa"]
  assert resumed["answers"] == run_answers["answers"]


@pytest.mark.parametrize(
  "section, key, head", [("vqa", "num_answers", "VQA"), ("video", "num_classes", "video")]
)
def test_a_task_source_and_its_head_go_together(section, key, head):
  """Without the head the VQA source trained no VQA loss (found at the final eval); the
  VQA head on another source failed at trace time on a missing answer_scores; a video head
  on another source was exported and evaluated untrained; the video source without its
  head failed only when the train step was traced."""
  from coca_jax.data import loader
  from configs import tiny

  config = tiny.get_config()
  config.model[section][key] = 4
  with pytest.raises(ValueError, match=f"{key}=4 adds a {head} head.*the source is 'mixture'"):
    loader.resolve(config)
  config.model[section][key] = 0
  config.data.source = section
  with pytest.raises(
    ValueError, match=f"source='{section}' needs config.model.{section}.{key} > 0"
  ):
    loader.resolve(config)


# ---- files with no usable example ----


def _png() -> bytes:
  import io

  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def _write(path, rows) -> str:
  """A VQA TFRecord of (image bytes, question, answers) rows."""
  import tensorflow as tf

  from coca_jax.data import vqa

  with tf.io.TFRecordWriter(str(path)) as writer:
    for image, question, answers in rows:
      writer.write(vqa._example(image, question, answers))
  return str(path)


def _files_config(tmp_path, vocab_path, files, eval_files):
  """The tiny model with a VQA head on the VQA source's own `files` / `eval_files`."""
  config = tiny_config(1)
  config.data.source = "vqa"
  config.model.vqa.num_answers = 4
  config.data.vqa.update(files=files, eval_files=eval_files)
  config.data.vocab_path = vocab_path
  config.data.jft_style.tfds_data_dir = str(tmp_path)  # not the demo data: none prepared
  return config


def test_vqa_files_without_a_usable_example_are_an_error_before_the_run_writes(
  tmp_path, sentencepiece_model
):
  """An empty train file was a bare StopIteration at the first batch, after config.json
  was written; an empty (or all-rejected) eval file numpy's 'need at least one array to
  stack' at the first evaluation, after training."""
  from coca_jax.data import loader

  good = _write(tmp_path / "good.tfrecord", [(_png(), "what is this?", ["red"] * 3)])
  empty = _write(tmp_path / "empty.tfrecord", [])
  unusable = _write(
    tmp_path / "unusable.tfrecord",
    [
      (_png(), "  ", ["red"] * 3),  # blank question
      (b"not an image", "what is this?", ["red"] * 3),
      (_png(), "what is this?", []),  # no answer: no target, no credit
    ],
  )
  cases = [
    (empty, good, f"config.data.vqa.files='{empty}' holds no examples .* vqa train split"),
    (good, empty, f"config.data.vqa.eval_files='{empty}' holds no examples .* vqa eval split"),
    (unusable, good, f"config.data.vqa.files='{unusable}': none of its 3 examples .*usable"),
    (good, unusable, f"config.data.vqa.eval_files='{unusable}': none of its 3 examples"),
    # No eval_files: the eval reads the training files, named by their key.
    (empty, "", f"config.data.vqa.files='{empty}' holds no examples"),
  ]
  for files, eval_files, message in cases:
    config = _files_config(tmp_path, sentencepiece_model, files, eval_files)
    with pytest.raises(ValueError, match=message):
      loader.check_files(loader.resolve(config))
  loader.check_files(loader.resolve(_files_config(tmp_path, sentencepiece_model, good, good)))

  # The trainer stops before it writes: an existing run's record stays as it was.
  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "config.json").write_text("the run's record")
  config = _files_config(tmp_path, sentencepiece_model, empty, good)
  with pytest.raises(ValueError, match="holds no examples"):
    train.train(config, str(workdir))
  assert [p.name for p in workdir.iterdir()] == ["config.json"]
  assert (workdir / "config.json").read_text() == "the run's record"


def test_vqa_training_images_are_never_mirrored(tmp_path, sentencepiece_model):
  """Pretraining flips (config.data.image.flip); a mirrored VQA image would answer "what
  is on the left?" wrongly, so the VQA source never flips. Image: white left half."""
  import io

  import tensorflow as tf
  from PIL import Image

  from coca_jax.data import preprocess, tasks, vqa

  pixels = np.zeros((16, 16, 3), np.uint8)
  pixels[:, :8] = 255
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  config = _files_config(tmp_path, sentencepiece_model, "unused", "unused")
  config.data.image.update(flip=True, crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0))
  example = vqa.example_fn(config.data, train=True)
  options = tasks.train_image_options(config.data)
  row = dict(image=buffer.getvalue(), question="what is on the left?", answers=["white"])

  def both(seed):  # (the VQA example's image, pretraining's transform of it), in graph mode
    seeds = tf.random.experimental.stateless_split(tf.stack([seed, 7]), tasks.NUM_SEEDS)
    image, _ = preprocess.decode(tf.constant(row["image"]), tf.constant(row["question"]))
    plain = preprocess.train_pixels(image, seeds[2:], **options)
    return example({k: tf.constant(v) for k, v in row.items()}, seeds)["image"], plain

  pairs = tf.data.Dataset.range(16).map(both).as_numpy_iterator()
  mirrored_by_pretraining = 0
  for vqa_image, plain in pairs:
    assert vqa_image[:, :4].mean() > vqa_image[:, -4:].mean()
    mirrored_by_pretraining += int(plain[:, :4].mean() < plain[:, -4:].mean())
  assert mirrored_by_pretraining > 0  # the same seeds do flip under pretraining's transform


def test_an_empty_human_answer_counts_in_training_targets_as_in_the_metric(
  tmp_path, sentencepiece_model
):
  """The batch pads answer lists with "" to its longest, and dropped every "": a real ""
  (an annotator who typed nothing) left n = 2 in the training target, where the metric
  counts n = 3: "cat" by 2 of ["", "cat", "cat"] was a target of 1 for a credit of 2/3."""
  from coca_jax.data import vqa

  rows = [
    (_png(), "what is this?", ["", "cat", "cat"]),
    (_png(), "what is that?", ["dog", "dog", "cat", "cat", "cat"]),  # the longest list
  ]
  path = _write(tmp_path / "answers.tfrecord", rows)
  config = _files_config(tmp_path, sentencepiece_model, path, path)
  config.data.vqa.answers = ["cat", "dog", "red", "blue"]
  batch = next(vqa.batches(config, "eval", shard_index=0, num_shards=1, local_batch_size=2))
  # Hand-computed credits: min(k / 3, 1) for 3 or more answers.
  np.testing.assert_allclose(batch["answer_scores"], [[2 / 3, 0, 0, 0], [1, 2 / 3, 0, 0]])
  assert vqa_eval.answer_score("cat", rows[0][2]) == pytest.approx(2 / 3)


def test_vqa_eval_set_with_every_row_rejected_names_its_file(tmp_path, sentencepiece_model):
  """What the pipeline drops (blank questions, undecodable images) left eval_set nothing
  to stack."""
  from coca_jax.data import vqa

  rejected = _write(
    tmp_path / "rejected.tfrecord",
    [(_png(), "", ["red"] * 3), (b"not an image", "what?", ["red"] * 3)],
  )
  good = _write(tmp_path / "good.tfrecord", [(_png(), "what is this?", ["red"] * 3)])
  config = _files_config(tmp_path, sentencepiece_model, good, rejected)
  config.eval.num_examples = 0
  with pytest.raises(
    ValueError, match=f"VQA eval split has no example: config.data.vqa.eval_files='{rejected}'"
  ):
    vqa.eval_set(config)


def test_a_files_pattern_matching_nothing_leaves_the_run_record(tmp_path, sentencepiece_model):
  """Files that match nothing were seqio's error at the first batch, after config.json was
  replaced; now an error naming the key before anything is built."""
  good = _write(tmp_path / "good.tfrecord", [(_png(), "what is this?", ["red"] * 3)])
  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "config.json").write_text("the run's record")
  config = _files_config(tmp_path, sentencepiece_model, str(tmp_path / "missing-*"), good)
  missing = str(tmp_path / "missing-*")
  with pytest.raises(ValueError, match=re.escape(f"config.data.vqa.files='{missing}' matches no")):
    train.train(config, str(workdir))
  assert (workdir / "config.json").read_text() == "the run's record"


def test_vqa_eval_files_without_answers_name_their_key(tmp_path, sentencepiece_model, monkeypatch):
  """Answers that the answer processing empties ("?", "the") passed the check before
  training; such eval files then scored 0.0 at every evaluation."""
  from coca_jax.data import loader, vqa

  _fake_predictions(monkeypatch)
  good = _write(tmp_path / "good.tfrecord", [(_png(), "what is this?", ["red"] * 3)])
  unannotated = _write(
    tmp_path / "test-dev.tfrecord",
    [(_png(), "what is this?", []), (_png(), "which is it?", ["?", "the"])],
  )
  config = _files_config(tmp_path, sentencepiece_model, good, unannotated)
  config.eval.num_examples = 0
  with pytest.raises(ValueError, match=f"eval_files='{unannotated}': none of its 2 examples"):
    loader.check_files(loader.resolve(config))
  eval_set = vqa.eval_set(config)  # an export evaluated elsewhere is not checked
  assert eval_set["source"] == f"config.data.vqa.eval_files='{unannotated}'"
  with pytest.raises(
    ValueError, match=f"eval_files='{unannotated}': none of its 2 questions read has an answer"
  ):
    vqa_eval.evaluate(None, [eval_set], ["red"], (["what is this?"], [["red"]]))
