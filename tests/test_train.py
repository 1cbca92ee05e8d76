"""The trainer end to end on the tiny config: overrides, kill/resume, SIGTERM, NaN,
restore onto another mesh, export, resolution change."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from etils import epath
from tiny_runs import OVERRIDES, tiny_config

from coca_jax import checkpoint, export, train
from coca_jax import sharding as sharding_lib
from coca_jax import state as state_lib

pytestmark = pytest.mark.slow  # subprocesses / end-to-end training

REPO = pathlib.Path(__file__).resolve().parents[1]


def cli(workdir, steps, *extra):
  args = [
    sys.executable,
    "-m",
    "coca_jax.train",
    "--config=configs/tiny.py",
    f"--workdir={workdir}",
    f"--config.train.steps={steps}",
  ]
  for section, values in OVERRIDES.items():
    args += [f"--config.{section}.{k}={v}" for k, v in values.items()]
  return args + list(extra)


def run(args, timeout=300):
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def restore_params(workdir, config, step=None, mesh_shape=(1, 8, 1)):
  config = ml_collections.ConfigDict(config)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
  layout = state_lib.setup(config).layout
  state, data = checkpoint.restore(
    checkpoint.manager(str(workdir), config.train, read_only=True), layout, step
  )
  return state, data, layout


def wait_for(predicate, timeout, proc=None):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if proc is not None and proc.poll() is not None:
      return predicate()
    time.sleep(0.05)
  return False


def latest_step(workdir):
  steps = [
    int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").glob("*") if p.name.isdigit()
  ]
  return max(steps, default=None)


def test_unknown_or_mistyped_override_fails_before_compiling(tmp_path):
  result = run(cli(tmp_path, 2, "--config.optim.lrr=1"), timeout=120)
  assert result.returncode == 1 and "Traceback" not in result.stderr  # one line, not 50
  assert (
    "FATAL Flags parsing error: --config override: no key 'lrr'; "
    'Did you mean "lr" instead of "lrr"?' in result.stderr
  )
  result = run(cli(tmp_path, 2, "--config.optimm.lr=1"), timeout=120)  # a missing section
  assert result.returncode == 1 and "no key 'optimm'; Did you mean \"optim\"" in result.stderr
  result = run(cli(tmp_path, 2, "--config.optim.lr=fast"), timeout=120)
  assert result.returncode != 0 and "lr" in result.stderr and "fast" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted 60-step run on mesh (8, 1, 1)."""
  workdir = tmp_path_factory.mktemp("reference")
  config = tiny_config(60, mesh=dict(data=8, fsdp=1, tensor=1))
  final = train.train(config, str(workdir))
  return workdir, config, final


def test_sigkill_then_restart_resumes_and_matches_an_uninterrupted_run(tmp_path, reference_run):
  ref_dir, ref_config, _ = reference_run
  mesh_flags = ["--config.mesh.data=8", "--config.mesh.fsdp=1"]
  proc = subprocess.Popen(
    cli(tmp_path, 60, *mesh_flags),
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    assert wait_for(lambda: latest_step(tmp_path) is not None, 240, proc), (
      "no checkpoint was written"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
  finally:
    proc.kill()
  killed_at = latest_step(tmp_path)
  assert killed_at < 60, "the run finished before it could be killed"
  result = run(cli(tmp_path, 60, *mesh_flags))
  assert result.returncode == 0, result.stderr[-3000:]
  resumed = re.search(r"resumed from checkpoint step (\d+)", result.stderr)
  assert resumed and int(resumed.group(1)) >= killed_at
  state, data, _ = restore_params(tmp_path, ref_config, mesh_shape=(8, 1, 1))
  ref_state, _, _ = restore_params(ref_dir, ref_config, mesh_shape=(8, 1, 1))
  assert data["step"] == 60 and int(state["step"]) == 60
  # Same program, same batches, same devices: bitwise equal on CPU.
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(state["params"]),
    jax.device_get(ref_state["params"]),
  )


def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(tmp_path):
  proc = subprocess.Popen(
    cli(tmp_path, 100_000), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  try:
    assert wait_for(lambda: latest_step(tmp_path) is not None, 240, proc), (
      "no checkpoint was written"
    )
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  stopped = re.search(r"preempted: checkpoint at step (\d+)", err)
  assert stopped, err[-3000:]
  assert latest_step(tmp_path) == int(stopped.group(1))


def test_restore_onto_another_mesh_and_export(tmp_path, reference_run):
  ref_dir, config, _ = reference_run
  on_8, _, _ = restore_params(ref_dir, config, mesh_shape=(8, 1, 1))
  on_222, _, layout = restore_params(ref_dir, config, mesh_shape=(2, 2, 2))
  kernel = on_222["params"]["text"]["multimodal"]["layers"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(on_8), jax.device_get(on_222))

  # The end of training exported float32 params; loading them gives the same embeddings.
  model, export_config = export.load_model(str(ref_dir / "export"))
  assert export_config.model.width == config.model.width
  trained = state_lib.model_from_params(layout.graphdef, jax.device_get(on_8["params"]))
  rng = np.random.default_rng(0)
  image = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  ids = rng.integers(3, 64, (2, 8)).astype(np.int32)
  mask = np.ones((2, 8), np.int32)
  np.testing.assert_allclose(
    model.encode_image(image)[0], trained.encode_image(image)[0], atol=1e-6
  )
  np.testing.assert_allclose(
    model.encode_text(ids, mask)[0], trained.encode_text(ids, mask)[0], atol=1e-6
  )

  # The export CLI writes the run's config.train.export_dtype by default (the trainer's
  # own export's: float32 here), --dtype=bfloat16 on request.
  for dtype, flags, atol in (("float32", [], 1e-6), ("bfloat16", ["--dtype=bfloat16"], 0.1)):
    out = tmp_path / f"exported_{dtype}"
    command = [sys.executable, "-m", "coca_jax.export", f"--workdir={ref_dir}"]
    result = run([*command, f"--output={out}", f"--step={latest_step(ref_dir)}", *flags])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["dtype"] == dtype
    exported, _ = export.load_model(str(out))
    np.testing.assert_allclose(
      exported.encode_image(image)[0], model.encode_image(image)[0], atol=atol
    )
  # A step that is not there: one line naming it, exit 1 (it was a traceback).
  missing = run([*command, f"--output={tmp_path / 'none'}", "--step=9999"])
  assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr[-3000:]
  assert (
    missing.stderr.strip().splitlines()[-1] == f"error: no checkpoint 9999 in {ref_dir}/checkpoints"
  )


def test_export_of_a_missing_dir_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "params")):
    export.load_model(str(tmp_path))


def test_nan_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path):
  train.train(tiny_config(3), str(tmp_path))
  good, _, _ = restore_params(tmp_path, tiny_config(3))
  exploding = tiny_config(12, optim=dict(lr=1e9))
  with pytest.raises(FloatingPointError, match=r"at step \d+"):
    train.train(exploding, str(tmp_path))
  assert latest_step(tmp_path) == 3
  again, _, _ = restore_params(tmp_path, tiny_config(3))
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(good["params"]), jax.device_get(again["params"])
  )


def test_a_non_finite_step_between_log_steps_is_named_and_never_evaluated(tmp_path, monkeypatch):
  """The check ran only at log and save steps and named the step it ran at: with
  log_every=10 up to 9 steps ran on (and an evaluation could score) a NaN state."""
  evaluated = []
  monkeypatch.setattr(train, "evaluate_state", lambda *a, step, **k: evaluated.append(step) or {})
  exploding = tiny_config(
    12,
    optim=dict(lr=1e37, warmup_fraction=0.0),
    train=dict(log_every=10, checkpoint_every=10, eval_every=5),
  )
  with pytest.raises(FloatingPointError, match=r"first at step 1 \(at step 5: loss "):
    train.train(exploding, str(tmp_path))
  assert evaluated == [] and latest_step(tmp_path) is None


def test_an_infinite_gradient_norm_stops_the_run():
  """It left the parameters finite but Adafactor's second moment infinite: every later
  update of that parameter was 0, and neither loss nor param_norm showed it."""
  finite = dict(loss=1.0, param_norm=2.0, grad_norm=3.0)
  first = train.first_nonfinite(None, finite, 1)
  first = train.first_nonfinite(first, dict(finite, grad_norm=float("inf")), 2)
  first = train.first_nonfinite(first, finite, 3)  # finite again: the first bad step stays
  assert int(first) == 2
  train.check_finite(-1, finite, 3, None)
  with pytest.raises(FloatingPointError, match="first at step 2 .*grad_norm 3.0"):
    train.check_finite(int(first), finite, 3, type("M", (), {"latest_step": lambda self: 0})())


# `python -c REFUSING_MKDIR PREFIX MODULE ARGS...` runs `python -m MODULE ARGS...` with the
# file system refusing to create directories named PREFIX... (as a disk turned read-only
# would): Orbax's temporary directory of the checkpoint or export it names.
REFUSING_MKDIR = """
import errno, os, runpy, sys
mkdir, prefix = os.mkdir, sys.argv[1]
def refusing(path, *args, **kwargs):
  if os.path.basename(os.fspath(path)).startswith(prefix):
    raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
  return mkdir(path, *args, **kwargs)
os.mkdir = refusing
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_refusing(prefix, module, *args):
  """The last stderr line of `python -m module args` under REFUSING_MKDIR, which must
  exit with status 1. Orbax's threads of a failed save wait 300 s for signals that never
  come: a process whose exit joined them would outlast the timeout."""
  proc = run([sys.executable, "-c", REFUSING_MKDIR, prefix, module, *args], timeout=200)
  assert proc.returncode == 1, proc.stderr[-3000:]
  return proc.stderr.strip().splitlines()[-1]


def test_a_failed_save_stops_at_once_naming_the_cause_and_the_intact_steps(tmp_path):
  last = run_refusing("6.orbax-checkpoint-tmp", *cli(tmp_path, 9)[2:])
  assert last.startswith(f"writing a checkpoint under {tmp_path / 'checkpoints'} failed:"), last
  assert "Read-only file system" in last
  assert "intact (steps [3]): a rerun resumes from step 3" in last
  assert latest_step(tmp_path) == 3
  assert not (tmp_path / "export").exists()
  _, data, _ = restore_params(tmp_path, tiny_config(9))
  assert data["step"] == 3


def test_a_failed_export_stops_at_once_and_keeps_the_export_already_there(tmp_path, reference_run):
  ref_dir = reference_run[0]
  out = tmp_path / "export"
  shutil.copytree(ref_dir / "export", out)
  before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
  last = run_refusing(
    "params.orbax-checkpoint-tmp", "coca_jax.export", f"--workdir={ref_dir}", f"--output={out}"
  )
  assert last.startswith(f"writing the export {out} failed: OSError: [Errno 30]"), last
  assert "the export already there is untouched" in last
  after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
  assert after == before


def test_resolution_change_on_resume_resamples_position_embeddings(tmp_path):
  low = tiny_config(3)
  low.model.vision.image_size = 32
  train.train(low, str(tmp_path))
  before, _, _ = restore_params(tmp_path, low)
  high = tiny_config(6)
  high.model.vision.image_size = 48
  restored, data, _ = restore_params(tmp_path, high)
  old = np.asarray(before["params"]["vision"]["pos_embedding"]).reshape(8, 8, -1)
  new = np.asarray(restored["params"]["vision"]["pos_embedding"]).reshape(12, 12, -1)
  assert data["step"] == 3
  # Bilinear resampling keeps the grid's mean and its corner regions' values close.
  np.testing.assert_allclose(new.mean((0, 1)), old.mean((0, 1)), atol=0.01)
  np.testing.assert_allclose(new[0, 0], old[0, 0], atol=0.05)
  # Continue at 48px with the periodic held-out evaluation on.
  high.train.eval_every = 3
  final = train.train(high, str(tmp_path))
  assert final["step"] == 6 and np.isfinite(final["loss"])
  assert np.isfinite(final["eval/loss"]) and np.isfinite(final["eval/captioning_loss"])


def test_preempted_then_finished_then_started_again(tmp_path, monkeypatch, caplog):
  """A preempted run returns its metrics without resolving the headline (it raised: the
  final eval had not run); the resumed run finishes; started again, a finished run
  evaluates and exports once more and names its headline instead of failing on it."""
  config = tiny_config(6, train=dict(eval_every=6))
  config.eval.headline = {"final/loss": "eval/loss", "final/train_loss": "loss"}
  monkeypatch.setattr(train.Preemption, "reached", lambda self, mngr, step: step == 3)
  preempted = train.train(config, str(tmp_path))
  assert preempted["step"] == 3 and "final/loss" not in preempted
  monkeypatch.undo()
  finished = train.train(config, str(tmp_path))
  assert finished["step"] == 6 and finished["final/loss"] == finished["eval/loss"]
  data = json.loads((tmp_path / "checkpoints" / "6" / "data" / "metadata").read_text())
  fingerprints = data.pop(checkpoint.FINGERPRINTS)  # one per state array
  assert data == dict(step=6, seed=0, source="synthetic", global_batch_size=8, data_shards=1)
  state_arrays = len(jax.tree.leaves(state_lib.setup(config).layout.abstract))
  assert len(fingerprints) == state_arrays and fingerprints["step"] == "int32:00000006"
  (tmp_path / "export" / "config.json").unlink()
  with caplog.at_level("INFO"):
    again = train.train(config, str(tmp_path))
  assert again["step"] == 6 and "loss" not in again and "final/train_loss" not in again
  assert again["final/loss"] == pytest.approx(finished["eval/loss"], rel=1e-6)
  assert (tmp_path / "export" / "config.json").exists()
  assert "the run finished at step 6: evaluating and exporting only" in caplog.text


def test_a_resume_with_another_config_names_the_changes_and_keeps_the_earlier_one(tmp_path, caplog):
  """Changing the schedule's length or the optimizer on resume is allowed, but the
  warning names the keys, and the run's earlier config.json is kept, not overwritten."""
  train.train(tiny_config(3), str(tmp_path))
  original = (tmp_path / "config.json").read_text()
  longer = tiny_config(6, optim=dict(lr=0.5))
  with caplog.at_level("WARNING"):
    train.train(longer, str(tmp_path))
  warning = [m for m in caplog.messages if "changed config" in m]
  assert len(warning) == 1, caplog.messages
  assert "optim.lr: " in warning[0] and " -> 0.5" in warning[0]
  assert "train.steps: 3 -> 6" in warning[0]
  assert (tmp_path / "config.before_step_3.json").read_text() == original
  assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 6
  caplog.clear()
  with caplog.at_level("WARNING"):
    train.train(longer, str(tmp_path))  # finished, same config: nothing to say or keep
  assert not [m for m in caplog.messages if "changed config" in m]
  assert sorted(p.name for p in tmp_path.glob("config*.json")) == [
    "config.before_step_3.json",
    "config.json",
  ]


def test_a_crashed_resume_does_not_replace_the_config_that_trained_the_checkpoint(tmp_path, caplog):
  """A resume from step 20 with steps 30 replaced config.json and crashed before its next
  checkpoint; the next resume from step 20 (steps 40) overwrote config.before_step_20.json
  with the crashed attempt's config and reported 'train.steps: 30 -> 40'."""
  trained = tiny_config(20).to_json_best_effort(indent=2)
  (tmp_path / "config.json").write_text(trained)
  workdir = epath.Path(tmp_path)
  assert train.keep_changed_config(workdir, tiny_config(30), 20) == ["train.steps"]
  (tmp_path / "config.json").write_text(tiny_config(30).to_json_best_effort(indent=2))
  with caplog.at_level("WARNING"):  # the attempt with steps 30 crashed; now steps 40
    assert train.keep_changed_config(workdir, tiny_config(40), 20) == ["train.steps"]
  assert "train.steps: 20 -> 40" in caplog.text
  assert (tmp_path / "config.before_step_20.json").read_text() == trained


def test_a_preempted_step_is_not_evaluated(tmp_path, monkeypatch, caplog):
  """The grace period after SIGTERM goes to the checkpoint, not to an evaluation due at
  that step; the steps before it are evaluated as configured."""
  config = tiny_config(6, train=dict(eval_every=2, checkpoint_every=2))
  evaluated_at, real = [], train.evaluate_state
  monkeypatch.setattr(train.Preemption, "reached", lambda self, mngr, step: step == 4)
  monkeypatch.setattr(
    train,
    "evaluate_state",
    lambda *a, step, **k: evaluated_at.append(step) or real(*a, step=step, **k),
  )
  with caplog.at_level("WARNING"):
    train.train(config, str(tmp_path))
  assert evaluated_at == [2]
  assert "preempted: checkpoint at step 4 written (its evaluation skipped)" in caplog.text


def test_sigterm_during_an_evaluation_cuts_it_short_and_checkpoints_its_step(
  tmp_path, monkeypatch, caplog
):
  """An evaluation can outlast a preemption's grace period: a SIGTERM during
  one waited for its end and for the next step, and the process was killed before the
  checkpoint. Now the evaluation stops at once and its step is saved, also where it is
  not a checkpoint step; the metrics of the evaluation before it are kept."""
  config = tiny_config(6, train=dict(eval_every=2, checkpoint_every=3))
  real = train.evaluate_state

  def evaluate(*args, step, **kwargs):
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(120)  # an evaluation longer than any grace period
      raise AssertionError("the evaluation was not interrupted")
    return real(*args, step=step, **kwargs)

  monkeypatch.setattr(train, "evaluate_state", evaluate)
  with caplog.at_level("WARNING"):
    final = train.train(config, str(tmp_path))
  assert final["step"] == 4 and np.isfinite(final["eval/loss"])  # step 2's evaluation
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "4"]
  assert "preempted: checkpoint at step 4 written (its evaluation interrupted)" in caplog.text
  assert not (tmp_path / "export").exists()


def test_sigterm_between_the_steps_check_and_its_evaluation_skips_the_evaluation(
  tmp_path, monkeypatch, caplog
):
  """A signal after the step's preemption check (here while its metrics are fetched)
  but before its evaluation began waited for the whole evaluation and one more step."""
  config = tiny_config(6, train=dict(eval_every=2, checkpoint_every=3))
  check, evaluate, evaluated_at = train.check_finite, train.evaluate_state, []

  def signal_at_4(bad, fetched, step, mngr):
    check(bad, fetched, step, mngr)
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(train, "check_finite", signal_at_4)
  monkeypatch.setattr(
    train,
    "evaluate_state",
    lambda *a, step, **k: evaluated_at.append(step) or evaluate(*a, step=step, **k),
  )
  with caplog.at_level("WARNING"):
    final = train.train(config, str(tmp_path))
  assert final["step"] == 4 and evaluated_at == [2]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "4"]
  assert "preempted: checkpoint at step 4 written (its evaluation interrupted)" in caplog.text


def test_ctrl_c_checkpoints_at_the_next_step_and_a_second_one_stops_at_once(
  tmp_path, monkeypatch, caplog
):
  """Ctrl-C raised KeyboardInterrupt wherever it landed: inside Orbax's wait for the
  previous save it left that save uncommitted, and the next start deleted it (review
  helper-86). Now it is a SIGTERM: the step is checkpointed and the run stops; Ctrl-C is
  Python's own again after training; a second Ctrl-C stops at once."""
  config = tiny_config(6, train=dict(checkpoint_every=4, log_every=1))
  check = train.check_finite

  def ctrl_c_at_2(bad, fetched, step, mngr):
    check(bad, fetched, step, mngr)
    if step == 2:
      os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(train, "check_finite", ctrl_c_at_2)
  with caplog.at_level("WARNING"):
    final = train.train(config, str(tmp_path))
  assert final["step"] == 3  # the signal came after step 2's check: the next boundary
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]
  assert "SIGINT received: checkpointing at the next step boundary" in caplog.text
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  preemption = train.Preemption()
  preemption.catch_sigint()  # as the trainer does once the setup is done
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.requested
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    preemption.close()


def test_preempted_at_the_last_step_exits_cleanly_and_finishes_when_started_again(
  tmp_path, monkeypatch
):
  """SIGTERM at the last step: the checkpoint is written, the evaluation and the export
  are left to the next start (it raised on the headline's missing eval/loss instead of
  exiting 0); started again, the run evaluates, exports and names its headline."""
  config = tiny_config(4, train=dict(eval_every=4))
  config.eval.headline = {"final/loss": "eval/loss"}
  monkeypatch.setattr(train.Preemption, "reached", lambda self, mngr, step: step == 4)
  preempted = train.train(config, str(tmp_path))
  assert preempted["step"] == 4 and "final/loss" not in preempted
  assert (tmp_path / "checkpoints" / "4").is_dir() and not (tmp_path / "export").exists()
  monkeypatch.undo()
  finished = train.train(config, str(tmp_path))
  assert finished["final/loss"] == finished["eval/loss"]
  assert (tmp_path / "export" / "params").is_dir()


def test_an_error_in_an_evaluation_keeps_the_checkpoint_saved_before_it(tmp_path, monkeypatch):
  """Saves are asynchronous: the evaluation at a checkpoint step failing left only
  checkpoints/2.orbax-checkpoint-tmp, and a resume repeated those steps."""
  config = tiny_config(4, train=dict(eval_every=2, checkpoint_every=2))
  restarted = []
  monkeypatch.setattr(train.Throughput, "restart", lambda self, step: restarted.append(step))

  def failing(*args, step, **kwargs):
    assert restarted == [0]  # the timer restarts after each evaluation, not before
    raise RuntimeError("the eval set is unreadable")

  monkeypatch.setattr(train, "evaluate_state", failing)
  with pytest.raises(RuntimeError, match="unreadable"):
    train.train(config, str(tmp_path))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def test_a_batch_that_does_not_split_fails_before_any_state_is_built(tmp_path):
  config = tiny_config(3, mesh=dict(data=8, fsdp=1, tensor=1), data=dict(global_batch_size=12))
  with pytest.raises(sharding_lib.MeshError, match=r"global_batch_size=12 .* 8 batch shards"):
    train.train(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
