"""Orbax checkpoints of the train state: save, resume (onto any mesh), resolution change.

Layout: `<workdir>/checkpoints/<step>/{state,data}`: `state` is the train state pytree
(params, opt_state, step), `data` a JSON record of the input pipeline position. Orbax
writes each step to a temporary directory and renames it when complete, so a save that
was killed half-way is never listed by `latest_step` (and is cleaned up on the next
start).
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from coca_jax import params as params_lib
from coca_jax.models import vit
from coca_jax.state import StateLayout

POS_EMBEDDING = ("params", *vit.POS_EMBEDDING_PATH)


def manager(workdir: str, train_config, *, read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `<workdir>/checkpoints`, async, keeping the last N."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=train_config.keep_checkpoints,
    enable_async_checkpointing=not read_only,
    cleanup_tmp_directories=not read_only,
    create=not read_only,
    read_only=read_only,
  )
  return ocp.CheckpointManager(
    epath.Path(workdir) / "checkpoints",
    options=options,
    # Handlers named up front so a fresh manager can read item metadata before restoring.
    item_handlers=dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler()),
  )


def save(mngr: ocp.CheckpointManager, state: dict, data_position: dict) -> None:
  """Starts an async save of `state` at its step; returns before the write completes."""
  step = int(jax.device_get(state["step"]))
  mngr.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)
    ),
    force=True,
  )


def restore(mngr: ocp.CheckpointManager, layout: StateLayout, step: int | None = None):
  """Restores (state, data_position) at `step` (default: latest) into `layout`'s shardings.

  The target is the abstract state, so a checkpoint written on one mesh restores onto
  another. If the checkpoint was trained at another image size, the learned position
  embedding is resampled to the new patch grid and the optimizer moments that depend on
  its shape restart from zero. Returns None when there is no checkpoint.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  stored = mngr.item_metadata(step)["state"]
  stored_shapes = {
    params_lib.path_names(p): tuple(m.shape)
    for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]
  }
  replicated = jax.sharding.NamedSharding(layout.mesh, jax.sharding.PartitionSpec())
  mismatched = set()

  def restore_target(path, target):
    shape = stored_shapes.get(params_lib.path_names(path))
    if shape is None:
      raise ValueError(
        f"checkpoint step {step} has no entry {'/'.join(params_lib.path_names(path))}"
      )
    if shape == tuple(target.shape):
      return target
    mismatched.add(params_lib.path_names(path))
    return jax.ShapeDtypeStruct(shape, target.dtype, sharding=replicated)

  target = jax.tree_util.tree_map_with_path(restore_target, layout.abstract)
  restored = mngr.restore(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()),
  )
  state = restored["state"]
  if mismatched:
    state = _adapt_shapes(state, layout, mismatched)
  return state, restored["data"]


def _adapt_shapes(state, layout: StateLayout, mismatched: set) -> dict:
  """Resamples the position embedding; zeroes optimizer moments of changed shapes."""
  bad_params = [p for p in mismatched if p[0] == "params" and p != POS_EMBEDDING]
  if bad_params:
    raise ValueError(
      "checkpoint parameters do not match the config: "
      + ", ".join("/".join(p) for p in sorted(bad_params))
    )

  def adapt(path, value, target):
    key = params_lib.path_names(path)
    if key not in mismatched:
      return value
    if key == POS_EMBEDDING:
      logging.info("Resampling the position embedding %s -> %s", value.shape, target.shape)
      value = vit.resize_pos_embedding(jnp.asarray(value), target.shape[0])
    else:
      value = np.zeros(target.shape, target.dtype)
    return jax.device_put(value, target.sharding)

  return jax.tree_util.tree_map_with_path(adapt, state, layout.abstract)
