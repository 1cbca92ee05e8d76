"""Host-local batches of the seqio mixture, in the model's batch format.

    {"image": [b, S, S, 3] float32,
     "text": {"ids":    [b, T] int32  BOS(=0), t1 .. tn, 0 ...
              "labels": [b, T] int32  t1 .. tn, EOS(=1), 0 ...
              "mask":   [b, T] int32  1 over the n + 1 real positions}}

with b = local batch, T = config.data.max_text_len, n <= T - 1 (longer texts are cut).

Sharding: each process reads only its data shard, `seqio.ShardInfo(shard_index,
num_shards)` where the caller passes the data-replica index of its devices (see
coca_jax.sharding.host_data_shard), not blindly the process index.

Determinism and resume: with `config.data.seed` the batch sequence is a pure function of
the seed and the shard (seeded shuffles, stateless random augmentation and mixture
sampling, tf.data's deterministic order). Resuming at step k skips k batches of the same
sequence (`Dataset.skip`): exact, and costs the input work of k batches (about k / the
pipeline's batches per second — seconds for the demo, a real cost for long runs on
slow hosts); only the step is stored in the checkpoint.
"""

import logging
import os
from typing import Iterator

import seqio
import tensorflow as tf

from coca_jax.data import preprocess, tasks


def to_model_batch(text: tf.Tensor, max_len: int) -> dict:
  """Token ids [n] -> ids, labels, mask [max_len] (see the module docstring)."""
  tokens = text[: max_len - 1]
  n = tf.shape(tokens)[0]
  pad = max_len - 1 - n
  ids = tf.concat([[0], tokens, tf.zeros([pad], tf.int32)], 0)
  labels = tf.concat([tokens, [1], tf.zeros([pad], tf.int32)], 0)
  mask = tf.cast(tf.range(max_len) <= n, tf.int32)
  return dict(ids=ids, labels=labels, mask=mask)


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
      "config.data.data_dir is empty: call coca_jax.data.prepare.ensure_demo_data(config.data) first"
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
  max_len = data_config.max_text_len
  ds = ds.map(
    lambda ex: dict(image=ex["image"], text=to_model_batch(ex["text"], max_len)),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.with_options(_options(data_config)).prefetch(2)


def _numpy_batches(ds: tf.data.Dataset, start_step: int) -> Iterator[dict]:
  reported = dict(preprocess.BAD_DATA)
  for batch in ds.skip(start_step).as_numpy_iterator():
    if dict(preprocess.BAD_DATA) != reported:
      reported = dict(preprocess.BAD_DATA)
      logging.warning(
        "input pipeline dropped rows so far: %s",
        ", ".join(f"{v} {k}" for k, v in sorted(reported.items())),
      )
    yield batch


def train_batches(
  data_config, *, shard_index: int, num_shards: int, local_batch_size: int, start_step: int = 0
) -> Iterator[dict]:
  """Endless training batches of this host's shard, from `start_step` on."""
  mixture, _ = tasks.register(data_config)
  ds = _dataset(
    data_config, mixture, "train", shard_index, num_shards, local_batch_size, data_config.seed
  )
  return _numpy_batches(ds, start_step)


def eval_batches(
  data_config, *, shard_index: int, num_shards: int, local_batch_size: int
) -> Iterator[dict]:
  """Endless held-out batches (eval preprocessing, the sources' eval splits), always the
  same sequence for a given seed: eval losses are comparable across steps."""
  _, mixture = tasks.register(data_config)
  ds = _dataset(
    data_config,
    mixture,
    "validation",
    shard_index,
    num_shards,
    local_batch_size,
    data_config.seed + 1,
  )
  return _numpy_batches(ds, 0)


def bad_data_counts() -> dict:
  """Rows dropped so far in this process, by reason."""
  return dict(preprocess.BAD_DATA)


def vocab_size(vocab_path: str) -> int:
  if not os.path.exists(vocab_path):
    raise FileNotFoundError(f"config.data.vocab_path: no SentencePiece model at {vocab_path!r}")
  return seqio.SentencePieceVocabulary(vocab_path).vocab_size


def check_vocab(config) -> None:
  """The model's vocabulary must hold every id of the tokenizer."""
  n = vocab_size(config.data.vocab_path)
  if n > config.model.text.vocab_size:
    raise ValueError(
      f"config.model.text.vocab_size={config.model.text.vocab_size} is smaller than the "
      f"vocabulary at config.data.vocab_path ({n} pieces, {config.data.vocab_path})"
    )
