"""VQA data: a seqio Task of (image, question, answers), the demo VQA set, host batches.

Legend: b local batch, S image size, T text length, A answer vocabulary.

Files: TFRecords of tf.train.Examples with `image` (encoded bytes), `question` (string)
and `answers` (strings, one per human annotator; an answer given by k annotators appears
k times), `config.data.vqa.files` / `eval_files`. Empty: the demo set that `build_demo`
writes under <data_dir>/vqa_demo/ from the demo sources' real labels (offline, ~20 s):

  Fashion-MNIST (first demo_fashion_train train images; first demo_fashion_eval TEST images)
    "what is this?"                -> [class, class, class, parent]   e.g. sneaker x3, footwear
    "which category is this?"      -> [parent] x 3                    e.g. footwear
  emoji (every train image; every VALIDATION image: held-out emoji, all skin tones)
    "which emoji group is this?"   -> [emojibase group] x 3           e.g. animals nature
    "which emoji subgroup is this?" -> [emojibase subgroup] x 3       e.g. animal mammal

The annotators are made up; their answers are the datasets' real labels. Triplicated
labels give full credit (min(3 / 3, 1)); the parent category as the 4th annotator of
"what is this?" gives 1/3 partial credit, as a human answering "footwear" for a sneaker
would in VQA. Eval images are never trained on (other split of each source).

Tasks (registered by `register`): NAME (training: random resized crop) and NAME_eval
(the one eval transform); output features `image` [S, S, 3] float32, `question` ids,
`answers` [n] strings. The answer vocabulary is the top config.model.vqa.num_answers
answers of the training files (`answer_vocabulary`).

Trainer batches (`batches`, config.data.source = "vqa"): {"image", "text": the question
as {"ids", "labels", "mask"} [b, T], "answer_scores": [b, A]}, read from NAME_rows: a
resume at step k skips k b rows undecoded (pipeline.row_batches), and the shuffle buffer
holds encoded images.
"""

import functools
import json
import os
import tarfile

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from coca_jax import tokens
from coca_jax.data import answers as vqa_answers
from coca_jax.data import images, loader, pipeline, prepare, preprocess, raw, tasks, vocab

DEMO_DIR = "vqa_demo"
# Rows per eval set that `eval_sets` holds in memory (288px float32: 0.5 GB).
EVAL_ROWS = 512
DEMO_SPLITS = {"train": "train.tfrecord", "validation": "validation.tfrecord"}
FEATURES = {
  # Missing: b"", a row the pipeline rejects and counts (it stopped the pipeline).
  "image": tf.io.FixedLenFeature([], tf.string, default_value=""),
  "question": tf.io.FixedLenFeature([], tf.string, default_value=""),
  "answers": tf.io.VarLenFeature(tf.string),
}
FASHION_QUESTIONS = ("what is this?", "which category is this?")
EMOJI_QUESTIONS = ("which emoji group is this?", "which emoji subgroup is this?")


# ---- the demo set ----


def _example(image: bytes, question: str, answers) -> bytes:
  feature = dict(
    image=tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
    question=tf.train.Feature(bytes_list=tf.train.BytesList(value=[question.encode()])),
    answers=tf.train.Feature(bytes_list=tf.train.BytesList(value=[a.encode() for a in answers])),
  )
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def emoji_groups(emojibase_tarball: str) -> dict[str, tuple[str, str]]:
  """{emoji code: (group, subgroup)} from emojibase-data (skin tones share their base's)."""
  with tarfile.open(emojibase_tarball) as tar:
    entries = json.load(tar.extractfile("package/en/data.json"))
    meta = json.load(tar.extractfile("package/meta/groups.json"))

  def name(table, key):
    return table[str(key)].replace("-", " ")

  groups = {}
  for entry in entries:
    if "group" not in entry:
      continue
    pair = (name(meta["groups"], entry["group"]), name(meta["subgroups"], entry["subgroup"]))
    groups[raw._code(entry["hexcode"])] = pair
    for skin in entry.get("skins") or ():
      groups[raw._code(skin["hexcode"])] = pair
  return groups


def _tfds_rows(tfds_dir: str, name_version: str, split: str):
  name, version = name_version.split(":")
  builder = tfds.builder_from_directory(os.path.join(tfds_dir, name, version))
  ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return builder, ds.as_numpy_iterator()


def demo_rows(data_config, split: str):
  """(image bytes, question, answers) of the demo VQA set's `split` ("train" or
  "validation"), from the prepared demo TFDS datasets."""
  data_dir = data_config.data_dir or prepare.default_data_dir()
  tfds_dir = prepare.paths(data_dir)["tfds"]
  fashion_split = "train" if split == "train" else data_config.jft_style.eval_split
  v = data_config.vqa
  limit = v.demo_fashion_train if split == "train" else v.demo_fashion_eval
  _, rows = _tfds_rows(tfds_dir, data_config.jft_style.tfds_name, fashion_split)
  for i, row in enumerate(rows):
    if i == limit:
      break
    label_names = [n.decode() for n in row["label_names"]]
    item, parent = label_names[0], label_names[-1]
    yield row["image"], FASHION_QUESTIONS[0], [item, item, item, parent]
    yield row["image"], FASHION_QUESTIONS[1], [parent] * 3
  emoji_split = "train" if split == "train" else data_config.alt_text.eval_split
  tarball = raw.tarball_path(prepare.paths(data_dir)["raw"], raw.NPM_PACKAGES["emojibase"])
  groups = emoji_groups(tarball)
  _, rows = _tfds_rows(tfds_dir, data_config.alt_text.tfds_name, emoji_split)
  for row in rows:
    pair = groups.get(row["code"].decode())
    if pair is None:
      continue
    yield row["image"], EMOJI_QUESTIONS[0], [pair[0]] * 3
    yield row["image"], EMOJI_QUESTIONS[1], [pair[1]] * 3


def demo_paths(data_config) -> dict[str, str]:
  data_dir = data_config.data_dir or prepare.default_data_dir()
  v = data_config.vqa
  # Named after the emoji dataset's version too: its split decides the emoji questions.
  emoji = data_config.alt_text.tfds_name.replace(":", "-")
  folder = os.path.join(
    data_dir, DEMO_DIR, f"fashion{v.demo_fashion_train}_{v.demo_fashion_eval}_{emoji}"
  )
  return {split: os.path.join(folder, file) for split, file in DEMO_SPLITS.items()}


def build_demo(data_config) -> dict[str, str]:
  """Writes the demo VQA TFRecords (idempotent); returns {split: path}."""
  paths = demo_paths(data_config)
  with prepare.exclusive(os.path.dirname(paths["train"])):  # the splits' one folder
    for split, path in paths.items():
      if os.path.exists(path):
        continue
      staging = path + ".tmp"
      with tf.io.TFRecordWriter(staging) as writer:
        for image, question, answers in demo_rows(data_config, split):
          writer.write(_example(image, question, answers))
      os.replace(staging, path)
  return paths


def files(data_config) -> dict[str, str]:
  """{"train", "validation"}: the file patterns of the VQA source (the demo's built)."""
  v = data_config.vqa
  if v.files:
    return tasks.split_files("config.data.vqa", v.files, v.eval_files)
  return build_demo(data_config)


# What a row needs for `usable` (in messages).
USABLE = (
  "an image that decodes, a non-blank question and at least one answer that the answer "
  "processing leaves non-empty"
)


def usable(row: dict, data_config=None) -> bool:
  """Whether a parsed row (numpy: "image" encoded, "question", "answers" [n] bytes) can be
  trained on and scored: the pipeline drops a blank question or an undecodable image
  (preprocess.decode), and a question without answers (`vqa_answers.has_answers`, the
  evaluation's rule) has no target and no accuracy."""
  del data_config  # the video source's `usable` needs it
  answers = [a.decode("utf-8", "replace") for a in row["answers"]]
  if not row["question"].strip() or not vqa_answers.has_answers(answers):
    return False
  try:
    images.decode(row["image"])
  except images.ImageError:
    return False
  return True


# ---- answers ----


def read_answers(pattern: str) -> tuple[list[str], list[list[str]]]:
  """(questions, answers) of every example of the files (images are not decoded)."""
  features = {"question": FEATURES["question"], "answers": FEATURES["answers"]}

  def dense(row):
    return dict(question=row["question"], answers=tf.sparse.to_dense(row["answers"]))

  ds = tasks.read_tf_examples(tf.io.gfile.glob(pattern), features).map(dense)
  questions, answers = [], []
  for row in ds.as_numpy_iterator():
    questions.append(row["question"].decode())
    answers.append([a.decode() for a in row["answers"]])
  return questions, answers


@functools.lru_cache(maxsize=4)
def _train_answers(pattern: str):
  return read_answers(pattern)


def train_questions_and_answers(data_config) -> tuple[list[str], list[list[str]]] | None:
  """(questions, answers) of the training files; None when no file matches the pattern
  (an export evaluated away from its training data)."""
  pattern = files(data_config)["train"]
  return _train_answers(pattern) if tf.io.gfile.glob(pattern) else None


def answer_vocabulary(data_config, num_answers: int) -> list[str]:
  """config.data.vqa.answers when the run or export has them (a ValueError unless there
  are `num_answers`), else the top `num_answers` answers of the training files
  (vqa_answers.answer_vocabulary)."""
  stored = list(data_config.vqa.get("answers", ()))
  if stored:
    if len(stored) != num_answers:
      raise ValueError(
        f"config.data.vqa.answers holds {len(stored)} answers but config.model.vqa."
        f"num_answers={num_answers}: the head's classes are these answers, in order"
      )
    return stored
  train = train_questions_and_answers(data_config)
  if train is None:
    raise ValueError(  # as loader.check_files says it
      f"the VQA answer vocabulary comes from the training files, and "
      f"config.data.vqa.files={data_config.vqa.files!r} matches no file (the config stores "
      "no vocabulary in config.data.vqa.answers)"
    )
  return vqa_answers.answer_vocabulary(train[1], num_answers)


# ---- seqio ----


def output_features(vocab_path: str) -> dict:
  passthrough = seqio.PassThroughVocabulary(size=0)
  return {
    "image": seqio.Feature(passthrough, add_eos=False, dtype=tf.float32, rank=3),
    "question": seqio.Feature(vocab.seqio_vocabulary(vocab_path), add_eos=False),
    "answers": seqio.Feature(passthrough, add_eos=False, dtype=tf.string, rank=1),
  }


def _rows(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Source rows -> {"image" encoded, "question", "answers" [n] strings} (dense)."""

  def convert(row):
    answers = row["answers"]
    if isinstance(answers, tf.SparseTensor):
      answers = tf.sparse.to_dense(answers)
    return dict(image=row["image"], question=row["question"], answers=answers)

  return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def example_fn(data_config, *, train: bool):
  """(row of `_rows`, seeds) -> {"image" [S, S, 3] float32, "question" ids,
  "question_pretokenized", "answers", "keep"}: training images randomly cropped (never
  flipped) with seeds[2:] of `seeds` [tasks.NUM_SEEDS, 2] (the mixture's convention),
  eval images through the one eval transform; keep False (counted in preprocess.BAD_DATA) when the
  image does not decode or the question is blank."""
  vocabulary = output_features(data_config.vocab_path)["question"].vocabulary
  # Never mirrored, whatever config.data.image.flip says (pretraining flips): the
  # question is not, and "what is on the left?" would get the wrong answer.
  train_options = dict(tasks.train_image_options(data_config), flip=False)
  eval_options = tasks.eval_image_options(data_config)

  def example(row, seeds=None):
    image, keep = preprocess.decode(row["image"], row["question"])
    if train:
      pixels = preprocess.train_pixels(image, seeds[2:], **train_options)
    else:
      pixels = preprocess.eval_pixels(image, **eval_options)
    return dict(
      image=pixels,
      question=vocabulary.encode_tf(row["question"]),
      question_pretokenized=row["question"],
      answers=row["answers"],
      keep=keep,
    )

  return example


def _preprocessors(data_config, *, train: bool) -> list:
  example = example_fn(data_config, train=train)
  if train:
    examples = seqio.map_over_dataset(num_seeds=tasks.NUM_SEEDS)(example)
  else:
    examples = seqio.map_over_dataset(example)

  # Named functions, not two lambdas on one line: AutoGraph cannot tell such lambdas
  # apart and warned twice per run ("found multiple definitions").
  def kept(row):
    return row["keep"]

  def without_keep(row):
    return {k: v for k, v in row.items() if k != "keep"}

  def drop_rejected(ds):
    return ds.filter(kept).map(without_keep)

  return [_rows, examples, drop_rejected]


def register(data_config) -> tuple[str, str]:
  """Registers NAME and NAME_eval over the VQA files, and NAME_rows (the rows
  unprocessed, which `batches` reads); -> (train, eval) task names."""
  name = data_config.vqa.task_name
  source = tasks.tf_example_source(files(data_config), FEATURES)
  features = output_features(data_config.vocab_path)
  passthrough = seqio.PassThroughVocabulary(size=0)
  row_features = {
    "image": seqio.Feature(passthrough, add_eos=False, dtype=tf.string, rank=0),
    "question": seqio.Feature(passthrough, add_eos=False, dtype=tf.string, rank=0),
    "answers": seqio.Feature(passthrough, add_eos=False, dtype=tf.string, rank=1),
  }
  return tasks.register_tasks(
    name,
    source,
    data_config,
    train=_preprocessors(data_config, train=True),
    held_out=_preprocessors(data_config, train=False),
    features=features,
    rows=[_rows],
    row_features=row_features,
  )


def _text(question_ids: list[np.ndarray], max_len: int, contract) -> dict[str, np.ndarray]:
  width = max(1, max(len(q) for q in question_ids))
  padded = np.zeros((len(question_ids), width), np.int32)
  for i, q in enumerate(question_ids):
    padded[i, : len(q)] = q
  lengths = np.asarray([len(q) for q in question_ids])
  return tokens.model_text(padded, lengths, max_len, contract)


def batches(
  config, split: str, *, shard_index: int, num_shards: int, local_batch_size: int, start_step=0
):
  """Endless host batches of the VQA task: {"image" [b,S,S,3], "text" (the question),
  "answer_scores" [b,A]}; split "train" (shuffled, augmented) or "eval" (held-out files).
  Its rows come from `pipeline.row_batches`, whose generators are closed at interpreter
  exit (a suspended one had hung it)."""
  data = config.data
  name, _ = register(data)
  vocabulary = answer_vocabulary(data, config.model.vqa.num_answers)
  contract = tokens.Contract.from_config(config)  # the model's BOS / EOS / pad ids
  example = example_fn(data, train=split == "train")

  def with_length(row, seeds):
    ex = example(row, seeds)
    return dict(ex, length=tf.size(ex["question"]), num_answers=tf.size(ex["answers"]))

  rows = pipeline.row_batches(
    data,
    name + tasks.ROWS_SUFFIX,
    split,
    with_length,
    shard_index=shard_index,
    num_shards=num_shards,
    local_batch_size=local_batch_size,
    start_step=start_step,
  )
  for batch in rows:
    # Answer lists are padded with "" to the batch's longest: each row's own count says
    # where its list ends, so a real "" answer still counts in n, as in the evaluation.
    answers = [
      [a.decode() for a in row[:n]] for row, n in zip(batch["answers"], batch["num_answers"])
    ]
    yield dict(
      image=batch["image"].astype(np.float32),
      text=tokens.model_text(batch["question"], batch["length"], data.max_text_len, contract),
      answer_scores=vqa_answers.answer_scores(answers, vocabulary),
    )


def eval_sets(config, rows: int = EVAL_ROWS):
  """The first config.eval.num_examples (0: all) held-out rows, as eval sets of at most
  `rows` rows each (0: one set of them all), read as they are consumed (a whole VQA v2
  val split, 214k questions at 288px, would be 213 GB of float32 images at once):
  {"images" [n,S,S,3], "text" {"ids","labels","mask"} [n,T], "questions", "answers",
  "source": where they come from (the config key, for messages)}. Rows without answers
  are kept: the evaluation counts them (evaluate/vqa.py). A ValueError when the split
  yields no row at all."""
  _, eval_name = register(config.data)
  source = loader.describe_split(config.data, "vqa", "eval")
  contract = tokens.Contract.from_config(config)
  empty = True
  for part in tasks.eval_parts(eval_name, config.data, config.eval.num_examples, rows):
    empty = False
    yield _eval_set(part, config.data.max_text_len, contract, source)
  if empty:
    raise ValueError(
      f"the VQA eval split has no example: {source} yields none whose image decodes and "
      f"whose question is not blank (rows rejected in this process so far: "
      f"{dict(preprocess.BAD_DATA)})"
    )


def _eval_set(rows, max_text_len: int, contract, source: str) -> dict:
  return dict(
    images=np.stack([r["image"] for r in rows]).astype(np.float32),
    text=_text([r["question"] for r in rows], max_text_len, contract),
    questions=[r["question_pretokenized"].decode() for r in rows],
    answers=[[a.decode() for a in r["answers"]] for r in rows],
    source=source,
  )


def eval_set(config) -> dict:
  """All the rows of `eval_sets` in one eval set (small splits, tests)."""
  return next(eval_sets(config, rows=0))
