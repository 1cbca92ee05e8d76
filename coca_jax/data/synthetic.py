"""Synthetic batches in the training batch format, for benchmarks and trainer tests.

Selected by `config.data.source="synthetic"`. Row r of global batch k is a pure function
of (seed, k, r): resuming at step k is free and exact, and any split of the global batch
into host shards yields the same global batch (single- vs multi-process runs agree).
"""

from typing import Iterator, Sequence

import numpy as np

from coca_jax import tokens


def batch(
  seed: int,
  step: int,
  rows: Sequence[int],
  image_size: int,
  max_text_len: int,
  vocab_size: int,
  contract: tokens.Contract = tokens.PAPER,
) -> dict:
  """Global rows `rows` of batch `step`, in that order.

  Returns {"image": [b,H,W,3] f32, "text": {"ids","labels","mask": [b,T] int32}} with
  b = len(rows); texts of 0 .. W - 1 random tokens, W = contract.max_tokens(T) (the
  paper's contract: ids above EOS; any other: ids other than BOS, EOS and pad).
  """
  rngs = [np.random.default_rng((seed, step, int(row))) for row in rows]
  width = contract.max_tokens(max_text_len)
  if contract == tokens.PAPER:
    token_rows = np.stack([rng.integers(tokens.EOS_ID + 1, vocab_size, width) for rng in rngs])
  else:
    special = {contract.bos_id, contract.eos_id, contract.pad_id}
    plain = np.asarray([i for i in range(vocab_size) if i not in special], np.int32)
    token_rows = np.stack([plain[rng.integers(0, len(plain), width)] for rng in rngs])
  lengths = np.array([rng.integers(0, width) for rng in rngs])
  image = np.stack([rng.standard_normal((image_size, image_size, 3), np.float32) for rng in rngs])
  text = tokens.model_text(token_rows, lengths, max_text_len, contract)
  return dict(image=image, text=text)


def batches(
  config, rows: Sequence[int], *, start_step: int = 0, seed: int | None = None
) -> Iterator[dict]:
  """Endless host batches of global rows `rows` from `start_step` on, shaped by the config."""
  step = start_step
  while True:
    yield batch(
      config.data.seed if seed is None else seed,
      step,
      rows,
      config.model.vision.image_size,
      config.data.max_text_len,
      config.model.text.vocab_size,
      tokens.Contract.from_config(config),
    )
    step += 1
