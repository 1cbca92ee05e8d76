"""Orbax checkpoints of the train state: save, resume (onto any mesh), resolution change.

Layout: `<workdir>/checkpoints/<step>/{state,data}`: `state` is the train state pytree
(params, opt_state, step), `data` a JSON record of the input pipeline position. Orbax
writes each step to a temporary directory and renames it when complete, so a save that
was killed half-way is never listed by `latest_step` (and is cleaned up on the next
start).

A complete step can still be unreadable (a file overwritten or truncated later), or read
well and hold other values than were saved: each save records a fingerprint of every
array in `data` (`fingerprint.of`), and a restore compares them (`check_values`). Resuming
reads an unreadable step a second time (`RETRY_S` later: a passing storage error), then
skips it (a damaged one at once), newest first, with a warning naming it, and restores
the newest step that every process can read; the skipped steps stay where they are
until the resumed run saves: its first save moves every step at or above the one it
writes to `<workdir>/skipped_checkpoints/` (Orbax would not overwrite them, and they
must not count towards the checkpoints kept), then writes.

A save that fails (a full disk, a read-only file system) stops the run with a SaveError
naming the cause and the steps still intact; `check_writable` refuses a checkpoint
directory that cannot take a file, or (on a local disk) one checkpoint, before any step.
"""

import functools
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from coca_jax import config as config_lib
from coca_jax import fingerprint, optim
from coca_jax import params as params_lib
from coca_jax.models import vit
from coca_jax.state import StateLayout

POS_EMBEDDING = ("params", *vit.POS_EMBEDDING_PATH)
STATE, DATA = "state", "data"  # the items of a step
FINGERPRINTS = "fingerprints"  # the data item's record of the state's values (`fingerprint`)
SKIPPED_DIR = "skipped_checkpoints"  # in the workdir, next to `checkpoints`
RETRY_S = 2.0  # before reading an unreadable step a second time
# Orbax writes an array replicated over R devices in R slices, one per replica ("replica
# parallel"), cutting each slice with an eager jax op: one compile per slice shape at the
# first save, a dispatch per slice at every save. Only arrays whose slice is at least
# this big are cut; the others are written whole by one replica. Tiny config on 8 CPU
# devices: first save 13.75 -> 0.25 s (257 compiles -> none), later saves 1.1-1.8 -> 0.2-0.6
# s (2 cores).
MIN_REPLICA_SLICE_BYTES = 1 << 20


class UnreadableCheckpointError(ValueError):
  """A checkpoint step (or every step) whose metadata or arrays cannot be read; `reason`:
  the underlying error."""

  def __init__(self, message: str, reason: str = ""):
    super().__init__(message)
    self.reason = reason or message


class SaveError(RuntimeError):
  """Writing a checkpoint or an export failed; what was written before it is intact."""


# What XLA and TensorStore say when a read runs out of host or device memory.
OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory")


def short_reason(error: Exception, limit: int) -> str:
  """`error` as "Type: message", cut after `limit` characters (Orbax's can run long)."""
  reason = f"{type(error).__name__}: {error}"
  return reason if len(reason) <= limit else reason[:limit] + " ..."


def unreadable(path: epath.Path, error: Exception, limit: int = 2000) -> Exception:
  """The error to raise for `error`, met reading the checkpoint at `path`: an
  UnreadableCheckpointError (its `reason`: `error`, shortened), which a resume answers by
  skipping the step; a MemoryError when the reader ran out of memory, which says nothing
  of the files, so it stops the run instead of having a good step skipped (and set
  aside by the next save)."""
  reason = short_reason(error, limit)
  if isinstance(error, MemoryError) or any(s in str(error) for s in OUT_OF_MEMORY):
    return MemoryError(
      f"reading checkpoint {path} ran out of memory ({reason}); the checkpoint is not "
      "known to be damaged and was left as it is: free memory (or use more hosts) and rerun"
    )
  return UnreadableCheckpointError(f"checkpoint {path} cannot be read: {reason}", reason)


def absolute(path) -> epath.Path:
  """`path` as Orbax takes it: a local path made absolute (Orbax refuses relative ones:
  `--workdir=run` had failed at the first checkpoint save), a URL (gs://...) as it is."""
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def manager(workdir: str, train_config, *, read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `<workdir>/checkpoints`, async, keeping the last
  config.train.keep_checkpoints (>= 1, `check_keep`) steps."""
  if not read_only:
    check_keep(train_config)
  use_array_handler()
  options = ocp.CheckpointManagerOptions(
    max_to_keep=train_config.keep_checkpoints,
    enable_async_checkpointing=not read_only,
    cleanup_tmp_directories=not read_only,
    create=not read_only,
    read_only=read_only,
  )
  return ocp.CheckpointManager(
    absolute(workdir) / "checkpoints",
    options=options,
    # Handlers named up front so a fresh manager can read item metadata before restoring.
    item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler()},
  )


@functools.cache
def use_array_handler() -> None:
  """Registers, once per process, the jax.Array handler with MIN_REPLICA_SLICE_BYTES:
  Orbax's StandardCheckpointHandler (checkpoints here, exports in export.py) serialises
  jax.Arrays with the process-wide one."""
  ocp.type_handlers.register_type_handler(
    jax.Array,
    ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
    override=True,
  )


def check_keep(train_config) -> None:
  """ValueError unless config.train.keep_checkpoints is an integer >= 1: it is Orbax's
  max_to_keep, and 0 there deletes every checkpoint the run saves."""
  config_lib.check_positive(
    train_config.keep_checkpoints,
    "train.keep_checkpoints",
    " (the newest checkpoints kept; 0 would delete every checkpoint the run saves)",
  )


def step_path(mngr: ocp.CheckpointManager, step: int) -> epath.Path:
  """The directory of `step`: `<workdir>/checkpoints/<step>`."""
  return epath.Path(mngr.directory) / str(step)


def save(mngr: ocp.CheckpointManager, state: dict, data_position: dict) -> None:
  """Starts an async save of `state` at its step; returns before the write completes.

  Steps at or above this one that are still listed were skipped by the resume (unreadable
  on some process): they are moved out of the way first, see `_set_aside`."""
  step = int(jax.device_get(state["step"]))
  skipped = [s for s in mngr.all_steps() if s >= step]
  if skipped:
    _set_aside(mngr, skipped, step)
  data = dict(data_position, **{FINGERPRINTS: fingerprint.of(state)})
  try:  # also raises the error of the previous (asynchronous) save
    mngr.save(
      step,
      args=ocp.args.Composite(
        **{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data)}
      ),
      force=True,
    )
  except Exception as e:
    raise save_failed(mngr, e) from e


def finish(mngr: ocp.CheckpointManager) -> None:
  """Waits for the save in flight; SaveError if it failed."""
  try:
    mngr.wait_until_finished()
  except Exception as e:
    raise save_failed(mngr, e) from e


def save_failed(mngr: ocp.CheckpointManager, error: Exception, limit: int = 1000) -> SaveError:
  """The SaveError for `error`, raised by Orbax while writing under `mngr.directory`: it
  names the cause and the complete steps on disk, which a rerun resumes from."""
  reason = short_reason(error, limit)
  directory = epath.Path(mngr.directory)
  # On gs:// a step is written under its final name, and only Orbax's commit marker says
  # it is complete: the failed step was listed as intact.
  kept = sorted(
    int(p.name) for p in directory.iterdir() if p.name.isdigit() and ocp.step.is_path_finalized(p)
  )
  intact = (
    f"The checkpoints written before it are intact (steps {kept}): a rerun resumes from "
    f"step {kept[-1]}"
    if kept
    else "No checkpoint was written before it: a rerun starts from step 0"
  )
  return SaveError(
    f"writing a checkpoint under {directory} failed: {reason}. {intact} once the cause "
    "(e.g. a full disk or a read-only file system) is fixed"
  )


def check_writable(mngr: ocp.CheckpointManager, state_bytes: int) -> None:
  """OSError, on every process, unless each process can create a file in the checkpoint
  directory and, where it is a local disk, the disk has room for one checkpoint
  (`state_bytes`, the state's size; a killed save's files, which the manager deletes,
  count as room). Found here, before the first step, a full or
  read-only disk costs no compile and no training, and no wait on Orbax's background
  threads (a failed asynchronous save leaves them waiting for signals)."""
  directory = epath.Path(mngr.directory)
  error = None
  probe = directory / f".write_probe.{jax.process_index()}"
  try:
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    error = OSError(f"checkpoint directory {directory} does not take a file ({e})")
  local = "://" not in os.fspath(directory)
  if error is None and local and jax.process_index() == 0:
    free = shutil.disk_usage(directory).free + _unfinished_bytes(directory)
    if free < state_bytes:
      error = OSError(
        f"checkpoint directory {directory} has {free / 2**20:.1f} MiB free; one "
        f"checkpoint of this train state takes {state_bytes / 2**20:.1f} MiB: free space "
        "or pick another --workdir"
      )
  failing = failing_processes(-1, error is not None)
  if error is not None:
    raise error
  if failing:
    raise OSError(
      f"checkpoint directory {directory} refused by process(es) {failing} (their logs say "
      "why); nothing was trained"
    )


def restore(
  mngr: ocp.CheckpointManager,
  layout: StateLayout,
  step: int | None = None,
  *,
  params_only: bool = False,
):
  """Restores (state, data_position) at `step` (default: the newest readable step) into
  `layout`'s shardings; with `params_only`, state holds "params" alone and the optimizer
  state is not read (an export needs the parameters only: half the memory or less).

  The target is the abstract state, so a checkpoint written on one mesh restores onto
  another. If the checkpoint was trained at another image size, the learned position
  embedding is resampled to the new patch grid and the optimizer moments that depend on
  its shape restart from zero; any other entry stored at another shape (an optimizer
  setting changed) is a ValueError. Returns None when there is no checkpoint.

  With `step=None` the steps are tried newest first; one whose metadata or arrays cannot
  be read on any process is skipped (a warning names its path and the error; it is left
  on disk), so every process restores the same step. If no step can be read this raises
  UnreadableCheckpointError naming them all rather than let the run start afresh over
  them. An explicit `step` that cannot be read raises UnreadableCheckpointError.
  """
  if step is not None:
    return _verified(mngr, layout, step, _restore_step(mngr, layout, step, params_only=params_only))
  failures = {}
  for candidate in sorted(mngr.all_steps(), reverse=True):
    restored, error = _restore_with_one_retry(mngr, layout, candidate, params_only)
    failing = failing_processes(candidate, error is not None)
    if not failing:
      try:  # the same verdict on every process: the fingerprints are of the global arrays
        restored = _verified(mngr, layout, candidate, restored)
      except UnreadableCheckpointError as e:
        error, failing = e, list(range(jax.process_count()))
    if not failing:
      if failures:
        logging.warning(
          "Resuming from checkpoint step %d, the newest step every process can read", candidate
        )
      return restored
    path = step_path(mngr, candidate)
    reason = error.reason if error is not None else f"unreadable on process(es) {failing}"
    logging.warning("Skipping unreadable checkpoint %s (left on disk): %s", path, reason)
    failures[path] = reason
  if failures:
    raise UnreadableCheckpointError(
      f"no checkpoint in {mngr.directory} can be read (delete or repair them, or use another "
      "workdir, to start afresh): " + "; ".join(f"{p}: {r}" for p, r in failures.items())
    )
  return None


def _restore_with_one_retry(mngr, layout: StateLayout, step: int, params_only: bool):
  """(restored, None), or (None, the UnreadableCheckpointError) after a second try
  `RETRY_S` later: a passing storage error on one host must not make every host skip the
  newest good step (which the first save would then set aside)."""
  try:
    return _restore_step(mngr, layout, step, params_only=params_only), None
  except UnreadableCheckpointError as e:
    logging.warning("Reading checkpoint step %d failed (%s); trying once more", step, e.reason)
  time.sleep(RETRY_S)
  try:
    return _restore_step(mngr, layout, step, params_only=params_only), None
  except UnreadableCheckpointError as e:
    return None, e


def _unfinished_bytes(directory: epath.Path) -> int:
  """Bytes of the unfinished saves (a run killed while saving) under `directory`: the
  manager deletes them, but in the background, after `check_writable` has looked."""
  total = 0
  for name in ocp.step.tmp_checkpoints(directory):
    for root, _, files in os.walk(directory / name):
      total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def _restore_step(
  mngr: ocp.CheckpointManager, layout: StateLayout, step: int, *, params_only: bool = False
):
  """(state, data_position, mismatched) of `step` as stored (`_verified` checks and
  reshapes them); UnreadableCheckpointError if a file of it cannot be read, ValueError if
  it does not fit the config.

  Reads through the item handlers rather than `mngr.restore`: the manager's restore ends
  in a barrier of all processes, which a process whose read failed would never reach."""
  path = step_path(mngr, step)
  state_handler = ocp.StandardCheckpointHandler()
  try:
    try:
      stored = state_handler.metadata(path / STATE)
      stored_shapes = {
        params_lib.path_names(p): tuple(m.shape)
        for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]
      }
    except Exception as e:  # any failure to read or parse the metadata
      raise unreadable(path, e) from e
    renamed = _old_optimizer_layout(layout, stored_shapes, step)
    if renamed:
      stored_shapes = {new: stored_shapes[old] for new, old in renamed.items()}
    target, mismatched = _restore_target(layout, stored_shapes, step)
    _check_mismatched(mismatched, step)
    try:
      if params_only:
        state = _restore_params(path / STATE, target["params"])
      elif renamed:
        state = _restore_renamed(state_handler, path / STATE, stored, target, renamed)
      else:
        state = state_handler.restore(path / STATE, args=ocp.args.StandardRestore(target))
      data = ocp.JsonCheckpointHandler().restore(path / DATA)
    except Exception as e:  # Orbax wraps TensorStore's read errors in a bare Exception
      raise unreadable(path, e) from e
  finally:
    state_handler.close()
  if renamed and FINGERPRINTS in data:  # recorded under the names the values were saved at
    recorded = data[FINGERPRINTS]
    data[FINGERPRINTS] = {
      "/".join(new): recorded["/".join(old)]
      for new, old in renamed.items()
      if "/".join(old) in recorded
    }
  return state, data, mismatched


def _entry_names(layout: StateLayout) -> set[tuple[str, ...]]:
  """The names (path components) of the entries of the layout's state."""
  return {
    params_lib.path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(layout.abstract)[0]
  }


def _old_optimizer_layout(layout: StateLayout, stored_shapes: dict, step: int) -> dict | None:
  """{entry name in `layout`: its name in the checkpoint} where the checkpoint's
  optimizer state is in the chain layout before it was fixed (`optim.legacy_names`),
  else None."""
  expected = _entry_names(layout)
  if set(stored_shapes) == expected:
    return None
  renamed = optim.legacy_names(expected, set(stored_shapes))
  if renamed:
    logging.info(
      "Checkpoint step %d keeps its optimizer state in the layout before 2026-12-01 (the "
      "chain's elements depended on grad_clip_norm and weight_decay); reading it into "
      "today's",
      step,
    )
  return renamed


def _restore_renamed(handler, item: epath.Path, stored, target: dict, renamed: dict) -> dict:
  """The state saved at `item` under other entry names (`_old_optimizer_layout`), read
  into `target`'s shapes and shardings and returned in its structure. `stored`: the
  item's tree metadata."""
  names = params_lib.path_names
  by_name = {names(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
  target_of = {old: by_name[new] for new, old in renamed.items()}
  read = jax.tree_util.tree_map_with_path(lambda p, _: target_of[names(p)], stored)
  restored = handler.restore(item, args=ocp.args.StandardRestore(read))
  values = {names(p): v for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
  placed = set()

  def place(path, _):
    old = renamed[names(path)]
    value = values[old]
    if old in placed:  # one array in two places of the state, which the step donates
      value = jnp.copy(value)
    placed.add(old)
    return value

  return jax.tree_util.tree_map_with_path(place, target)


def _verified(mngr: ocp.CheckpointManager, layout: StateLayout, step: int, read) -> tuple:
  """(state, data_position) of `step` from `_restore_step`'s `read`, its values checked
  against the fingerprints saved with them (steps saved before fingerprints: unchecked),
  then reshaped to the layout (`_adapt_shapes`). UnreadableCheckpointError when a value
  differs. Every process must call this for the same step (a reduction over the arrays)."""
  state, data, mismatched = read
  data = dict(data)
  check_values(step_path(mngr, step), data.pop(FINGERPRINTS, None), state)
  if mismatched:
    state = _adapt_shapes(state, layout, mismatched)
  return state, data


def check_values(path: epath.Path, recorded: dict | None, tree) -> None:
  """UnreadableCheckpointError unless each array of `tree` (entries named as in the state:
  "params/...") read from the checkpoint at `path` has the fingerprint `recorded` at its
  save; `recorded` None (a step saved before fingerprints): unchecked. Every process must
  call this with the same tree (a reduction over the global arrays)."""
  changed = fingerprint.differing(recorded, tree) if recorded is not None else []
  if changed:
    reason = (
      f"{len(changed)} arrays hold other values than were saved (e.g. "
      f"{', '.join(changed[:3])}): its files changed after they were written (a storage "
      "fault or an overwrite)"
    )
    raise UnreadableCheckpointError(f"checkpoint {path} is damaged: {reason}", reason)


def _restore_params(item: epath.Path, target: dict) -> dict:
  """{"params": ...} of the state saved at `item`, the rest of it left unread."""
  request = {"params": target}
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.restore(
      item,
      args=ocp.args.PyTreeRestore(
        item=request,
        restore_args=ocp.checkpoint_utils.construct_restore_args(request),
        partial_restore=True,
      ),
    )
  finally:
    handler.close()


def _restore_target(layout: StateLayout, stored_shapes: dict, step: int):
  """The abstract state to read: the layout's, except entries stored at another shape,
  which are read replicated at their stored shape (returned second: path names ->
  (stored shape, config shape)).
  ValueError (not UnreadableCheckpointError: the files are fine) when the checkpoint and
  the config disagree on which entries there are."""
  replicated = jax.sharding.NamedSharding(layout.mesh, jax.sharding.PartitionSpec())
  mismatched = {}
  expected = _entry_names(layout)
  extra = sorted("/".join(p) for p in set(stored_shapes) - expected)
  if extra:
    raise ValueError(
      f"checkpoint step {step} holds {len(extra)} entries the config has no place for "
      f"(e.g. {extra[:3]}): the model, the optimizer or config.train.frozen (which drops "
      "frozen parameters' optimizer state) changed since it was written. Resume with the "
      "run's config, or start a new workdir with config.train.init_from to reuse its weights"
    )

  def restore_target(path, target):
    shape = stored_shapes.get(params_lib.path_names(path))
    if shape is None:
      raise ValueError(
        f"checkpoint step {step} has no entry {'/'.join(params_lib.path_names(path))}: the "
        "model, the optimizer or config.train.frozen changed since it was written. Resume "
        "with the run's config, or start a new workdir with config.train.init_from to "
        "reuse its weights"
      )
    if shape == tuple(target.shape):
      return target
    mismatched[params_lib.path_names(path)] = (shape, tuple(target.shape))
    return jax.ShapeDtypeStruct(shape, target.dtype, sharding=replicated)

  return jax.tree_util.tree_map_with_path(restore_target, layout.abstract), mismatched


def failing_processes(step: int, failed: bool) -> list[int]:
  """The processes on which `step` failed to read; one all-gather when there are several
  processes (each must call this for the same steps, in the same order), none otherwise."""
  if jax.process_count() == 1:
    return [0] if failed else []
  gathered = np.asarray(
    multihost_utils.process_allgather(np.array([step, int(failed)], np.int32))
  ).reshape(-1, 2)
  if np.any(gathered[:, 0] != step):
    raise RuntimeError(
      f"processes list different checkpoint steps (tried {gathered[:, 0].tolist()} at once)"
    )
  return [int(i) for i in np.flatnonzero(gathered[:, 1])]


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int], saving: int) -> None:
  """Moves `steps` (which a resume skipped) to `<workdir>/skipped_checkpoints/`, so that
  `saving` can be written (Orbax refuses to overwrite a step) and so that keeping the last
  N checkpoints counts only steps of this run; deletes one that cannot be moved."""
  mngr.wait_until_finished()
  aside = epath.Path(mngr.directory).parent / SKIPPED_DIR
  if jax.process_index() == 0:
    for step in steps:
      source = step_path(mngr, step)
      target = aside / str(step)
      suffix = 0
      while target.exists():
        suffix += 1
        target = aside / f"{step}-{suffix}"
      try:
        aside.mkdir(parents=True, exist_ok=True)
        source.rename(target)
        logging.warning(
          "Saving step %d: moved checkpoint %s, which the resume skipped as unreadable, to %s",
          saving,
          source,
          target,
        )
      except Exception as e:  # e.g. a store without directory renames
        logging.warning(
          "Saving step %d: deleting checkpoint %s, which the resume skipped as unreadable "
          "(could not move it to %s: %s)",
          saving,
          source,
          target,
          e,
        )
        source.rmtree()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"coca_jax.checkpoint set aside {steps}")
  mngr.reload()


def _check_mismatched(mismatched: dict, step: int):
  """ValueError (before any array is read) unless every entry stored at another shape is
  one an image-size change reshapes: the position embedding, resampled by
  `_adapt_shapes`, and its optimizer moments, which restart from zero. Any other moment of
  another shape means the optimizer changed; zeroing it would silently reset training."""

  def describe(keys):
    return ", ".join(f"{'/'.join(k)} {mismatched[k][0]} -> {mismatched[k][1]}" for k in keys)

  bad_params = sorted(p for p in mismatched if p[0] == "params" and p != POS_EMBEDDING)
  if bad_params:
    raise ValueError(
      f"checkpoint step {step} parameters do not match the config: {describe(bad_params)}"
    )
  resized = POS_EMBEDDING in mismatched
  bad_state = sorted(
    p
    for p in mismatched
    if p[0] != "params" and not (resized and p[0] == "opt_state" and p[-2:] == POS_EMBEDDING[1:])
  )
  if bad_state:
    raise ValueError(
      f"checkpoint step {step} holds optimizer state of other shapes than the config's "
      f"({len(bad_state)} entries: {describe(bad_state[:5])}"
      f"{' ...' if len(bad_state) > 5 else ''}): an optimizer setting changed since it was "
      "written (e.g. config.optim.factored_min_dim, which decides which second moments are "
      "factored), and resuming would reset those moments to zero. Resume with the run's "
      "config.optim, or start a new workdir with config.train.init_from to reuse its weights"
    )


def _adapt_shapes(state, layout: StateLayout, mismatched: dict) -> dict:
  """Resamples the position embedding; zeroes its optimizer moments (`_check_mismatched`
  allows no other entry of a changed shape)."""

  def adapt(path, value, target):
    key = params_lib.path_names(path)
    if key not in mismatched:
      return value
    if key == POS_EMBEDDING:
      logging.info("Resampling the position embedding %s -> %s", value.shape, target.shape)
      value = vit.resize_pos_embedding(jnp.asarray(value), target.shape[0])
    else:
      logging.info(
        "Optimizer state %s %s -> %s: restarts from zero (the image size changed)",
        "/".join(key),
        value.shape,
        target.shape,
      )
      value = np.zeros(target.shape, target.dtype)
    return jax.device_put(value, target.sharding)

  targets = {key: layout.abstract[key] for key in state}  # all of it, or "params" alone
  return jax.tree_util.tree_map_with_path(adapt, state, targets)
