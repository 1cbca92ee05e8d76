"""seqio Tasks and Mixtures of the CoCa data, registered from `config.data`.

For each source (`jft_style`, `alt_text`; names from config) two Tasks are registered:
NAME (training preprocessing: random crop) and NAME_eval (resize + center crop), over
the same source; the seqio split "train" reads the source's `train_split`, "validation"
its `eval_split`. Mixtures: `coca_mixture` over the training tasks with
`config.data.rates`, `coca_mixture_eval` over the eval tasks with the same rates.

Sources: `seqio.TfdsDataSource` (image features read as encoded bytes and decoded by
preprocess.decode_and_validate), or, for alt-text with `alt_text.files` set, a
`seqio.TFExampleDataSource` over TFRecord files of (image bytes, caption) Examples.
"""

import functools
import os

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from coca_jax.data import preprocess

MIXTURE = "coca_mixture"
EVAL_MIXTURE = "coca_mixture_eval"
EVAL_SUFFIX = "_eval"
TF_EXAMPLE_FEATURES = {
  "image": tf.io.FixedLenFeature([], tf.string),
  "caption": tf.io.FixedLenFeature([], tf.string),
}


def output_features(vocab_path: str) -> dict:
  return {
    # Passed through untouched: float pixels, rank 3; without `dtype` seqio expects int32.
    "image": seqio.Feature(
      seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=tf.float32, rank=3
    ),
    "text": seqio.Feature(seqio.SentencePieceVocabulary(vocab_path), add_eos=False),
  }


def tfds_data_dir(data_config, source_config) -> str:
  return source_config.tfds_data_dir or os.path.join(data_config.data_dir, "tfds")


def source(data_config, kind: str) -> seqio.DataSource:
  """The data source of `kind` ("jft_style" or "alt_text") as the config describes it."""
  c = data_config[kind]
  if kind == "alt_text" and c.files:
    return seqio.TFExampleDataSource(
      split_to_filepattern=dict(train=c.files, validation=c.eval_files or c.files),
      feature_description=TF_EXAMPLE_FEATURES,
    )
  return seqio.TfdsDataSource(
    tfds_name=c.tfds_name,
    tfds_data_dir=tfds_data_dir(data_config, c),
    splits=dict(train=c.train_split, validation=c.eval_split),
    decoders={"image": tfds.decode.SkipDecoding()},
  )


def preprocessors(data_config, kind: str, *, train: bool) -> list:
  image = data_config.image
  size = data_config.image_size
  if kind == "jft_style":
    text_key, make_text = (
      "label_names",
      functools.partial(preprocess.jft_text, templates=tuple(data_config.jft_style.templates)),
    )
  else:
    text_key, make_text = "caption", preprocess.alt_text
  if train:
    to_image = functools.partial(
      preprocess.train_image,
      size=size,
      mean=tuple(image.mean),
      std=tuple(image.std),
      crop_area=tuple(image.crop_area),
      crop_aspect=tuple(image.crop_aspect),
      flip=image.flip,
    )
  else:
    to_image = functools.partial(
      preprocess.eval_image, size=size, mean=tuple(image.mean), std=tuple(image.std)
    )
  return [
    functools.partial(preprocess.decode_and_validate, text_key=text_key),
    make_text,
    preprocess.tokenize_text,
    to_image,
  ]


# The data config whose tasks are in seqio's registries now (as JSON): registering is
# skipped while it stays the same, so periodic evaluations do not rebuild the registry.
_registered = {"config": None}


def register(data_config) -> tuple[str, str]:
  """Registers the tasks and mixtures of `data_config` (again only when it changed);
  -> (train, eval) mixture names."""
  key = data_config.to_json_best_effort(sort_keys=True)
  if _registered["config"] == key:
    return MIXTURE, EVAL_MIXTURE
  features = output_features(data_config.vocab_path)
  train_tasks, eval_tasks = [], []
  for kind, rate in data_config.rates.items():
    if kind not in ("jft_style", "alt_text"):
      raise ValueError(f"config.data.rates: unknown task {kind!r} (known: jft_style, alt_text)")
    if rate <= 0:
      continue
    name = data_config[kind].task_name
    for task_name, train in ((name, True), (name + EVAL_SUFFIX, False)):
      seqio.TaskRegistry.remove(task_name)
      seqio.TaskRegistry.add(
        task_name,
        source=source(data_config, kind),
        preprocessors=preprocessors(data_config, kind, train=train),
        output_features=features,
        shuffle_buffer_size=data_config.shuffle_buffer,
      )
    train_tasks.append((name, rate))
    eval_tasks.append((name + EVAL_SUFFIX, rate))
  if not train_tasks:
    raise ValueError(
      f"config.data.rates: no task with a positive rate in {dict(data_config.rates)}"
    )
  for mixture, tasks in ((MIXTURE, train_tasks), (EVAL_MIXTURE, eval_tasks)):
    seqio.MixtureRegistry.remove(mixture)
    seqio.MixtureRegistry.add(mixture, tasks)
  _registered["config"] = key
  return MIXTURE, EVAL_MIXTURE
