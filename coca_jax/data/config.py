"""The `config.data` section: sources, mixture rates, preprocessing, vocabulary."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Defaults for the data section; config files override leaves."""
  return ml_collections.ConfigDict(
      dict(
          global_batch_size=256,
          max_text_len=64,
          vocab_path="",
          seed=0,
      )
  )
