"""The one entry for data: a config ready to read, and global batches on a mesh.

    config = loader.resolve(config)          # once: demo data built, paths filled in
    for batch in loader.batches(config, mesh, "train", start_step): ...

`config.data.source` picks the rows: "mixture" (the seqio mixture of coca_jax/data, its
tasks registered once per data config), "synthetic" (coca_jax/data/synthetic.py),
"vqa" (the VQA task of coca_jax/data/vqa.py) or "video" (the clips of
coca_jax/data/video.py).
Splits: "train", and "eval" (held-out rows, the same sequence at every evaluation).

Each process reads only its data shard: the rows of the global batch that its devices
hold, wherever the mesh puts them (coca_jax.sharding.host_shard); its host batch is laid
out on its devices and assembled into global arrays (coca_jax.sharding.global_batch).
"""

import copy
import itertools
import logging
from typing import Iterator

from coca_jax import sharding, tokens

SOURCES = ("mixture", "synthetic", "vqa", "video")


def resolve(config):
  """A copy of `config` ready to read data: the source checked, the demo data built on
  first use, `data.data_dir`, `data.vocab_path` and (VQA) `data.vqa.answers` filled in
  (so config.json and exports name the real files and the head's answers) and the
  vocabulary checked against the model. Idempotent.
  The trainer also calls `check_files`, which reads the data."""
  if config.data.source not in SOURCES:
    raise ValueError(f"config.data.source={config.data.source!r}; expected one of {SOURCES}")
  check_heads(config)
  config = copy.deepcopy(config)
  if config.data.source == "synthetic":
    return config
  from coca_jax.data import prepare, vocab

  data = config.data
  data.data_dir = data.data_dir or prepare.default_data_dir()
  prepare.ensure(data)
  data.vocab_path = data.vocab_path or prepare.paths(data.data_dir)["vocab"]
  contract = tokens.Contract.from_config(config)
  special_ids = {
    f"config.model.text.{name}": getattr(contract, name) for name in ("bos_id", "eos_id", "pad_id")
  }
  vocab.check_fits(data.vocab_path, config.model.text.vocab_size, special_ids)
  if data.source == "vqa" and not data.vqa.get("answers"):  # the head exists: check_heads
    from coca_jax.data import vqa

    data.vqa.answers = tuple(vqa.answer_vocabulary(data, config.model.vqa.num_answers))
  if data.source == "video" and config.model.video.get("num_classes", 0) > 0:
    from coca_jax.data import video

    names = video.class_names(data)
    if len(names) > config.model.video.num_classes:
      raise ValueError(
        f"the video source has {len(names)} classes but config.model.video.num_classes="
        f"{config.model.video.num_classes}: labels past the head's classes make the loss NaN"
      )
  return config


def describe_split(data_config, source: str, split: str) -> str:
  """Where the rows of the VQA or video source's `split` ("train", else the eval split)
  come from, as the config names them (for messages)."""
  section = data_config[source]
  train = split == "train"
  if source == "video" and section.get("tfds_name"):
    key = "train_split" if train else "eval_split"
    return (
      f"config.data.video.tfds_name={section.tfds_name!r} "
      f"(split config.data.video.{key}={section[key]!r})"
    )
  if section.files:
    key = "eval_files" if not train and section.eval_files else "files"
    return f"config.data.{source}.{key}={section[key]!r}"
  key = "demo_fashion_train" if train else "demo_fashion_eval"
  return (
    f"the demo {source} files (config.data.{source}.files is empty; "
    f"config.data.{source}.{key}={section[key]})"
  )


def check_files(config) -> None:
  """The alt-text files of the mixture must start with a TFRecord of an Example (a file
  that is not TFRecords at all, found now, not at the first batch with a DataLossError
  naming no file), and the VQA or video source's files must each hold an example the
  pipeline keeps, found now: an empty split (or one whose every row is rejected) otherwise
  surfaced as a bare StopIteration at the first batch, or as numpy's "need at least one
  array to stack" at the first evaluation, after training. The trainer calls this before
  it builds anything; the evaluations do not (eval_set guards its own split; an export
  evaluated elsewhere need not have its run's training files). The mixture's prepared
  TFDS datasets must have the splits the config names (`tasks.check_splits`)."""
  data = config.data
  source = data.source
  if source == "mixture":
    from coca_jax.data import tasks

    for kind in ("jft_style", "alt_text"):
      if data.rates[kind] > 0 and not (kind == "alt_text" and data.alt_text.files):
        tasks.check_splits(data, kind)
    if data.alt_text.files:
      patterns = tasks.split_files(
        "config.data.alt_text", data.alt_text.files, data.alt_text.eval_files
      )
      for split in ("train", "validation"):
        if split == "train" or patterns[split] != patterns["train"]:
          where = "config.data.alt_text." + ("files" if split == "train" else "eval_files")
          _check_file(
            patterns[split],
            f"{where}={patterns[split]!r}",
            f"the alt-text {'train' if split == 'train' else 'eval'} split",
            tasks.ALT_TEXT_FEATURES,
            lambda row: True,
            "an image and a caption",
          )
  if source not in ("vqa", "video"):
    return
  section = data[source]
  if source == "video" and section.get("tfds_name"):
    return
  if not section.files:
    # The demo's files, built on first read: only the demo clips can come out empty (the
    # VQA demo's emoji questions do not depend on demo_fashion_*).
    for key in ("demo_fashion_train", "demo_fashion_eval") if source == "video" else ():
      if section[key] == 0:
        raise ValueError(
          f"config.data.video.{key}=0: that split of the demo clips would hold no clip; "
          "use a positive number of Fashion-MNIST images"
        )
    return
  from coca_jax.data import video, vqa

  module = vqa if source == "vqa" else video
  patterns = module.files(data)
  for split in ("train", "validation"):
    if split == "validation" and patterns[split] == patterns["train"]:
      continue  # no eval_files: the eval reads the training files, checked above
    _check_file(
      patterns[split],
      describe_split(data, source, split),
      f"the {source} {'train' if split == 'train' else 'eval'} split",
      module.FEATURES,
      lambda row: module.usable(row, data),
      module.USABLE,
    )


def _check_file(pattern, where, split, features, usable, needs) -> None:
  """Reads the TFRecords of `pattern` up to the first row `usable` accepts (usually the
  first); a ValueError naming `where` (the config key) if there is none, or no file."""
  import tensorflow as tf

  paths = tf.io.gfile.glob(pattern)
  if not paths:
    raise ValueError(f"{where} matches no file: {split} needs at least one")

  def parse(record):
    row = tf.io.parse_single_example(record, features)
    return {
      k: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v for k, v in row.items()
    }

  read = 0
  try:
    for row in tf.data.TFRecordDataset(paths).map(parse).as_numpy_iterator():
      read += 1
      if usable(row):
        return
  except tf.errors.OpError as e:
    raise ValueError(
      f"{where}: record {read + 1} cannot be read as a row of {split} "
      f"(features {sorted(features)}): {e.message}"
    ) from e
  files = f"{len(paths)} file{'s' if len(paths) > 1 else ''}"
  if not read:
    raise ValueError(f"{where} holds no examples ({files}, 0 records): {split} needs at least one")
  raise ValueError(
    f"{where}: none of its {read} examples ({files}) is usable, each needs {needs}: "
    f"{split} would be empty"
  )


# The task heads and the sources whose batches train them: (config.model section, its
# size key, the head's name in messages, config.data.source).
HEADS = (("vqa", "num_answers", "VQA", "vqa"), ("video", "num_classes", "video", "video"))


def check_heads(config) -> None:
  """The VQA and video sources need their heads (their losses), and each head needs its
  source: on other batches it would get no gradient, and its random weights would be
  exported and evaluated as if trained (the VQA head failed at trace time, on a missing
  answer_scores)."""
  for section, key, head, source in HEADS:
    size = config.model.get(section, {}).get(key, 0)
    if config.data.source == source and size <= 0:
      raise ValueError(
        f"config.data.source={source!r} needs config.model.{section}.{key} > 0 (it is "
        f"{size}): without the head no {head} loss is trained"
      )
    if size > 0 and config.data.source != source:
      raise ValueError(
        f"config.model.{section}.{key}={size} adds a {head} head, which trains on "
        f"config.data.source={source!r} batches; the source is {config.data.source!r}"
      )


def host_batches(config, mesh, split: str, start_step: int = 0) -> Iterator[dict]:
  """Endless host-local numpy batches of this process's shard (config resolved)."""
  shard = sharding.host_shard(mesh, config.sharding_rules, config.data.global_batch_size)
  logging.info(
    "data shard %d of %d, local batch %d: global rows %s",
    shard.index,
    shard.count,
    len(shard.rows),
    sharding.describe_rows(shard.rows),
  )
  return shard_batches(config, split, shard, start_step)


def shard_batches(config, split: str, shard, start_step: int = 0) -> Iterator[dict]:
  """Endless host-local numpy batches of data shard `shard` (a sharding.DataShard). A
  stream that ends is a RuntimeError naming the shard: seqio gives each shard whole files
  when there are at least as many files as shards, so one empty file empties a shard.
  Silently, that host would run out of batches and step out of the collectives (one eval
  batch short: a hang) while the others go on."""
  yield from _source_batches(config, split, shard, start_step)
  source = config.data.source
  where = describe_split(config.data, source, split) if source in ("vqa", "video") else source
  raise RuntimeError(
    f"the {split} input of data shard {shard.index} of {shard.count} ended: {where} gives "
    f"this shard no examples it keeps (an empty file among at least {shard.count} files: "
    "seqio gives each shard whole files; fewer examples than shards; or files holding "
    "only config.data.jft_style.held_out_classes). Remove empty files, or write the split "
    "as at least as many non-empty, shuffled files as data shards"
  )


def _source_batches(config, split: str, shard, start_step: int) -> Iterator[dict]:
  """The batches of `config.data.source` for `shard` (endless unless its files are empty)."""
  if config.data.source == "synthetic":
    from coca_jax.data import synthetic

    # Held-out rows the training run never sees: another seed.
    seed = config.data.seed + (split == "eval")
    return synthetic.batches(config, shard.rows, start_step=start_step, seed=seed)
  if config.data.source == "vqa":  # the VQA task (coca_jax/data/vqa.py)
    from coca_jax.data import vqa

    return vqa.batches(
      config,
      split,
      shard_index=shard.index,
      num_shards=shard.count,
      local_batch_size=len(shard.rows),
      start_step=start_step,
    )
  if config.data.source == "video":  # video clips (coca_jax/data/video.py)
    from coca_jax.data import video

    return video.batches(
      config,
      split,
      shard_index=shard.index,
      num_shards=shard.count,
      local_batch_size=len(shard.rows),
      start_step=start_step,
    )
  from coca_jax import tokens
  from coca_jax.data import pipeline  # TensorFlow is imported only when needed

  return pipeline.batches(
    config.data,
    split,
    shard_index=shard.index,
    num_shards=shard.count,
    local_batch_size=len(shard.rows),
    start_step=start_step,
    contract=tokens.Contract.from_config(config),  # the model's BOS / EOS / pad ids
  )


def batches(config, mesh, split: str, start_step: int = 0, limit: int | None = None):
  """Global batches (jax.Arrays sharded over the batch axis) from `start_step` on; at
  most `limit` of them (None: endless)."""
  rows = itertools.islice(host_batches(config, mesh, split, start_step), limit)
  return (sharding.global_batch(b, mesh, config.sharding_rules) for b in rows)
