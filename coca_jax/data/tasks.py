"""seqio Tasks and Mixtures of the CoCa data, registered from `config.data`.

For each source (`jft_style`, `alt_text`; names from config) three Tasks are registered:
NAME (training preprocessing: random crop), NAME_eval (resize + center crop) and NAME_rows
(the source's rows unprocessed: encoded image bytes and text features), over the same
source; the seqio split "train" reads the source's `train_split`, "validation" its
`eval_split`. Mixtures: `coca_mixture` over the training tasks with `config.data.rates`,
`coca_mixture_eval` over the eval tasks with the same rates.

The batches of the trainer (coca_jax/data/pipeline.py) come from the row tasks
(`row_tasks`): the pipeline fills each batch with them itself, in exactly the proportions
of the same rates, and runs the preprocessing (`record_examples`: the same functions as
NAME's and NAME_eval's, with seeds it derives from each example's position) after the
point where a resume skips, so that skipped rows are never processed. NAME, NAME_eval
and the mixtures serve seqio users and the eval sets (coca_jax/data/eval_sets.py); they
keep the source's other features (e.g. `label`).

Sources: `seqio.TfdsDataSource` (image features read as encoded bytes and decoded by
preprocess.decode), or, for alt-text with `alt_text.files` set, a `seqio.FileDataSource`
over TFRecord files of Examples with `image` (encoded bytes) and `caption` (one string,
or several: a bytes_list with one value per caption), read by `read_alt_text_files`: a
record that is not such an Example is dropped and counted, not a stop of the pipeline.

Alt-text layouts: every alt-text task starts with preprocess.caption_list, which reads the
layout off the rows (`caption`: the demo's emoji, TFRecords; `captions/text`: TFDS
coco_captions and datasets shaped like it, several captions per image) and gives each row
`caption` as [n] strings; no config key names the layout. Training draws one caption per
image and pass (preprocess.alt_caption), evaluation scores against all of them.

Held-out classes: the JFT-style rows naming a class of `jft_style.held_out_classes` are
dropped from NAME and NAME_rows (what training reads, and what the held-out losses read:
they are the trainer's batches of the eval split) and kept in NAME_eval, so that the
zero-shot eval can score classes the model never trained on.
"""

import functools
import itertools
import math
import os
import re
from typing import Iterator

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from coca_jax.data import preprocess, vocab

MIXTURE = "coca_mixture"
EVAL_MIXTURE = "coca_mixture_eval"
EVAL_SUFFIX = "_eval"
ROWS_SUFFIX = "_rows"


def output_features(vocab_path: str) -> dict:
  return {
    # Passed through untouched: float pixels, rank 3; without `dtype` seqio expects int32.
    "image": seqio.Feature(
      seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=tf.float32, rank=3
    ),
    "text": seqio.Feature(vocab.seqio_vocabulary(vocab_path), add_eos=False),
  }


_WARNED_EVAL_ON_TRAIN: set[tuple[str, str]] = set()


def split_files(key: str, files: str, eval_files: str) -> dict[str, str]:
  """{"train", "validation"} file patterns of a file source (`key`: its config section, for
  the message). Without eval_files the evaluation reads the training files: allowed (a
  quick check of a pipeline), but its metrics are then training-set metrics, so it warns
  (once per source and pattern)."""
  if not eval_files and (key, files) not in _WARNED_EVAL_ON_TRAIN:
    _WARNED_EVAL_ON_TRAIN.add((key, files))
    logging.warning(
      "%s.eval_files is empty: evaluation reads the training files (%s.files=%s); its "
      "losses and metrics are on training data",
      key,
      key,
      files,
    )
  return dict(train=files, validation=eval_files or files)


ALT_TEXT_FEATURES = {  # what `loader.check_files` reads the first record as
  "image": tf.io.FixedLenFeature([], tf.string, default_value=""),
  "caption": tf.io.VarLenFeature(tf.string),
}


def read_alt_text_files(paths) -> tf.data.Dataset:
  """TFRecord files of alt-text Examples -> rows {"image": encoded bytes (b"" when the
  Example has none: an undecodable, counted row), "caption": [n] strings (one value per
  caption; n may differ between Examples)}. Records that are not such an Example are
  dropped and counted (preprocess.parse_alt_text). A file that breaks off (a truncated
  or corrupted record) gives the records before the break, with TensorFlow's warning:
  one damaged shard of a web-scale set had stopped the run whenever the reader reached
  it, hours in, with an error naming neither file nor config key."""
  records = tf.data.TFRecordDataset(paths).ignore_errors(log_warning=True)
  rows = records.map(preprocess.parse_alt_text, num_parallel_calls=tf.data.AUTOTUNE)

  def well_formed(row, ok):
    del row
    return ok

  def row_of(row, ok):
    del ok
    return row

  return rows.filter(well_formed).map(row_of)


def read_tf_examples(paths, features: dict) -> tf.data.Dataset:
  """Examples of TFRecord files parsed with `features` (tf.io.parse_single_example's
  spec), the VQA and video sources: a record that does not parse (not an Example, a
  feature of another type or length) is dropped; it stopped the input pipeline with
  TensorFlow's parse error, naming neither file nor config key."""

  def parse(record):
    return tf.io.parse_single_example(record, features)

  parsed = tf.data.TFRecordDataset(paths).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
  return parsed.ignore_errors()


def tf_example_source(split_to_filepattern: dict, features: dict) -> seqio.FileDataSource:
  """A seqio source over TFRecord files of Examples (`read_tf_examples`)."""
  return seqio.FileDataSource(
    read_file_fn=functools.partial(read_tf_examples, features=features),
    split_to_filepattern=split_to_filepattern,
  )


def tfds_data_dir(data_config, source_config) -> str:
  return source_config.tfds_data_dir or os.path.join(data_config.data_dir, "tfds")


def source(data_config, kind: str) -> seqio.DataSource:
  """The data source of `kind` ("jft_style" or "alt_text") as the config describes it."""
  c = data_config[kind]
  if kind == "alt_text" and c.files:
    return seqio.FileDataSource(
      read_file_fn=read_alt_text_files,
      split_to_filepattern=split_files("config.data.alt_text", c.files, c.eval_files),
    )
  return seqio.TfdsDataSource(
    tfds_name=c.tfds_name,
    tfds_data_dir=tfds_data_dir(data_config, c),
    splits=dict(train=c.train_split, validation=c.eval_split),
    decoders={"image": tfds.decode.SkipDecoding()},
  )


def check_splits(data_config, kind: str) -> None:
  """ValueError naming config.data.<kind>.train_split / eval_split when the source's
  prepared TFDS dataset has no such split (TFDS slicing like "train[:90%]" allowed): a
  typo had surfaced at the first batch as TFDS's "Unknown split", naming no key. A
  dataset TFDS cannot find or that is not prepared is left to the reader's own error."""
  c = data_config[kind]
  try:
    builder = tfds.builder(c.tfds_name, data_dir=tfds_data_dir(data_config, c))
    prepared = builder.is_prepared()
  except Exception:  # any failure to find it: the reader names it
    return
  if not prepared:
    return
  for key in ("train_split", "eval_split"):
    try:
      builder.info.splits[c[key]]
    except (KeyError, ValueError) as e:
      raise ValueError(
        f"config.data.{kind}.{key}={c[key]!r} is not a split of {c.tfds_name}: {e}"
      ) from e


def row_features(kind: str) -> dict:
  """Output features of the row task of `kind`: the source's encoded image and text."""
  passthrough = seqio.PassThroughVocabulary(size=0)
  return {
    "image": seqio.Feature(passthrough, add_eos=False, dtype=tf.string, rank=0),
    preprocess.TEXT_KEYS[kind]: seqio.Feature(
      passthrough,
      add_eos=False,
      dtype=tf.string,
      rank=1,  # label names / captions
    ),
  }


def check_options(data_config) -> None:
  """ValueError naming the config key for augmentation and text settings that TensorFlow
  would reject only at a batch (a template drawn at random: any step) or accept silently:
  a reversed crop_area turned cropping off, std 0 made every pixel inf."""
  image = data_config.image
  area, aspect = tuple(image.crop_area), tuple(image.crop_aspect)
  if len(area) != 2 or not 0 < area[0] <= area[1] <= 1:
    raise ValueError(f"config.data.image.crop_area={area}: need 0 < low <= high <= 1")
  if len(aspect) != 2 or not 0 < aspect[0] <= aspect[1]:
    raise ValueError(f"config.data.image.crop_aspect={aspect}: need 0 < low <= high")
  for key in ("mean", "std"):
    values = tuple(image[key])
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
      raise ValueError(f"config.data.image.{key}={values}: need 3 finite numbers (R, G, B)")
  if min(image.std) <= 0:
    raise ValueError(f"config.data.image.std={tuple(image.std)}: every std must be > 0")
  check_templates(data_config.jft_style.templates, "data.jft_style.templates")
  for section in ("alt_text", "vqa", "video"):
    files, eval_files = data_config[section].files, data_config[section].eval_files
    if eval_files and not files:  # the source was the demo's (or TFDS's), its eval split too
      raise ValueError(
        f"config.data.{section}.eval_files={eval_files!r} needs config.data.{section}.files "
        "(the training files): without them the source is the demo's or TFDS's, and the "
        "evaluation read its split, not these files"
      )


def check_templates(templates, key: str) -> None:
  """ValueError naming config.<key> unless `templates` is a tuple of prompt templates,
  each with exactly one {} for a class name (no other braces)."""
  if isinstance(templates, str) or not templates:
    raise ValueError(
      f"config.{key}={templates!r}: need a tuple of templates, each with one {{}} for the "
      "class names"
    )
  for template in templates:
    if template.count("{}") != 1 or template.replace("{}", "").count("{"):
      raise ValueError(
        f"config.{key}: {template!r} needs exactly one {{}} for the class names, and no "
        "other braces (without it every class gets the same text)"
      )


def train_image_options(data_config) -> dict:
  """Keyword arguments of preprocess.train_pixels / train_image."""
  image = data_config.image
  return dict(
    size=data_config.image_size,
    mean=tuple(image.mean),
    std=tuple(image.std),
    crop_area=tuple(image.crop_area),
    crop_aspect=tuple(image.crop_aspect),
    flip=image.flip,
    resize=image.get("resize", "bilinear"),
  )


def eval_image_options(data_config) -> dict:
  """Keyword arguments of preprocess.eval_pixels / eval_image (configs written before
  `image.resize` existed resize bilinearly, as they did, in training too)."""
  image = data_config.image
  return dict(
    size=data_config.image_size,
    mean=tuple(image.mean),
    std=tuple(image.std),
    resize=image.get("resize", "bilinear"),
  )


def preprocessors(data_config, kind: str, *, train: bool) -> list:
  """The seqio preprocessors of the Task of `kind` (train or eval preprocessing)."""
  text_key = preprocess.TEXT_KEYS[kind]
  if kind == "jft_style":
    make_text = functools.partial(
      preprocess.jft_text, templates=tuple(data_config.jft_style.templates)
    )
  else:
    make_text = preprocess.alt_text_train if train else preprocess.alt_text
  if train:
    to_image = functools.partial(preprocess.train_image, **train_image_options(data_config))
  else:
    to_image = functools.partial(preprocess.eval_image, **eval_image_options(data_config))
  return [
    *row_preprocessors(data_config, kind, train=train),
    functools.partial(preprocess.decode_and_validate, text_key=text_key),
    make_text,
    preprocess.tokenize_text,
    to_image,
  ]


def row_preprocessors(data_config, kind: str, *, train: bool) -> list:
  """What every task of `kind` first does to the source rows: alt-text captions of
  either layout to [n] strings (preprocess.caption_list); in the tasks training reads
  (`train`: NAME and NAME_rows), JFT-style rows naming a class of
  `jft_style.held_out_classes` dropped, so that zero-shot on those classes is zero-shot
  (the eval task NAME_eval keeps every class).

  They end in seqio's cache placeholder, which makes them run before the source is
  repeated: a shard that keeps no row of an epoch (all its rows held out) then ends its
  stream (tf.data's repeat of an empty pass ends), an error (loader.shard_batches), where
  a filter after the repeat would search an endless stream forever and hang every host."""
  if kind == "alt_text":
    return [preprocess.caption_list, seqio.CacheDatasetPlaceholder()]
  names = functools.partial(with_label_names, data_config=data_config)
  held_out = tuple(data_config.jft_style.get("held_out_classes", ()))
  if train and held_out:
    return [
      names,
      functools.partial(preprocess.drop_labels, names=held_out),
      seqio.CacheDatasetPlaceholder(),
    ]
  return [names, seqio.CacheDatasetPlaceholder()]


def with_label_names(dataset: tf.data.Dataset, data_config) -> tf.data.Dataset:
  """JFT-style rows with `label_names` ([n] strings, the text's names): the source's own
  (the demo's: a class and its category), else the name of the `label` ClassLabel of a
  plain classification dataset (cifar10, food101, ... : [names[label]]); neither is an
  error naming config.data.jft_style.tfds_name (it was seqio's "missing expected output
  feature ... label_names" at the first batch)."""
  spec = dataset.element_spec
  if "label_names" in spec:
    return dataset
  key = f"config.data.jft_style.tfds_name={data_config.jft_style.tfds_name!r}"
  if "label" not in spec:
    raise ValueError(
      f"{key} has neither `label_names` (strings) nor a `label` ClassLabel, one of which "
      f"makes the JFT-style text; its features: {sorted(spec)}"
    )
  names = label_names(data_config)
  logging.info("%s: texts from its `label` ClassLabel names (%s, ...)", key, names[:3])
  table = tf.constant(names)
  return dataset.map(
    lambda row: {**row, "label_names": tf.reshape(tf.gather(table, row["label"]), [-1])},
    num_parallel_calls=tf.data.AUTOTUNE,
  )


def label_names(data_config) -> list[str]:
  """The ClassLabel names of the JFT-style source's `label` (a prepared TFDS dataset;
  `tfds_name` without ":version": its newest prepared version)."""
  c = data_config.jft_style
  name, _, version = c.tfds_name.partition(":")
  root = epath.Path(tfds_data_dir(data_config, c)) / name
  if not version:
    listed = root.iterdir() if root.exists() else ()
    versions = [p.name for p in listed if re.fullmatch(r"\d+\.\d+\.\d+", p.name)]
    if not versions:
      raise FileNotFoundError(
        f"config.data.jft_style.tfds_name={c.tfds_name!r}: {root} holds no prepared version"
      )
    version = max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))
  builder = tfds.builder_from_directory(str(root / version))
  return list(builder.info.features["label"].names)


def check_held_out(data_config) -> None:
  """Every name of `jft_style.held_out_classes` must be a class of the source: a misspelt
  one would hold nothing out. (Not checked when training reads no JFT-style rows: the
  source need not be prepared then.)"""
  held_out = tuple(data_config.jft_style.get("held_out_classes", ()))
  if not held_out or float(data_config.rates.get("jft_style", 0)) <= 0:
    return
  names = label_names(data_config)
  unknown = sorted(set(held_out) - set(names))
  if unknown:
    raise ValueError(
      f"config.data.jft_style.held_out_classes names {unknown}, not classes of "
      f"{data_config.jft_style.tfds_name} ({', '.join(names)})"
    )
  if set(held_out) >= set(names):
    raise ValueError(
      f"config.data.jft_style.held_out_classes holds out every class of "
      f"{data_config.jft_style.tfds_name}: training would read no JFT-style row (set "
      "config.data.rates.jft_style=0 to train without them)"
    )


# Seeds of one example in record_examples: 2 for the text (label order, template; an
# alt-text caption draw uses the first), 2 for the image (crop, flip).
NUM_SEEDS = 4


def row_tasks(data_config) -> list[tuple[str, seqio.Task, float]]:
  """(kind, row Task, rate) of each source with a positive rate, in preprocess.KINDS
  order; the tasks registered (`register`)."""
  register(data_config)
  return [
    (kind, seqio.get_mixture_or_task(data_config[kind].task_name + ROWS_SUFFIX), rate)
    for kind in preprocess.KINDS
    if (rate := float(data_config.rates.get(kind, 0))) > 0
  ]


def record_examples(data_config, *, train: bool):
  """The example stage over records (preprocess.to_records), as the pipeline runs it:
  (record, seeds) -> {"image", "text", "text_pretokenized", "keep"}, with `seeds` a
  [NUM_SEEDS, 2] int tensor of stateless seeds. The preprocessing of the Tasks
  (`preprocessors`), text made by the record's kind; a rejected row (`keep` False, counted
  in preprocess.BAD_DATA) still yields an example, from a 1x1 placeholder image, and is for
  the caller to replace."""
  vocabulary = output_features(data_config.vocab_path)["text"].vocabulary
  templates = tuple(data_config.jft_style.templates)
  train_options, eval_options = train_image_options(data_config), eval_image_options(data_config)

  def example(record, seeds):
    image, keep = preprocess.decode(record["image"], record["text_parts"])
    parts = record["text_parts"]
    makers = dict(
      jft_style=lambda: preprocess.jft_caption(parts, seeds[:2], templates),
      alt_text=lambda: preprocess.alt_caption(parts, seeds[0] if train else None),
    )
    text = tf.switch_case(record["kind"], [makers[kind] for kind in preprocess.KINDS])
    if train:
      pixels = preprocess.train_pixels(image, seeds[2:], **train_options)
    else:
      pixels = preprocess.eval_pixels(image, **eval_options)
    return dict(image=pixels, text=vocabulary.encode_tf(text), text_pretokenized=text, keep=keep)

  return example


# The data config whose tasks are in seqio's registries now (as JSON): registering is
# skipped while it stays the same, so periodic evaluations do not rebuild the registry.
_registered = {"config": None}


def read(
  task_name: str, split: str, data_config, *, shard_index=0, num_shards=1, num_epochs=None
) -> tf.data.Dataset:
  """Rows of the registered task `task_name` (the VQA and video sources: their tasks'
  preprocessed examples, or their NAME_rows tasks' unprocessed rows):
  split "train" shuffled (seed config.data.seed), any other split the task's "validation"
  rows in order; shard `shard_index` of `num_shards` (one shard reads every row and lists
  no files: TFDS mock data has none); num_epochs None: endless, shuffled one pass at a
  time (seqio's own repeat comes before its shuffle buffer and mixes passes; as
  pipeline.records). Not cached in memory (clips are large; a TFDS dataset's size may be
  unknown)."""
  train = split == "train"
  rows = seqio.get_mixture_or_task(task_name).get_dataset(
    sequence_length=None,
    split="train" if train else "validation",
    shuffle=train,
    seed=data_config.seed + (not train),
    shard_info=seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None,
    num_epochs=1 if num_epochs is None else num_epochs,
    use_cached=False,
    try_in_mem_cache=False,
  )
  return rows.repeat() if num_epochs is None else rows


def eval_parts(task_name: str, data_config, limit: int, size: int) -> Iterator[list[dict]]:
  """The first `limit` (0: all) eval rows of `task_name` (`read`) as numpy rows, in
  lists of at most `size` (0: one list of them all), read as they are consumed."""
  rows = read(task_name, "eval", data_config, num_epochs=1).as_numpy_iterator()
  if limit:
    rows = itertools.islice(rows, limit)
  part = []
  for row in rows:
    part.append(row)
    if len(part) == size:
      yield part
      part = []
  if part:
    yield part


def dataset_options(data_config) -> tf.data.Options:
  """Deterministic order (resumes replay the same rows); tf.data's intra-op threads
  capped by config.data.max_intra_op_parallelism so JAX keeps the host's cores."""
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = data_config.max_intra_op_parallelism
  return options


def register_tasks(
  name: str, task_source, data_config, *, train, held_out, features, rows, row_features
) -> tuple[str, str]:
  """Registers (anew) a source's three seqio tasks over `task_source`: `name`
  (preprocessors `train`) and name + EVAL_SUFFIX (`held_out`), both with `features`, and
  name + ROWS_SUFFIX (`rows`, `row_features`: the rows undecoded, which the row batches
  read); -> (train, eval) task names."""
  for task_name, preps, task_features in (
    (name, train, features),
    (name + EVAL_SUFFIX, held_out, features),
    (name + ROWS_SUFFIX, rows, row_features),
  ):
    seqio.TaskRegistry.remove(task_name)
    seqio.TaskRegistry.add(
      task_name,
      source=task_source,
      preprocessors=preps,
      output_features=task_features,
      shuffle_buffer_size=data_config.shuffle_buffer,
    )
  return name, name + EVAL_SUFFIX


def register(data_config) -> tuple[str, str]:
  """Registers the tasks and mixtures of `data_config` (again only when it changed);
  -> (train, eval) mixture names."""
  key = data_config.to_json_best_effort(sort_keys=True)
  if _registered["config"] == key:
    return MIXTURE, EVAL_MIXTURE
  check_options(data_config)
  check_held_out(data_config)
  features = output_features(data_config.vocab_path)
  train_tasks, eval_tasks = [], []
  for kind, rate in data_config.rates.items():
    if kind not in preprocess.KINDS:
      raise ValueError(f"config.data.rates: unknown task {kind!r} (known: jft_style, alt_text)")
    # Every source's tasks are registered (so that the eval sets can read a source the
    # run does not train on); the mixtures hold those with a positive rate.
    name = data_config[kind].task_name
    register_tasks(
      name,
      source(data_config, kind),
      data_config,
      train=preprocessors(data_config, kind, train=True),
      held_out=preprocessors(data_config, kind, train=False),
      features=features,
      rows=row_preprocessors(data_config, kind, train=True),
      row_features=row_features(kind),
    )
    if rate > 0:
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
