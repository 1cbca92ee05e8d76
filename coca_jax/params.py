"""Parameter counts of a config, by component, without allocating anything.

    python -m coca_jax.params --config=configs/base.py

Prints a breakdown and a final JSON line
{"total": ..., "image_encoder": ..., "text_decoder": ..., "poolers": ..., "projections": ...}.
"""

import json

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from coca_jax.models import coca

# Top-level CoCa attribute -> the component it counts toward (the paper's Table 1 split).
COMPONENTS = {
  "vision": "image_encoder",
  "text": "text_decoder",
  "caption_pooler": "poolers",
  "contrastive_pooler": "poolers",
  "image_projection": "projections",
  "text_projection": "projections",
  "log_inv_temperature": "projections",
}


def count_by_path(model_config) -> dict[str, int]:
  """{"vision/blocks/...": n, ...} for every parameter, from an abstract model."""
  abstract = nnx.eval_shape(lambda: coca.build(model_config))
  params = nnx.state(abstract, nnx.Param)
  return {
    "/".join(str(k) for k in path): int(np.prod(leaf.shape))
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    for path in [[getattr(p, "key", getattr(p, "name", p)) for p in path]]
  }


def count(model_config) -> dict[str, int]:
  """{"total", "image_encoder", "text_decoder", "poolers", "projections"} parameter counts."""
  counts = dict(total=0, image_encoder=0, text_decoder=0, poolers=0, projections=0)
  for path, n in count_by_path(model_config).items():
    counts[COMPONENTS[path.split("/")[0]]] += n
    counts["total"] += n
  return counts


def main(argv):
  del argv
  by_path = count_by_path(flags.FLAGS.config.model)
  groups: dict[str, int] = {}
  for path, n in by_path.items():
    key = "/".join(path.split("/")[:2])
    groups[key] = groups.get(key, 0) + n
  for key, n in sorted(groups.items()):
    print(f"{key:40s} {n:>15,d}")
  counts = count(flags.FLAGS.config.model)
  for key, n in counts.items():
    print(f"{key:40s} {n:>15,d}  ({n / 1e6:.1f}M)")
  print(json.dumps(counts))


if __name__ == "__main__":
  # Defined only when run as a program: importing this module registers no flags.
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  app.run(main)
