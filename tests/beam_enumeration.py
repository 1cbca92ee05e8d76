"""Beam search's exact reference for the decoding tests (imported by name, as tiny_runs
is): the best hypothesis of a toy Markov chain by exhaustive enumeration."""

import itertools

import numpy as np


def gnmt(length: int, alpha: float) -> float:
  return ((5.0 + length) / 6.0) ** alpha


def enumerate_best(tables, max_length, alpha, contract, real, prefix=(), min_length=0):
  """The best hypothesis by brute force, in float64: every sequence of `real` tokens
  after the forced prefix that ends at its first stop id (EOS; pad too with
  stop_at_pad), at a length of min_length or more, or runs to max_length, scored by the
  log p of its generated tokens / gnmt(len, alpha). tables: [L, V, V]. -> (tokens
  [max_length] padded with pad, score, the second best score)."""
  stops = {contract.eos_id} | ({contract.pad_id} if contract.stop_at_pad else set())
  tables = np.asarray(tables, np.float64)
  scored = []
  for n in range(len(prefix) + 1, max_length + 1):
    for rest in itertools.product(real, repeat=n - len(prefix)):
      if stops & set(rest[:-1]) or (rest[-1] not in stops and n < max_length):
        continue
      if rest[-1] in stops and n < min_length:
        continue
      seq = (contract.bos_id, *prefix, *rest)
      log_p = sum(tables[i, seq[i], seq[i + 1]] for i in range(len(prefix), n))
      scored.append((log_p / gnmt(n, alpha), list(seq[1:])))
  scored.sort(key=lambda s: -s[0])
  (best_score, best), (second_score, _) = scored[:2]
  return best + [contract.pad_id] * (max_length - len(best)), best_score, second_score
