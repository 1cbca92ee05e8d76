"""Parameter trees: path names and counts by component, without allocating anything.

    python -m coca_jax.params --config=configs/base.py

Prints a breakdown and a final JSON line
{"total": ..., "image_encoder": ..., "text_decoder": ..., "poolers": ..., "projections": ...,
"task_heads": ...} (task_heads: the VQA and video heads of a finetune; 0 for the paper's models).
"""

import json
import math

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from coca_jax import config as config_lib
from coca_jax import console
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
  "vqa_head": "task_heads",
  "video_head": "task_heads",
}


def path_names(keypath) -> tuple[str, ...]:
  """A pytree key path (dict keys, attributes, indices) as a tuple of strings."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath)


def count_by_path(params) -> dict[str, int]:
  """{"vision/blocks/...": n, ...} for every leaf of a params tree (arrays or
  ShapeDtypeStructs, e.g. `abstract(model_config)` or a StateLayout's abstract params)."""
  return {
    "/".join(path_names(path)): math.prod(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def total(params) -> int:
  """Number of parameters (scalars) in a params tree."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def nbytes(tree) -> int:
  """Bytes of a pytree of arrays or ShapeDtypeStructs (a train state: params and
  optimizer state), as stored."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract(model_config) -> dict:
  """The model's params as ShapeDtypeStructs (nested dict), nothing allocated."""
  return nnx.state(nnx.eval_shape(lambda: coca.build(model_config)), nnx.Param).to_pure_dict()


def count(params) -> dict[str, int]:
  """{"total", "image_encoder", "text_decoder", "poolers", "projections", "task_heads"} of
  a params tree."""
  counts = dict(total=0, **dict.fromkeys(COMPONENTS.values(), 0))
  for path, n in count_by_path(params).items():
    top = path.split("/")[0]
    if top not in COMPONENTS:
      raise ValueError(f"parameter {path}: top-level module {top!r} is not in params.COMPONENTS")
    counts[COMPONENTS[top]] += n
    counts["total"] += n
  return counts


def main(argv):
  console.quiet(start=False)  # abstract shapes only: no backend
  del argv
  if flags.FLAGS.config is None:
    raise app.UsageError("--config=FILE is required (e.g. --config=configs/base.py)")
  params = abstract(flags.FLAGS.config.model)
  by_path = count_by_path(params)
  groups: dict[str, int] = {}
  for path, n in by_path.items():
    key = "/".join(path.split("/")[:2])
    groups[key] = groups.get(key, 0) + n
  for key, n in sorted(groups.items()):
    print(f"{key:40s} {n:>15,d}")
  counts = count(params)
  for key, n in counts.items():
    print(f"{key:40s} {n:>15,d}  ({n / 1e6:.1f}M)")
  print(json.dumps(counts))


if __name__ == "__main__":
  # Defined only when run as a program: importing this module registers no flags.
  config_lib.configs_importable()
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  app.run(main, flags_parser=config_lib.parse_flags)
