"""Host-local batches of the CoCa data mixture, in the model's batch format.

    {"image": [b, S, S, 3] float32, "text": {"ids", "labels", "mask": [b, T] int32}}

with b = local batch, T = config.data.max_text_len; the text arrays follow the token
contract of coca_jax/tokens.py (texts longer than T - 1 tokens are cut).

Sharding: each process reads only its data shard, `seqio.ShardInfo(shard_index,
num_shards)` where the caller passes the data-replica index of its devices (see
coca_jax/data/loader.py), not blindly the process index.

The pipeline of shard s, seed σ (config.data.seed; σ + 1 for "eval"), resuming at step k
(P = k b rows skipped):

  rows of each source      seqio row task (coca_jax/data/tasks.py): the shard's rows,
                           unprocessed (encoded image bytes, text features), repeated,
                           shuffled in a buffer (seed σ)
  -> skip(c_i)             the resume: c_i = how many of positions [0, P) source i fills
  -> records               one structure for every source (preprocess.to_records)
  -> mixture               choose_from_datasets with a selector that is a stateless
                           function of the position p (source i with probability
                           rate_i / sum(rates), key derived from σ and s); the selector
                           starts at P
  -> enumerate(start=P)    p: the row's position in the shard's sequence
  -> examples              decode, text, SentencePiece ids, crop/flip/normalize
                           (tasks.record_examples), seeds derived from (σ, s, p)
  -> batch(b)              rows `decode` rejected replaced by others of the batch

Determinism: every random choice has a fixed seed (the row shuffle buffers) or is a
stateless function of the position (the source of each position, the text and image
augmentation), and tf.data runs deterministically, so the batch sequence is a pure
function of (σ, shard).

Per-host augmentation: the example seeds and the selector fold in the shard index, so the
k-th examples of two hosts draw independent crops, flips, templates, label orders and
sources. The row stage keeps seqio's seed σ on every host: when a source has fewer files
than there are shards, seqio shards its examples, which needs the same file order on every
host; the shuffle buffers then permute each host's own, disjoint rows.

Resume: batch k is a function of positions [k b, (k + 1) b) of the shard's sequence alone:
nothing after the row stage carries state across positions (seeds and sources come from
positions, the buffers hold unprocessed rows, and a rejected row is replaced within its
batch instead of pulling in the next row). Since the selector is stateless, the rows each
source supplies before position P are counted without reading anything (`rows_before`: a
vectorised pass over the selector, some 10^7 positions per second on a small CPU), and
each source's row stream skips its own count before any per-row function runs: skipped
rows are read and pass through the shuffle buffer (about 10 µs a row for the demo), never
converted, decoded or augmented; the result is bitwise the uninterrupted sequence.
Reading is still proportional to k (the shuffle buffers must replay the row stream;
skipping without reading would need random access to the sources and a permutation in
place of the buffers); only the step is stored in the checkpoint.

seqio's Mixture.get_dataset (tf.data's sample_from_datasets) is not used for these
batches: its sampling is a random stream replayed element by element (a tf.data function
call per row), and mixing needs one structure for all sources, i.e. a per-row conversion
ahead of any point where a source could be skipped. The rates are those of the registered
Mixtures (config.data.rates).

Rejected rows (undecodable image, empty text; counted in preprocess.BAD_DATA, logged): in
these batches a rejected row is replaced by a copy of another row of its batch (the Tasks
of coca_jax/data/tasks.py drop them instead), so that the batch boundaries stay put. A
batch whose every row is rejected is an error.
"""

import hashlib
import logging
from typing import Iterator

import numpy as np
import seqio
import tensorflow as tf

from coca_jax import tokens
from coca_jax.data import preprocess, tasks


def _options(data_config) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = data_config.max_intra_op_parallelism
  return options


def derive_seed(*values) -> int:
  """A seed in [0, 2**63) that is a fixed function of `values` (ints and strings)."""
  digest = hashlib.sha256(repr(values).encode()).digest()
  return int.from_bytes(digest[:8], "little") >> 1


def stateless_key(seed: int, shard_index: int, purpose: str) -> tuple[int, int]:
  """A shard's stateless key for `purpose` ("examples", "sources")."""
  return tuple(derive_seed(seed, shard_index, purpose, i) for i in range(2))


def _fold_in(key, index) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(tf.constant(key, tf.int64), index, alg="philox")


def example_seeds(key, position) -> tf.Tensor:
  """[tasks.NUM_SEEDS, 2] int64 stateless seeds of the example at `position`."""
  return tf.random.experimental.stateless_split(
    _fold_in(key, position), tasks.NUM_SEEDS, alg="philox"
  )


# The selector draws the sources of SELECTOR_BLOCK positions at a time (one tf.data
# function call per block, not per row).
SELECTOR_BLOCK = 4096


def _selector_block(key, rates):
  """block index -> [SELECTOR_BLOCK] int64: the source of each position of the block."""
  rates = np.asarray(rates, np.float64)
  bounds = tf.constant(np.cumsum(rates)[:-1] / rates.sum(), tf.float64)

  def block(index):
    u = tf.random.stateless_uniform(
      [SELECTOR_BLOCK], _fold_in(key, index), dtype=tf.float64, alg="philox"
    )
    return tf.searchsorted(bounds, u, side="right", out_type=tf.int64)

  return block


def selector(key, rates, start: int) -> tf.data.Dataset:
  """The endless sequence of sources from position `start` on."""
  first = start // SELECTOR_BLOCK
  ds = tf.data.Dataset.range(first, np.iinfo(np.int64).max)
  ds = ds.map(_selector_block(key, rates)).unbatch()
  return ds.skip(start - first * SELECTOR_BLOCK)


def rows_before(key, rates, position: int) -> np.ndarray:
  """How many of the positions [0, position) each source fills: the selector counted,
  nothing read."""
  block, n = _selector_block(key, rates), len(rates)
  full, rest = divmod(position, SELECTOR_BLOCK)
  counts = np.zeros(n, np.int64)

  def count(index):
    return tf.math.bincount(tf.cast(block(index), tf.int32), minlength=n, dtype=tf.int64)

  if full:
    blocks = tf.data.Dataset.range(full).map(count, num_parallel_calls=tf.data.AUTOTUNE)
    counts += blocks.reduce(tf.zeros([n], tf.int64), lambda a, b: a + b).numpy()
  if rest:
    counts += np.bincount(block(tf.constant(full, tf.int64)).numpy()[:rest], minlength=n)
  return counts


def records(data_config, split: str, shard_index: int, num_shards: int, seed: int, start: int):
  """The shard's endless record sequence from position `start` on, as (position, record)
  (see the module docstring)."""
  sources = tasks.row_tasks(data_config)
  rates = [rate for _, _, rate in sources]
  key = stateless_key(seed, shard_index, "sources")
  skips = rows_before(key, rates, start)
  if start:
    logging.info(
      "input pipeline: resuming at row %d of shard %d, skipping rows %s of %s",
      start,
      shard_index,
      skips.tolist(),
      [task.name for _, task, _ in sources],
    )
  streams = []
  for (kind, task, _), skip in zip(sources, skips):
    rows = task.get_dataset(
      sequence_length=None,
      split=split,
      use_cached=False,
      shuffle=True,
      seed=seed,
      shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards),
      num_epochs=None,
      trim_output_features=False,
    )
    streams.append(preprocess.to_records(rows.skip(int(skip)), kind))
  ds = tf.data.Dataset.choose_from_datasets(streams, selector(key, rates, start))
  return ds.enumerate(start=start)


def _dataset(
  data_config,
  split: str,
  shard_index: int,
  num_shards: int,
  local_batch_size: int,
  seed: int,
  start_step: int,
):
  if data_config.data_dir == "":
    raise ValueError(
      "config.data.data_dir is empty: resolve the config first (coca_jax.data.loader.resolve)"
    )
  tf.config.set_visible_devices([], "GPU")  # tf.data only; accelerators belong to JAX
  start = start_step * local_batch_size
  ds = records(data_config, split, shard_index, num_shards, seed, start)
  example = tasks.record_examples(data_config, train=split == "train")
  key = stateless_key(seed, shard_index, "examples")
  width = data_config.max_text_len - 1  # room for BOS (inputs) / EOS (labels)

  def to_row(position, record):
    ex = example(record, example_seeds(key, position))
    text = ex["text"][:width]
    length = tf.shape(text)[0]
    padded = tf.pad(text, [[0, width - length]], constant_values=tokens.PAD_ID)
    return dict(image=ex["image"], tokens=padded, length=length, keep=ex["keep"])

  ds = ds.map(to_row, num_parallel_calls=data_config.num_parallel_calls)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.with_options(_options(data_config)).prefetch(2)


def replace_rejected(rows: dict, step: int) -> dict:
  """Rows whose `keep` is False -> copies of kept rows of the same batch, in turn."""
  keep = rows.pop("keep")
  if keep.all():
    return rows
  kept = np.flatnonzero(keep)
  if not len(kept):
    raise ValueError(
      f"input batch of step {step}: all {len(keep)} rows rejected (undecodable images or "
      f"empty texts; so far {dict(preprocess.BAD_DATA)}); check the data"
    )
  source = np.arange(len(keep))
  rejected = np.flatnonzero(~keep)
  source[rejected] = kept[np.arange(len(rejected)) % len(kept)]
  return {k: v[source] for k, v in rows.items()}


def _numpy_batches(ds: tf.data.Dataset, start_step: int, max_len: int) -> Iterator[dict]:
  reported = dict(preprocess.BAD_DATA)
  for step, rows in enumerate(ds.as_numpy_iterator(), start_step):
    rows = replace_rejected(rows, step)
    text = tokens.model_text(rows["tokens"], rows["length"], max_len)
    batch = dict(image=rows["image"], text=text)
    if dict(preprocess.BAD_DATA) != reported:
      reported = dict(preprocess.BAD_DATA)
      logging.warning(
        "input pipeline rejected rows so far (replaced by other rows of their batch): %s",
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

  split "train": the sources' training splits (random crops), seed config.data.seed.
  "eval": their held-out splits with eval preprocessing, seed + 1, always the same
  sequence so that eval losses are comparable across steps.
  """
  if split not in SPLITS:
    raise ValueError(f"split {split!r}; expected one of {SPLITS}")
  seqio_split, seed = (
    ("train", data_config.seed) if split == "train" else ("validation", data_config.seed + 1)
  )
  ds = _dataset(
    data_config, seqio_split, shard_index, num_shards, local_batch_size, seed, start_step
  )
  return _numpy_batches(ds, start_step, data_config.max_text_len)


def bad_data_counts() -> dict:
  """Rows rejected so far in this process, by reason."""
  return dict(preprocess.BAD_DATA)
