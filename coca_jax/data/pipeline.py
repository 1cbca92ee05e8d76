"""Host-local batches of the CoCa data mixture, in the model's batch format.

    {"image": [b, S, S, 3] float32, "text": {"ids", "labels", "mask": [b, T] int32}}

with b = local batch, T = config.data.max_text_len; the text arrays follow the token
contract of coca_jax/tokens.py (`contract`, the paper's by default: texts longer than
T - 1 tokens are cut; T - 2 when EOS is an input).

Sharding: each process reads only its data shard, `seqio.ShardInfo(shard_index,
num_shards)` where the caller passes the data-replica index of its devices (see
coca_jax/data/loader.py), not blindly the process index.

Proportions (Section 4.1: every batch is half JFT-style, half alt-text): the global
batch of B = num_shards b rows holds exactly N_i rows of source i, N_i = B rate_i /
sum(rates) rounded by largest remainder (`source_counts`: floors, then one more row to
the largest remainders, ties to the source first in preprocess.KINDS), so the counts sum
to B; a source with rate 0, or whose rate rounds to 0 rows, is not read. Shard s's host
batch at step t holds n_i(s, t) of them (`shard_counts`: the rows of source i among the
positions of slice (s + t) mod S of the global layout below, S = num_shards): at every
step the shards take every slice once, so the n_i(s, t) sum to N_i over the shards and
the proportions do not depend on the number of hosts; over S steps each shard takes
every slice once, so every shard reads its part of each source at the same rate, N_i
rows per S steps (where the slices hold equal counts, the n_i(s, t) are the same at every
step). Which positions of a host batch each source fills (`batch_layout` of its counts)
spreads each source's rows evenly over it, so that a contiguous slice of it (a device's
rows) mixes the sources too (a strided one need not: rates 1:1 alternate the sources, so
micro-batches of every second row hold one source each); the losses do not depend on the
order (gradient accumulation is exact), and the layouts need no seed.

The pipeline of shard s, seed σ (config.data.seed; σ + 1 for "eval"), resuming at step k:

  rows of each source      seqio row task (coca_jax/data/tasks.py): the shard's rows,
                           unprocessed (encoded image bytes, text features), shuffled
                           in a buffer (seed σ) one pass at a time, repeated
  -> skip                  the resume: before batch k source i supplied the sum of
                           n_i(s, t) over t < k rows
  -> records               one structure for every source (preprocess.to_records)
  -> mixture               choose_from_datasets with the batch layouts, repeated
  -> enumerate(start=k b)  p: the row's position in the shard's sequence
  -> examples              decode, text, SentencePiece ids, crop/flip/normalize
                           (tasks.record_examples), seeds derived from (σ, s, p)
  -> batch(b)              rows `decode` rejected replaced by others of the batch from
                           the same source

Determinism: every random choice has a fixed seed (the row shuffle buffers) or is a
stateless function of the position (the text and image augmentation), the layouts are
a function of the step, and tf.data runs deterministically, so the batch sequence is a
pure function of (σ, shard).

Per-host augmentation: the example seeds fold in the shard index, so the k-th examples of
two hosts draw independent crops, flips, templates and label orders. The row stage keeps
seqio's seed σ on every host: when a source has fewer files than there are shards, seqio
shards its examples, which needs the same file order on every host; the shuffle buffers
then permute each host's own, disjoint rows.

Resume: batch k is a function of positions [k b, (k + 1) b) of the shard's sequence alone:
nothing after the row stage carries state across positions (seeds come from positions,
the layouts are a function of the step, the buffers hold unprocessed rows, and a
rejected row is replaced within its batch instead of pulling in the next row). Before
step k source i has supplied exactly the sum of n_i(s, t) over t < k rows ((k // S) N_i
and the counts of the last k mod S steps), so each source's row stream skips that many
before any per-row function runs: skipped rows are read and pass through the shuffle
buffer (about 10 µs a row for the demo), never converted, decoded or augmented; the
result is bitwise the uninterrupted sequence. Reading is still proportional to k (the
shuffle buffers must replay the row stream; skipping without reading would need random
access to the sources and a permutation in place of the buffers); only the step is stored
in the checkpoint.

seqio's Mixture.get_dataset (tf.data's sample_from_datasets) is not used for these
batches: it samples the source of each row at random, which gives the rates only on
average (about half each, not half of every batch), and mixing needs one structure for
all sources, i.e. a per-row conversion ahead of any point where a source could be
skipped. The rates are those of the registered Mixtures (config.data.rates).

Rejected rows (undecodable image, empty text; counted in preprocess.BAD_DATA, logged): in
these batches a rejected row is replaced by a copy of another row of its batch from the
same source (the Tasks of coca_jax/data/tasks.py drop them instead), so that the batch
boundaries stay put and the counts stay exact. A batch in which every row of a source is
rejected repeats that source's rows of the latest batch that had good ones (a host batch
may hold a single row of a source); only where no batch had one yet (a broken source) is
it an error. The repeat carries state from
batch to batch: a resume that needs it before its own batches supply it reads back up to
SPARE_LOOKBACK batches before its start (decoding them, the one case where a resume
decodes rows it skips), so it stays exact.
"""

import atexit
import functools
import hashlib
import logging
import math
import weakref
from fractions import Fraction
from typing import Iterator

import numpy as np
import seqio
import tensorflow as tf

from coca_jax import tokens
from coca_jax.data import preprocess, tasks


def derive_seed(*values) -> int:
  """A seed in [0, 2**63) that is a fixed function of `values` (ints and strings)."""
  digest = hashlib.sha256(repr(values).encode()).digest()
  return int.from_bytes(digest[:8], "little") >> 1


def stateless_key(seed: int, shard_index: int, purpose: str) -> tuple[int, int]:
  """A shard's stateless key for `purpose` ("examples")."""
  return tuple(derive_seed(seed, shard_index, purpose, i) for i in range(2))


def _fold_in(key, index) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(tf.constant(key, tf.int64), index, alg="philox")


def example_seeds(key, position) -> tf.Tensor:
  """[tasks.NUM_SEEDS, 2] int64 stateless seeds of the example at `position`."""
  return tf.random.experimental.stateless_split(
    _fold_in(key, position), tasks.NUM_SEEDS, alg="philox"
  )


def source_counts(rates, batch_size: int) -> dict[str, int]:
  """{source: rows of a batch of `batch_size`} for `rates` ({source: rate}, the form of
  config.data.rates), in preprocess.KINDS order: batch_size * rate / sum(rates) rounded by
  largest remainder (exact arithmetic; ties to the earlier source), summing to
  batch_size."""
  rates = dict(rates)
  unknown = sorted(set(rates) - set(preprocess.KINDS))
  if unknown:
    raise ValueError(
      f"config.data.rates={rates}: unknown source(s) {unknown} (known: {preprocess.KINDS})"
    )
  for kind, rate in rates.items():
    if not (math.isfinite(rate) and rate >= 0):
      raise ValueError(f"config.data.rates={rates}: {kind}={rate}; rates must be finite and >= 0")
  kinds = [kind for kind in preprocess.KINDS if kind in rates]
  exact = [Fraction(rates[kind]) for kind in kinds]
  total = sum(exact)
  if total == 0:
    raise ValueError(f"config.data.rates={rates}: all rates are 0; give a source a positive rate")
  if batch_size < 1:
    raise ValueError(f"batch size {batch_size}; expected at least 1 row")
  quotas = [batch_size * rate / total for rate in exact]
  counts = [math.floor(q) for q in quotas]
  # The rows left by the floors go to the largest remainders (stable sort: ties in order).
  by_remainder = sorted(range(len(kinds)), key=lambda i: counts[i] - quotas[i])
  for i in by_remainder[: batch_size - sum(counts)]:
    counts[i] += 1
  return dict(zip(kinds, counts))


def shard_counts(
  rates, local_batch_size: int, shard_index: int, num_shards: int, step: int = 0
) -> dict:
  """{source: rows of shard `shard_index`'s host batch at `step`}: the global batch's
  counts (`source_counts` of num_shards * local_batch_size rows) laid out over the global
  batch (`batch_layout`), then cut into num_shards contiguous slices, this shard taking
  slice (shard_index + step) mod num_shards. At every step the shards take every slice
  once, so each global batch holds the global counts exactly (rates 1:1 over 2 hosts of 3
  rows: 2 + 1 and 1 + 2 rows, 3:3 globally, where rounding per host gave 4:2); over
  num_shards steps each shard takes every slice once, so each reads its part of every
  source at the same rate (a fixed slice read one shard's part of a source twice as
  often as another's, and a shard whose slice held none of it never read its part)."""
  counts = source_counts(rates, local_batch_size * num_shards)
  layout = batch_layout(list(counts.values()))
  start = (shard_index + step) % num_shards * local_batch_size
  mine = layout[start : start + local_batch_size]
  return dict(zip(counts, np.bincount(mine, minlength=len(counts)).tolist()))


def batch_layout(counts) -> np.ndarray:
  """[sum(counts)] int64: the source index of each position of a batch in which source i
  fills counts[i] positions, spread evenly: its j-th row sits at fraction (j + 1/2) /
  counts[i] of the batch, ties to the earlier source ([1, 1] -> 0 1; [3, 1] -> 0 0 1 0)."""
  sources = np.concatenate([np.full(n, i) for i, n in enumerate(counts)]).astype(np.int64)
  # (2j + 1) / (2 n) in float64 is exact enough: equal fractions give equal floats
  # (correctly rounded division) and different ones differ far above float64's precision.
  where = np.concatenate([(2 * np.arange(n) + 1) / (2 * n) for n in counts if n])
  return sources[np.lexsort((sources, where))]


def records(
  data_config,
  split: str,
  shard_index: int,
  num_shards: int,
  seed: int,
  local_batch_size: int,
  start_step: int,
):
  """The shard's endless record sequence from batch `start_step` on, as (position,
  record), and the batch layouts: layouts[t % num_shards] is batch t's, [b] index into
  `names` of each position's source (see the module docstring)."""
  # period[j]: the counts of the batches t with t % num_shards == j (`shard_counts`).
  period = [
    shard_counts(data_config.rates, local_batch_size, shard_index, num_shards, j)
    for j in range(num_shards)
  ]
  totals = {kind: sum(c[kind] for c in period) for kind in period[0]}  # the global counts
  sources = [
    (kind, task, totals[kind]) for kind, task, _ in tasks.row_tasks(data_config) if totals[kind]
  ]
  for kind, rate in dict(data_config.rates).items():
    if rate > 0 and not totals[kind]:
      logging.warning(
        "config.data.rates gives %s (rate %s) 0 of the %d rows of the global batch: not read",
        kind,
        rate,
        local_batch_size * num_shards,
      )
  names = [kind for kind, _, _ in sources]
  if shard_index == 0 and num_shards > 1:
    for _, task, _ in sources:
      _warn_of_uneven_files(task, split, num_shards)
  # Before batch k source i supplied N_i rows per num_shards batches, then the counts of
  # the batches since the last whole period.
  cycles, rest = divmod(start_step, num_shards)
  skips = [cycles * n + sum(period[j][kind] for j in range(rest)) for kind, _, n in sources]
  if start_step:
    logging.info(
      "input pipeline: resuming at step %d of shard %d, skipping rows %s of %s",
      start_step,
      shard_index,
      skips,
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
      num_epochs=1,
      trim_output_features=False,
    )
    # Repeated after seqio's shuffle, which reshuffles each pass (from seed σ): each pass
    # holds every row once. seqio's own num_epochs=None repeats before its buffer, which
    # mixes passes: 40 rows read from a 40-row eval split held 27 distinct ones.
    streams.append(preprocess.to_records(rows.repeat().skip(skip), kind))
  layouts = [batch_layout([counts[kind] for kind in names]) for counts in period]
  # Batches start_step, start_step + 1, ...: the period's layouts from start_step's on.
  order = [layouts[(start_step + t) % num_shards] for t in range(num_shards)]
  selector = tf.data.Dataset.from_tensor_slices(np.concatenate(order)).repeat()
  ds = tf.data.Dataset.choose_from_datasets(streams, selector)
  return ds.enumerate(start=start_step * local_batch_size), layouts, names


def _warn_of_uneven_files(task, split: str, num_shards: int) -> None:
  """seqio shards a source by whole files when it has at least as many as there are data
  shards: with a file count that num_shards does not divide, some shards hold one file
  more than others, and every shard reads at the same rate, so the examples of the
  smaller shards are read more often (3 files over 2 shards: one file's examples twice
  as often as the other two's)."""
  files = len(task.source.list_shards(split))
  if files >= num_shards and files % num_shards:
    logging.warning(
      "%s: %d files over %d data shards; seqio shards by whole files, so %d shards hold "
      "one file more, and the others' examples are read more often. A file count that "
      "the number of data shards divides (or files of about equal size) evens it out",
      task.name,
      files,
      num_shards,
      files % num_shards,
    )


def _dataset(
  data_config,
  split: str,
  shard_index: int,
  num_shards: int,
  local_batch_size: int,
  seed: int,
  start_step: int,
  contract: tokens.Contract = tokens.PAPER,
):
  """(batched rows, the batch layouts by step modulo num_shards, the names of its
  sources)."""
  if data_config.data_dir == "":
    raise ValueError(
      "config.data.data_dir is empty: resolve the config first (coca_jax.data.loader.resolve)"
    )
  tf.config.set_visible_devices([], "GPU")  # tf.data only; accelerators belong to JAX
  ds, layouts, names = records(
    data_config, split, shard_index, num_shards, seed, local_batch_size, start_step
  )
  example = tasks.record_examples(data_config, train=split == "train")
  key = stateless_key(seed, shard_index, "examples")
  width = contract.max_tokens(data_config.max_text_len)  # room for BOS / EOS

  def to_row(position, record):
    ex = example(record, example_seeds(key, position))
    text = ex["text"][:width]
    length = tf.shape(text)[0]
    padded = tf.pad(text, [[0, width - length]], constant_values=contract.pad_id)
    return dict(image=ex["image"], tokens=padded, length=length, keep=ex["keep"])

  ds = ds.map(to_row, num_parallel_calls=data_config.num_parallel_calls)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.with_options(tasks.dataset_options(data_config)).prefetch(2), layouts, names


def replace_rejected(
  rows: dict, step: int, layout: np.ndarray, names, spare: dict | None = None
) -> dict:
  """Rows whose `keep` is False -> copies of kept rows of the same batch and source (the
  source of position j is names[layout[j]]), in turn. A source none of whose rows in the
  batch was kept takes them from `spare` (source index -> (an earlier batch's rows, the
  indices of that source's kept ones)), where the mixture passes them: a host batch may
  hold one or two rows of a source, and one bad image must not stop the run."""
  keep = rows.pop("keep")
  if keep.all():
    return rows
  index = np.arange(len(keep))
  borrowed = {}
  for source in np.unique(layout[~keep]):
    mine = layout == source
    kept, rejected = np.flatnonzero(mine & keep), np.flatnonzero(mine & ~keep)
    if len(kept):
      index[rejected] = kept[np.arange(len(rejected)) % len(kept)]
    elif spare and source in spare:
      logging.warning(
        "input batch of step %d: all %d rows of source %r rejected; filled with its rows of "
        "an earlier batch",
        step,
        len(rejected),
        names[source],
      )
      borrowed[source] = rejected
    else:
      raise ValueError(
        f"input batch of step {step}: all {mine.sum()} rows of source {names[source]!r} "
        f"rejected (undecodable images or empty texts; so far {dict(preprocess.BAD_DATA)}), "
        "and no earlier batch of this run holds one to repeat: check the data (a source's "
        "rows are replaced only by its own rows, so that each batch holds each source's "
        "share exactly)"
      )
  out = {k: v[index] for k, v in rows.items()}
  for source, positions in borrowed.items():
    earlier, kept = spare[source]
    for k in out:
      out[k][positions] = earlier[k][kept[np.arange(len(positions)) % len(kept)]]
  return out


# Batches a resume reads back (decoding them) when a batch needs a source's rows of an
# earlier batch that this process has not read (`_numpy_batches`).
SPARE_LOOKBACK = 16


def _kept_by_source(keep: np.ndarray, layout: np.ndarray) -> dict:
  """Source index -> the indices of its kept rows, for sources with any."""
  return {s: np.flatnonzero((layout == s) & keep) for s in np.unique(layout[keep])}


_OPEN = weakref.WeakSet()  # batch generators started and not yet finished


def _closed_at_exit(generator_function):
  """`generator_function`, each generator it starts closed at interpreter exit if still
  open: one suspended over a tf.data iterator (a notebook's or script's global) had hung
  the process at exit, forever."""

  @functools.wraps(generator_function)
  def start(*args, **kwargs):
    generator = generator_function(*args, **kwargs)
    _OPEN.add(generator)
    return generator

  return start


@atexit.register
def _close_open_generators() -> None:
  for generator in list(_OPEN):
    generator.close()


@_closed_at_exit
def _numpy_batches(
  ds: tf.data.Dataset,
  start_step: int,
  max_len: int,
  layouts: list[np.ndarray],
  names,
  contract: tokens.Contract = tokens.PAPER,
  rows_from=None,
) -> Iterator[dict]:
  """rows_from(step): the batched rows from `step` on (a resume reads back up to
  SPARE_LOOKBACK batches with it when a batch needs a source's rows of an earlier batch,
  so that it gets those of the uninterrupted run)."""
  reported = dict(preprocess.BAD_DATA)
  spare = {}  # source -> (its latest batch with a kept row of it, their indices)
  looked_back = rows_from is None or start_step == 0
  for step, rows in enumerate(ds.as_numpy_iterator(), start_step):
    layout = layouts[step % len(layouts)]
    latest = _kept_by_source(rows["keep"], layout)
    if not looked_back and set(np.unique(layout[~rows["keep"]])) - set(latest) - set(spare):
      # Read back the batches before the resume; this run's own are newer and win.
      looked_back = True
      back, older = max(0, start_step - SPARE_LOOKBACK), {}
      for earlier_step, earlier in zip(
        range(back, start_step), rows_from(back).as_numpy_iterator()
      ):
        kept = _kept_by_source(earlier["keep"], layouts[earlier_step % len(layouts)])
        older.update({s: (earlier, indices) for s, indices in kept.items()})
      spare = {**older, **spare}
    rows = replace_rejected(rows, step, layout, names, spare)
    spare.update({s: (rows, indices) for s, indices in latest.items()})
    text = tokens.model_text(rows["tokens"], rows["length"], max_len, contract)
    batch = dict(image=rows["image"], text=text)
    if dict(preprocess.BAD_DATA) != reported:
      reported = dict(preprocess.BAD_DATA)
      logging.warning(
        "input pipeline rejected rows so far (replaced by other rows of their batch and "
        "source): %s",
        ", ".join(f"{v} {k}" for k, v in sorted(reported.items())),
      )
    yield batch


@_closed_at_exit
def row_batches(
  data_config,
  rows_task: str,
  split: str,
  example,
  *,
  shard_index: int,
  num_shards: int,
  local_batch_size: int,
  start_step: int = 0,
) -> Iterator[dict]:
  """Endless numpy batches of a one-source Task (the VQA and video sources), resumable
  like the mixture's: a resume preprocesses none of the rows it skips.

  `rows_task` is a registered Task of unprocessed rows (encoded images): this shard's
  rows (tasks.read: split "train" shuffled with seed config.data.seed, "eval" the
  held-out rows in order) skip the k b rows of the batches before `start_step`, then
  example(row, seeds) -> {..., "keep"} preprocesses each, `seeds` [tasks.NUM_SEEDS, 2]
  a stateless function of (seed, shard, position) as in the mixture; ragged features are
  padded per batch (0, "" or False); a row whose keep is False is replaced by another
  row of its batch (`replace_rejected`). Batch k is thus a function of positions
  [k b, (k + 1) b) alone: a resume gives bitwise the uninterrupted sequence, and the
  shuffle buffer holds encoded rows, not decoded pixels.
  """
  seed = data_config.seed + (split != "train")
  first = start_step * local_batch_size
  if start_step:
    logging.info(
      "input pipeline: resuming at step %d of shard %d, skipping %d rows of %s",
      start_step,
      shard_index,
      first,
      rows_task,
    )
  key = stateless_key(seed, shard_index, "examples")
  rows = tasks.read(rows_task, split, data_config, shard_index=shard_index, num_shards=num_shards)
  ds = rows.skip(first).enumerate(start=first)
  ds = ds.map(
    lambda position, row: example(row, example_seeds(key, position)),
    num_parallel_calls=data_config.num_parallel_calls,
  )
  ds = ds.padded_batch(local_batch_size, drop_remainder=True)
  ds = ds.with_options(tasks.dataset_options(data_config)).prefetch(2)
  layout, names = np.zeros(local_batch_size, np.int64), [rows_task]
  for step, batch in enumerate(ds.as_numpy_iterator(), start_step):
    rejected = int((~batch["keep"]).sum())
    if rejected:
      logging.warning(
        "input batch of step %d: %d rows of %s rejected (undecodable, or an empty text), "
        "replaced by other rows of the batch",
        step,
        rejected,
        rows_task,
      )
    yield replace_rejected(batch, step, layout, names)


SPLITS = ("train", "eval")


def batches(
  data_config,
  split: str,
  *,
  shard_index: int,
  num_shards: int,
  local_batch_size: int,
  start_step: int = 0,
  contract: tokens.Contract = tokens.PAPER,
) -> Iterator[dict]:
  """Endless batches of this host's shard, from `start_step` on.

  split "train": the sources' training splits (random crops), seed config.data.seed.
  "eval": their held-out splits with eval preprocessing, seed + 1, always the same
  sequence so that eval losses are comparable across steps. contract: the model's token
  contract (`tokens.Contract.from_config(config)`).
  """
  if split not in SPLITS:
    raise ValueError(f"split {split!r}; expected one of {SPLITS}")
  seqio_split, seed = (
    ("train", data_config.seed) if split == "train" else ("validation", data_config.seed + 1)
  )

  def rows_from(step: int) -> tf.data.Dataset:
    return _dataset(
      data_config, seqio_split, shard_index, num_shards, local_batch_size, seed, step, contract
    )[0]

  ds, layouts, names = _dataset(
    data_config, seqio_split, shard_index, num_shards, local_batch_size, seed, start_step, contract
  )
  max_len = data_config.max_text_len
  return _numpy_batches(ds, start_step, max_len, layouts, names, contract, rows_from)
