"""Held-out evaluation sets as plain arrays: what every evaluator consumes.

Legend: N examples, S image size, C classes.

- classification: the JFT-style source's eval split (Fashion-MNIST test for the demo)
  with its ClassLabel names, for zero-shot and frozen-feature evaluation;
- classification_train: the same source's train split (Fashion-MNIST train), read only
  when the frozen-feature eval is on: the probe trains on it and is scored on
  `classification` (None when the source has no train split apart from its eval split);
- alt_text: the alt-text source's eval split (emoji validation), each image with ALL its
  captions as references (one for the emoji; several for coco_captions' `captions/text`
  layout, see coca_jax/data/tasks.py), one image per distinct set of captions (the two
  vendors draw the same emoji under the same caption; keeping both would make
  text->image retrieval ambiguous), for retrieval and captioning.

All are read through the eval tasks (the eval preprocessing of coca_jax/data/images.py),
the first `config.eval.num_examples` rows (0: all) in the split's stored order, so every
evaluation (and every host) sees the same examples. `load` reads them once per config.
"""

import dataclasses
import functools
import json

import ml_collections
import numpy as np


@dataclasses.dataclass
class ClassificationSet:
  """images [N, S, S, 3] float32 preprocessed as in eval; labels [N] int; C class names."""

  images: np.ndarray
  labels: np.ndarray
  class_names: list[str]
  name: str = "classification"

  def take(self, n: int) -> "ClassificationSet":
    if not n:
      return self
    return dataclasses.replace(self, images=self.images[:n], labels=self.labels[:n])


@dataclasses.dataclass
class CaptionSet:
  """images [N, S, S, 3] float32 preprocessed; captions: N lists of reference strings."""

  images: np.ndarray
  captions: list[list[str]]
  name: str = "alt_text"

  def take(self, n: int) -> "CaptionSet":
    if not n:
      return self
    return dataclasses.replace(self, images=self.images[:n], captions=self.captions[:n])

  def flat_texts(self) -> tuple[list[str], np.ndarray]:
    """-> (all J captions, [J] index of each caption's image)."""
    return flat_texts(self.captions)


def flat_texts(captions: list[list[str]]) -> tuple[list[str], np.ndarray]:
  """N images' caption lists -> (all J captions, [J] index of each caption's image)."""
  texts = [c for caps in captions for c in caps]
  owner = np.asarray([i for i, caps in enumerate(captions) for _ in caps], np.int64)
  return texts, owner


@dataclasses.dataclass
class EvalSets:
  classification: ClassificationSet | None = None
  alt_text: CaptionSet | None = None
  classification_train: ClassificationSet | None = None


def synthetic(
  image_size: int, num_examples: int = 64, num_classes: int = 10, seed: int = 0
) -> EvalSets:
  """Random images with made-up class names and captions: for smoke tests and the
  synthetic training source (metrics near chance by construction)."""
  rng = np.random.default_rng(seed)
  names = [f"class {chr(ord('a') + c)}" for c in range(num_classes)]
  images = rng.standard_normal((num_examples, image_size, image_size, 3)).astype(np.float32)
  labels = rng.integers(0, num_classes, num_examples)
  words = ["red", "green", "blue", "smiling", "face", "cat", "dog", "flag", "heart", "star"]
  captions = [
    [" ".join(rng.choice(words, 3)) for _ in range(1 + i % 2)]  # 1 or 2 captions per image
    for i in range(num_examples)
  ]
  return EvalSets(
    classification=ClassificationSet(images, labels, names, name="synthetic_classes"),
    alt_text=CaptionSet(images, captions, name="synthetic_captions"),
  )


def load(config) -> EvalSets:
  """The config's held-out sets (synthetic ones for the synthetic source), read once per
  config: periodic evaluations and the final report reuse them."""
  return _load(config.to_json_best_effort(sort_keys=True))


@functools.lru_cache(maxsize=4)
def _load(config_json: str) -> EvalSets:
  config = ml_collections.ConfigDict(json.loads(config_json))
  # Only the sets the configured evals read: the frozen probe alone reads the train
  # split, a captioning finetune never reads the classification source, and the VQA,
  # video and benchmark evals read none (nor the run's data: an imported checkpoint's
  # config need not name any). (Parsed here, not through coca_jax.evaluate.suite, so
  # data never imports evaluate; the suite validates the names.) No evals (a bare
  # `load`): every held-out set.
  evals = {name.strip() for name in str(config.eval.evals).split(",")} - {""}
  classifies = not evals or bool(evals & {"zero_shot", "frozen"})
  captions = not evals or bool(evals & {"retrieval", "captioning"})
  probe_trains = "frozen" in evals
  if not (classifies or captions):
    return EvalSets()
  if config.data.source == "synthetic":
    return synthetic(config.model.vision.image_size, seed=config.data.seed)
  from coca_jax.data import loader

  config = loader.resolve(config)
  return EvalSets(
    classification=_classification(config, "validation") if classifies else None,
    alt_text=_alt_text(config) if captions else None,
    classification_train=(
      _classification(config, "train")
      if probe_trains and _has_train_split(config.data.jft_style)
      else None
    ),
  )


def _has_train_split(source_config) -> bool:
  """Whether a source (config.data.jft_style) has a train split apart from its eval split."""
  return bool(source_config.train_split) and source_config.train_split != source_config.eval_split


def _rows(config, kind: str, split: str = "validation"):
  """Rows of the eval task of `kind`; seqio split "train" reads the source's train_split,
  "validation" its eval_split (coca_jax/data/tasks.py)."""
  import seqio

  from coca_jax.data import tasks

  tasks.register(config.data)
  task = seqio.get_mixture_or_task(config.data[kind].task_name + tasks.EVAL_SUFFIX)
  ds = task.get_dataset(
    sequence_length=None, split=split, use_cached=False, shuffle=False, num_epochs=1
  )
  return ds.as_numpy_iterator()


def class_names(config) -> list[str]:
  """The ClassLabel names of the JFT-style source (a prepared TFDS dataset)."""
  from coca_jax.data import tasks

  return tasks.label_names(config.data)


def _describe(data_config, kind: str, split: str) -> str:
  """Where the eval rows of source `kind` ("jft_style", "alt_text") come from, as the
  config names them (seqio split "train" is the source's train_split, else eval_split)."""
  section = data_config[kind]
  if kind == "alt_text" and section.files:
    key = "eval_files" if section.eval_files else "files"
    return f"config.data.alt_text.{key}={section[key]!r}"
  key = "train_split" if split == "train" else "eval_split"
  return (
    f"config.data.{kind}.tfds_name={section.tfds_name!r} "
    f"(split config.data.{kind}.{key}={section[key]!r})"
  )


def _check_rows(count: int, config, kind: str, split: str) -> None:
  """An eval set needs a row: an empty split (or one whose every row the eval
  preprocessing rejects) otherwise reached the model as a [0]-shaped image batch."""
  if not count:
    from coca_jax.data import preprocess

    raise ValueError(
      f"the {kind} eval set is empty: {_describe(config.data, kind, split)} yields no row "
      "whose image decodes and whose text is not blank (rows rejected in this process so "
      f"far: {dict(preprocess.BAD_DATA)})"
    )


def _classification(config, split: str) -> ClassificationSet:
  """The first config.eval.num_examples rows of the JFT-style source's seqio `split`."""
  limit = config.eval.num_examples
  images, labels = [], []
  for row in _rows(config, "jft_style", split):
    images.append(row["image"])
    labels.append(int(row["label"]))
    if len(images) == limit:
      break
  _check_rows(len(images), config, "jft_style", split)
  return ClassificationSet(
    np.asarray(images, np.float32),
    np.asarray(labels),
    class_names(config),
    name=config.data.jft_style.task_name + ("_eval" if split == "validation" else "_train"),
  )


def _alt_text(config) -> CaptionSet:
  from coca_jax.data import preprocess

  limit = config.eval.num_examples
  images, captions, seen = [], [], set()
  for row in _rows(config, "alt_text"):
    # Every non-blank caption of the image is a reference (the eval task's `caption`:
    # [n] strings, preprocess.caption_list), blank by the rule that rejects a row.
    references = [c.decode().strip() for c in row["caption"] if not preprocess.is_blank(c)]
    if tuple(references) in seen:
      continue
    seen.add(tuple(references))
    images.append(row["image"])
    captions.append(references)
    if len(images) == limit:
      break
  _check_rows(len(images), config, "alt_text", "validation")
  return CaptionSet(
    np.asarray(images, np.float32), captions, name=f"{config.data.alt_text.task_name}_eval"
  )
