"""Host-local batches of the seqio mixture, in the model's batch format.

    {"image": [b, S, S, 3] float32, "text": {"ids", "labels", "mask": [b, T] int32}}

with b = local batch, T = config.data.max_text_len; the text arrays follow the token
contract of coca_jax/tokens.py (texts longer than T - 1 tokens are cut).

Sharding: each process reads only its data shard, `seqio.ShardInfo(shard_index,
num_shards)` where the caller passes the data-replica index of its devices (see
coca_jax/data/loader.py), not blindly the process index.

Determinism and resume: with `config.data.seed` the batch sequence is a pure function of
the seed and the shard (seeded shuffles, stateless random augmentation and mixture
sampling, tf.data's deterministic order). Resuming at step k skips k batches of the same
sequence (`Dataset.skip`): exact, and costs the input work of k batches (about k / the
pipeline's batches per second — seconds for the demo, a real cost for long runs on
slow hosts); only the step is stored in the checkpoint.
"""

import logging
from typing import Iterator

import seqio
import tensorflow as tf

from coca_jax import tokens
from coca_jax.data import preprocess, tasks


def _options(data_config) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = data_config.max_intra_op_parallelism
  return options


def _dataset(
  data_config,
  mixture: str,
  split: str,
  shard_index: int,
  num_shards: int,
  local_batch_size: int,
  seed: int,
):
  if data_config.data_dir == "":
    raise ValueError(
      "config.data.data_dir is empty: resolve the config first (coca_jax.data.loader.resolve)"
    )
  tf.config.set_visible_devices([], "GPU")  # tf.data only; accelerators belong to JAX
  ds = seqio.get_mixture_or_task(mixture).get_dataset(
    sequence_length={"text": data_config.max_text_len - 1, "image": data_config.image_size},
    split=split,
    use_cached=False,
    shuffle=True,
    num_epochs=None,
    shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards),
    seed=seed,
  )
  width = data_config.max_text_len - 1  # room for BOS (inputs) / EOS (labels)

  def pad(example):
    text = example["text"][:width]
    length = tf.shape(text)[0]
    padded = tf.pad(text, [[0, width - length]], constant_values=tokens.PAD_ID)
    return dict(image=example["image"], tokens=padded, length=length)

  ds = ds.map(pad, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.with_options(_options(data_config)).prefetch(2)


def _numpy_batches(ds: tf.data.Dataset, start_step: int, max_len: int) -> Iterator[dict]:
  reported = dict(preprocess.BAD_DATA)
  for rows in ds.skip(start_step).as_numpy_iterator():
    text = tokens.model_text(rows["tokens"], rows["length"], max_len)
    batch = dict(image=rows["image"], text=text)
    if dict(preprocess.BAD_DATA) != reported:
      reported = dict(preprocess.BAD_DATA)
      logging.warning(
        "input pipeline dropped rows so far: %s",
        ", ".join(f"{v} {k}" for k, v in sorted(reported.items())),
      )
    yield batch


SPLITS = ("train", "eval")


def batches(
  data_config,
  split: str,
  *,
  shard_index: int,
  num_shards: int,
  local_batch_size: int,
  start_step: int = 0,
) -> Iterator[dict]:
  """Endless batches of this host's shard, from `start_step` on.

  split "train": the training mixture (random crops), seed config.data.seed. "eval": the
  sources' held-out splits with eval preprocessing, seed + 1, always the same sequence so
  that eval losses are comparable across steps.
  """
  if split not in SPLITS:
    raise ValueError(f"split {split!r}; expected one of {SPLITS}")
  train_mixture, eval_mixture = tasks.register(data_config)
  mixture, seqio_split, seed = (
    (train_mixture, "train", data_config.seed)
    if split == "train"
    else (eval_mixture, "validation", data_config.seed + 1)
  )
  ds = _dataset(data_config, mixture, seqio_split, shard_index, num_shards, local_batch_size, seed)
  return _numpy_batches(ds, start_step, data_config.max_text_len)


def bad_data_counts() -> dict:
  """Rows dropped so far in this process, by reason."""
  return dict(preprocess.BAD_DATA)
