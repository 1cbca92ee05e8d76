"""Frozen-feature probe: it learns a task a linear rule decides (and not one with shuffled
labels), and the suite trains it on the classification source's train split."""

import numpy as np
import pytest

from coca_jax import evaluate
from coca_jax.data import eval_sets, prepare
from coca_jax.evaluate import frozen

CLASSES, TOKENS, WIDTH = 4, 8, 16


def separable_tokens(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """tokens [N, M, D]: every token of an example of class c is the class's direction
  (one of CLASSES orthogonal unit vectors, x2) plus unit Gaussian noise, so the sign
  pattern of the token mean against the directions decides the class (Bayes error ~0)."""
  rng = np.random.default_rng(seed)
  directions = 2.0 * np.eye(WIDTH, dtype=np.float32)[:CLASSES]
  labels = rng.integers(0, CLASSES, num_examples)
  noise = rng.standard_normal((num_examples, TOKENS, WIDTH)).astype(np.float32)
  return noise + directions[labels][:, None, :], labels


def probe(train_labels_of=lambda labels: labels) -> dict[str, float]:
  train_tokens, train_labels = separable_tokens(512, seed=0)
  test_tokens, test_labels = separable_tokens(256, seed=1)
  return frozen.train_and_score(
    train_tokens,
    train_labels_of(train_labels),
    test_tokens,
    test_labels,
    num_classes=CLASSES,
    heads=2,
    eps=1e-6,
    steps=300,
    batch_size=64,
  )


def test_probe_learns_a_linearly_separable_task():
  result = probe()
  assert result["accuracy"] >= 0.95, result
  assert result["train_accuracy"] >= 0.95, result


def test_probe_on_shuffled_labels_stays_near_chance():
  # The same tokens with their labels permuted: nothing generalises to held-out examples.
  result = probe(lambda labels: np.random.default_rng(2).permutation(labels))
  assert result["accuracy"] < 1 / CLASSES + 0.12, result


class PatchTokens:
  """A stand-in for predict.Predictor: image_tokens -> non-overlapping 8x8 patches of the
  pixels as tokens [N, M, 192]; records every batch of images it is given."""

  def __init__(self):
    self.seen = []

  def image_tokens(self, images: np.ndarray) -> np.ndarray:
    self.seen.append(images)
    n, s = images.shape[:2]
    patches = images.reshape(n, s // 8, 8, s // 8, 8, 3).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(n, (s // 8) ** 2, 8 * 8 * 3)


@pytest.mark.skipif(
  not prepare.is_prepared(), reason="demo data not prepared (.ci/run prepares it)"
)
@pytest.mark.slow  # trains the probe through the suite (~7 s)
def test_suite_trains_the_probe_on_the_train_split_and_scores_the_eval_split():
  from configs import demo

  config = demo.get_config()
  config.eval.evals = "frozen"
  config.eval.num_examples = 64
  config.eval.frozen.steps = 60
  config.eval.frozen.batch_size = 32
  sets = eval_sets.load(config)
  train, test = sets.classification_train, sets.classification
  assert train is not None and train.name == "jft_style_train" and test.name == "jft_style_eval"
  assert train.images.shape == test.images.shape == (64, 32, 32, 3)
  # Fashion-MNIST train and test are different images.
  test_rows = {row.tobytes() for row in test.images}
  assert not any(row.tobytes() in test_rows for row in train.images)

  predictor = PatchTokens()
  metrics = evaluate.run(predictor, config, step=0, datasets=sets)
  trained_on, scored_on = predictor.seen
  np.testing.assert_array_equal(trained_on, train.images)
  np.testing.assert_array_equal(scored_on, test.images)
  assert metrics["frozen/from_train_split"] == 1.0
  assert metrics["frozen/train_examples"] == metrics["frozen/test_examples"] == 64
  # Pixel patches of clothing carry the class: well above chance (0.1) on held-out images.
  assert metrics["frozen/accuracy"] > 0.3, metrics


def test_without_a_train_split_the_probe_splits_the_eval_examples():
  sets = eval_sets.synthetic(image_size=16, num_examples=40)
  assert sets.classification_train is None
  from configs import tiny

  config = tiny.get_config()
  config.eval.evals = "frozen"
  config.eval.num_examples = 24
  config.eval.frozen.steps = 2
  config.eval.frozen.batch_size = 8
  predictor = PatchTokens()
  metrics = evaluate.run(predictor, config, step=0, datasets=sets)
  trained_on, scored_on = predictor.seen
  assert metrics["frozen/from_train_split"] == 0.0
  assert metrics["frozen/train_examples"] == len(trained_on) == 12  # train_fraction 0.5
  assert metrics["frozen/test_examples"] == len(scored_on) == 12
  # The two halves are disjoint and together the first num_examples eval images.
  together = {row.tobytes() for row in np.concatenate([trained_on, scored_on])}
  assert together == {row.tobytes() for row in sets.classification.images[:24]}


def test_the_probe_pools_with_the_vision_towers_head_count():
  """The probe reads the image encoder's tokens; it used config.model.heads (the text
  side's), which need not divide the vision width (open_clip L/14: 12 vs 1024)."""
  sets = eval_sets.synthetic(image_size=16, num_examples=16)
  from configs import tiny

  config = tiny.get_config()
  config.eval.evals = "frozen"
  config.eval.num_examples = 16
  config.eval.frozen.steps = 1
  config.eval.frozen.batch_size = 8
  config.model.heads = 5  # does not divide the 192-wide patch tokens
  config.model.vision.heads = 4
  metrics = evaluate.run(PatchTokens(), config, step=0, datasets=sets)
  assert metrics["frozen/test_examples"] == 8
