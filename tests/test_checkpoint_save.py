"""Saving compiles nothing: Orbax's replica-parallel writes cut replicated arrays with
eager jax ops (a compile per slice shape), so arrays with small slices are written whole
(checkpoint.MIN_REPLICA_SLICE_BYTES)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_runs import tiny_config

from coca_jax import checkpoint, fingerprint
from coca_jax import state as state_lib


@pytest.mark.slow  # builds the tiny state on 8 devices (10 s)
def test_saving_a_state_replicated_over_8_devices_compiles_nothing(tmp_path):
  config = tiny_config(6, mesh=dict(data=8, fsdp=1, tensor=1))
  run = state_lib.setup(config)
  state = state_lib.create(config, run)
  kernel = state["params"]["text"]["multimodal"]["layers"]["mlp"]["up"]["kernel"]
  assert len(kernel.sharding.device_set) == 8 and kernel.is_fully_replicated
  compiles = []

  def listener(event, duration, **kwargs):
    if "compile" in event:
      compiles.append((event, kwargs))

  mngr = checkpoint.manager(str(tmp_path), config.train)
  states = {step: dict(state, step=jnp.asarray(step, jnp.int32)) for step in (3, 6)}
  fingerprint.of(states[3])  # its one compile per state layout, at the run's first save
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for step in (3, 6):
      checkpoint.save(mngr, states[step], dict(step=step))
    mngr.wait_until_finished()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  restored, data = checkpoint.restore(
    checkpoint.manager(str(tmp_path), config.train, read_only=True), run.layout
  )
  assert data["step"] == 6 and int(restored["step"]) == 6
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(restored["params"]),
    jax.device_get(state["params"]),
  )


def test_a_failed_saves_message_lists_committed_steps_only(tmp_path, monkeypatch):
  """On gs:// Orbax writes a step under its final name and marks it complete with a
  commit file: the step whose save failed was named intact, and "a rerun resumes from"
  it, where the rerun resumed from the one before (review helper-86)."""
  import orbax.checkpoint as ocp

  for step in (2, 4):
    (tmp_path / str(step)).mkdir()
  monkeypatch.setattr(ocp.step, "is_path_finalized", lambda path: path.name != "4")

  class Manager:
    directory = tmp_path

  error = checkpoint.save_failed(Manager(), OSError("no space left on device"))
  assert "(steps [2]): a rerun resumes from step 2" in str(error)
