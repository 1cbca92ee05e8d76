"""Resuming past an unreadable checkpoint: the newest step that can be read is restored
(every process the same), the unreadable one is named and kept; when training reaches its
step again it is moved to <workdir>/skipped_checkpoints and the step is written anew.

Also run as a script: one process of the two-process test (see `_two_process_worker`).
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny_runs import env_with_devices, free_port, tiny_config

from coca_jax import checkpoint, train
from coca_jax import state as state_lib

pytestmark = pytest.mark.slow  # end-to-end training, two processes

REPO = pathlib.Path(__file__).resolve().parents[1]


def corrupt(step_dir: pathlib.Path, what: str) -> pathlib.Path:
  """Overwrites one file of the step's `state` (with "values": all of them, with another
  step's, files that read well); -> that file (or folder)."""
  state = step_dir / "state"
  if what == "values":  # what only the fingerprints saved with the step tell
    shutil.rmtree(state)
    shutil.copytree(step_dir.parent / "3" / "state", state)
    return state
  if what == "sharding":  # the case: Orbax then fails with "Invalid JSON"
    path = state / "_sharding"
  elif what == "metadata":  # the tree metadata
    path = state / "_METADATA"
  else:  # the array data (the metadata stays readable)
    path = max((state / "d").iterdir(), key=lambda p: p.stat().st_size)
  path.write_bytes(b"\x00not a checkpoint\xff" * 64)
  return path


def restore(workdir, config, step=None, **kwargs):
  layout = state_lib.setup(config).layout
  return checkpoint.restore(
    checkpoint.manager(str(workdir), config.train, read_only=True), layout, step, **kwargs
  )


def steps_in(directory) -> list[int]:
  return sorted(int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit())


def assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.fixture(scope="module")
def run6(tmp_path_factory):
  """A 6-step run checkpointed at steps 3 and 6, and its restored states (intact)."""
  workdir = tmp_path_factory.mktemp("run6")
  config = tiny_config(6)
  train.train(config, str(workdir))
  assert steps_in(workdir / "checkpoints") == [3, 6]
  intact = {step: restore(workdir, config, step) for step in (3, 6)}
  return workdir, config, intact


def copy_of(run_dir, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(run_dir, workdir)
  return workdir


@pytest.mark.parametrize("what", ["sharding", "metadata", "arrays", "values"])
def test_restore_skips_an_unreadable_newest_step(tmp_path, run6, caplog, what):
  run_dir, config, intact = run6
  workdir = copy_of(run_dir, tmp_path)
  bad_file = corrupt(workdir / "checkpoints" / "6", what)
  with caplog.at_level("WARNING"):
    state, data = restore(workdir, config)
  assert data["step"] == 3 and int(state["step"]) == 3
  assert_same(state, intact[3][0])
  bad_step = str(workdir / "checkpoints" / "6")
  skipped = [m for m in caplog.messages if bad_step in m and m.startswith("Skipping")]
  assert skipped and "left on disk" in skipped[0], caplog.text
  if what == "sharding":
    assert "Invalid JSON" in skipped[0]
  if what == "values":  # restored as step 6 before: a wrong state, trained on
    assert "hold other values than were saved (e.g. opt_state/" in skipped[0]
  assert bad_file.exists() and steps_in(workdir / "checkpoints") == [3, 6]
  # An explicit step (as export asks for) is not replaced by another one.
  with pytest.raises(checkpoint.UnreadableCheckpointError, match=re.escape(bad_step)):
    restore(workdir, config, 6)


def test_every_step_unreadable_raises_and_training_does_not_start_afresh(tmp_path, run6):
  run_dir, config, _ = run6
  workdir = copy_of(run_dir, tmp_path)
  corrupt(workdir / "checkpoints" / "6", "sharding")
  corrupt(workdir / "checkpoints" / "3", "arrays")
  paths = [re.escape(str(workdir / "checkpoints" / s)) for s in ("6", "3")]
  with pytest.raises(checkpoint.UnreadableCheckpointError, match=f"{paths[0]}.*{paths[1]}"):
    restore(workdir, config)
  with pytest.raises(checkpoint.UnreadableCheckpointError, match="no checkpoint in"):
    train.train(config, str(workdir))
  assert steps_in(workdir / "checkpoints") == [3, 6]
  assert not (workdir / checkpoint.SKIPPED_DIR).exists()


def test_training_resumes_from_the_readable_step_and_rewrites_the_unreadable_one(
  tmp_path, run6, caplog
):
  run_dir, config, intact = run6
  workdir = copy_of(run_dir, tmp_path)
  bad_file = corrupt(workdir / "checkpoints" / "6", "sharding")
  bad_bytes = bad_file.read_bytes()
  with caplog.at_level("INFO"):
    final = train.train(config, str(workdir))
  assert final["step"] == 6 and np.isfinite(final["loss"])
  assert "resumed from checkpoint step 3" in caplog.text
  # The unreadable step was moved aside intact, and step 6 written again by the resumed
  # run: the same program on the same batches, so bitwise the uninterrupted run's step 6.
  kept = workdir / checkpoint.SKIPPED_DIR / "6"
  assert (kept / bad_file.relative_to(workdir / "checkpoints" / "6")).read_bytes() == bad_bytes
  assert f"moved checkpoint {workdir / 'checkpoints' / '6'}" in caplog.text
  assert steps_in(workdir / "checkpoints") == [3, 6]
  state, data = restore(workdir, config)
  assert data["step"] == 6
  assert_same(state, intact[6][0])
  # Continuing with more steps resumes from the rewritten step.
  caplog.clear()
  with caplog.at_level("INFO"):
    final = train.train(tiny_config(9), str(workdir))
  assert final["step"] == 9 and "resumed from checkpoint step 6" in caplog.text
  assert steps_in(workdir / "checkpoints") == [3, 6, 9]


# Two processes (4 CPU devices each, gloo) restore from a step that only process 1 cannot
# read: both must restore the step before it, then set the skipped step aside together.


def _two_process_worker(workdir: str, port: int, process_id: int) -> None:
  jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
  import orbax.checkpoint as ocp

  config = tiny_config(6, mesh=dict(data=1, fsdp=8, tensor=1))
  run = state_lib.setup(config)
  state = state_lib.create(config, run)
  mngr = checkpoint.manager(workdir, config.train)

  def at_step(step):
    step_array = jax.jit(lambda: np.int32(step), out_shardings=run.layout.shardings["step"])()
    return dict(state, step=step_array)

  for step in (3, 6):
    checkpoint.save(mngr, at_step(step), dict(step=step))
  mngr.wait_until_finished()

  if process_id == 1:  # a read failure on this host only
    json_restore = ocp.JsonCheckpointHandler.restore

    def failing_restore(self, directory, *args, **kwargs):
      if pathlib.Path(str(directory)).parent.name == "6":
        raise OSError("simulated read failure on process 1")
      return json_restore(self, directory, *args, **kwargs)

    ocp.JsonCheckpointHandler.restore = failing_restore

  restored, data = checkpoint.restore(mngr, run.layout)
  # Saving step 6 again moves the skipped one aside (process 0) after a barrier.
  checkpoint.save(mngr, dict(restored, step=at_step(6)["step"]), dict(step=6))
  mngr.wait_until_finished()
  steps = list(mngr.all_steps())
  mngr.close()
  print(json.dumps(dict(step=int(restored["step"]), data=data["step"], steps=steps)))


def test_two_processes_agree_on_the_step(tmp_path):
  port = free_port()
  env = env_with_devices(4)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  workdir = tmp_path / "run"
  procs = []
  for i in range(2):
    log = open(tmp_path / f"process{i}.log", "w+")
    cmd = [sys.executable, __file__, str(workdir), str(port), str(i)]
    procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log), log))
  try:
    for proc, _ in procs:
      proc.wait(timeout=300)
  finally:
    for proc, _ in procs:
      proc.kill()
  outputs = []
  for proc, log in procs:
    log.seek(0)
    text = log.read()
    log.close()
    assert proc.returncode == 0, text[-4000:]
    outputs.append(text)
  results = [json.loads(text.strip().splitlines()[-1]) for text in outputs]
  assert results[0] == results[1] == dict(step=3, data=3, steps=[3, 6]), results
  bad_step = str(workdir / "checkpoints" / "6")
  assert "simulated read failure on process 1" in outputs[1]
  assert re.search(f"Skipping unreadable checkpoint {re.escape(bad_step)}.*process", outputs[0])
  assert (workdir / checkpoint.SKIPPED_DIR / "6" / "state").is_dir()


if __name__ == "__main__":
  _two_process_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))


def test_a_config_with_fewer_state_entries_is_a_config_error_not_an_unreadable_step(run6):
  """Freezing the image encoder drops its optimizer state: the checkpoint's extra entries
  are named as a config mismatch, and no step is called unreadable (whose advice is to
  delete them)."""
  run_dir, config, _ = run6
  frozen = tiny_config(6)
  frozen.train.frozen = ("vision/.*",)
  with pytest.raises(ValueError, match=r"checkpoint step 6 holds \d+ entries .*frozen") as e:
    restore(run_dir, frozen)
  assert not isinstance(e.value, checkpoint.UnreadableCheckpointError)
  assert steps_in(run_dir / "checkpoints") == [3, 6]


def test_a_config_with_more_state_entries_says_what_to_do(run6, tmp_path):
  """A model that gained a parameter (a class token) failed with a bare 'has no entry';
  unfreezing parameters names config.train.frozen (their optimizer state differs)."""
  run_dir, _, _ = run6
  grown = tiny_config(6)
  grown.model.vision.class_token = True
  with pytest.raises(
    ValueError, match=r"no entry .*vision/class_embedding: .*Resume with the run's config"
  ):
    restore(run_dir, grown)
  frozen = tiny_config(6)
  frozen.train.frozen = ("vision/.*",)
  state = state_lib.create(frozen, state_lib.setup(frozen))
  mngr = checkpoint.manager(str(tmp_path), frozen.train)
  checkpoint.save(mngr, dict(state, step=np.int32(2)), dict(step=2, seed=0))
  mngr.wait_until_finished()
  mngr.close()
  with pytest.raises(ValueError, match=r"step 2 holds \d+ entries .*config\.train\.frozen"):
    restore(tmp_path, tiny_config(6))


def test_params_only_reads_the_parameters_alone(run6):
  """What an export reads: the parameters of the newest step, equal to a full restore's,
  and no optimizer state (half the memory or less)."""
  run_dir, config, intact = run6
  state, data = restore(run_dir, config, params_only=True)
  assert list(state) == ["params"] and data["step"] == 6
  assert_same(state["params"], intact[6][0]["params"])


def test_running_out_of_memory_while_reading_stops_the_resume_and_skips_no_step(
  run6, monkeypatch, caplog
):
  """Out of memory says nothing of the files: the newest good step must not be called
  unreadable, skipped, and set aside by the next save."""
  run_dir, config, _ = run6

  def out_of_memory(*args, **kwargs):
    raise Exception("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2G")

  monkeypatch.setattr(checkpoint.ocp.StandardCheckpointHandler, "restore", out_of_memory)
  with caplog.at_level("WARNING"), pytest.raises(MemoryError, match="ran out of memory"):
    restore(run_dir, config)
  assert "Skipping" not in caplog.text
  assert steps_in(run_dir / "checkpoints") == [3, 6]


def test_a_step_that_fails_once_is_read_again_not_skipped(run6, monkeypatch, caplog):
  """A passing storage error must not make the resume skip the newest good step."""
  run_dir, config, intact = run6
  real, calls = checkpoint._restore_step, []

  def flaky(mngr, layout, step, **kwargs):
    calls.append(step)
    if len(calls) == 1:
      raise checkpoint.UnreadableCheckpointError("transient", "connection reset")
    return real(mngr, layout, step, **kwargs)

  monkeypatch.setattr(checkpoint, "_restore_step", flaky)
  monkeypatch.setattr(checkpoint, "RETRY_S", 0.0)
  with caplog.at_level("WARNING"):
    state, data = restore(run_dir, config)
  assert calls == [6, 6] and data["step"] == 6
  assert_same(state, intact[6][0])
  assert "trying once more" in caplog.text
