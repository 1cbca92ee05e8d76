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
  first use, `data.data_dir` and `data.vocab_path` filled in (so config.json and exports
  name the real files) and the vocabulary checked against the model. Idempotent."""
  if config.data.source not in SOURCES:
    raise ValueError(f"config.data.source={config.data.source!r}; expected one of {SOURCES}")
  _check_vqa_head(config)
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
  if data.source == "video" and config.model.video.get("num_classes", 0) > 0:
    from coca_jax.data import video

    names = video.class_names(data)
    if len(names) > config.model.video.num_classes:
      raise ValueError(
        f"the video source has {len(names)} classes but config.model.video.num_classes="
        f"{config.model.video.num_classes}: labels past the head's classes make the loss NaN"
      )
  return config


def _check_vqa_head(config) -> None:
  """The VQA source needs the VQA head (its loss), and the head needs the source (the
  answer_scores it trains on)."""
  answers = config.model.get("vqa", {}).get("num_answers", 0)
  if config.data.source == "vqa" and answers <= 0:
    raise ValueError(
      f"config.data.source='vqa' needs config.model.vqa.num_answers > 0 (it is {answers}): "
      "without the head no VQA loss is trained"
    )
  if answers > 0 and config.data.source != "vqa":
    raise ValueError(
      f"config.model.vqa.num_answers={answers} adds a VQA head, which trains on "
      f"config.data.source='vqa' batches (answer scores); the source is "
      f"{config.data.source!r}"
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
