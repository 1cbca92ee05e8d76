"""Synthetic batches in the training batch format, for benchmarks and trainer tests.

Selected by `config.data.source="synthetic"`. Row r of global batch k is a pure function
of (seed, k, r): resuming at step k is free and exact, and any split of the global batch
into host shards yields the same global batch (single- vs multi-process runs agree).
"""

from typing import Iterator

import numpy as np


def batch(
  seed: int,
  step: int,
  shard_index: int,
  local_batch_size: int,
  image_size: int,
  max_text_len: int,
  vocab_size: int,
) -> dict:
  """Rows [shard_index * b, (shard_index + 1) * b) of global batch `step`, b = local_batch_size.

  Returns {"image": [b,H,W,3] f32, "text": {"ids","labels","mask": [b,T] int32}}.
  """
  rows = range(shard_index * local_batch_size, (shard_index + 1) * local_batch_size)
  rngs = [np.random.default_rng((seed, step, row)) for row in rows]
  tokens = np.stack([rng.integers(3, vocab_size, max_text_len) for rng in rngs]).astype(np.int32)
  lengths = np.array([rng.integers(1, max_text_len) for rng in rngs])  # real tokens incl. EOS
  image = np.stack([rng.standard_normal((image_size, image_size, 3), np.float32) for rng in rngs])
  positions = np.arange(max_text_len)[None]
  mask = (positions < lengths[:, None]).astype(np.int32)
  labels = np.where(positions == lengths[:, None] - 1, 1, tokens) * mask  # EOS = 1
  ids = np.concatenate(
    [np.zeros((local_batch_size, 1), np.int32), labels[:, :-1]], axis=1
  )  # BOS = 0
  return dict(image=image, text=dict(ids=ids, labels=labels, mask=mask))


def batches(
  config, *, shard_index: int, local_batch_size: int, start_step: int = 0, seed: int | None = None
) -> Iterator[dict]:
  """Endless host batches from `start_step` on, shaped by `config.model` and `config.data`."""
  step = start_step
  while True:
    yield batch(
      config.data.seed if seed is None else seed,
      step,
      shard_index,
      local_batch_size,
      config.model.vision.image_size,
      config.data.max_text_len,
      config.model.text.vocab_size,
    )
    step += 1
