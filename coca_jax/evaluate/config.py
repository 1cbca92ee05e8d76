"""The `config.eval` section: which evaluations run during training and on exports."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict()
