"""Starting a run again: a SIGTERM during the setup is a preemption (exit 0, the line
launch/tpu_vm.sh retries on); a checkpoint past train.steps is a config error; a fresh
start sets the earlier run's configs aside."""

import json
import re
import signal
import subprocess

import pytest
from test_train import REPO, cli, latest_step, run
from tiny_runs import tiny_config

from coca_jax import export, train

pytestmark = pytest.mark.slow  # trainer subprocesses


def signalled(args: list[str], line: str, signum: int) -> tuple[int, str, str]:
  """Runs the trainer `args`, sends it `signum` when its log shows `line`; -> (exit
  status, stdout, stderr)."""
  proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = []
  try:
    for text in proc.stderr:
      lines.append(text)
      if line in text:
        proc.send_signal(signum)
        break
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  return proc.returncode, out, "".join(lines) + err


def test_sigterm_during_the_setup_exits_as_a_preemption(tmp_path):
  """SIGTERM while a resumed run compiles: exit 0 and 'preempted: checkpoint at step', the
  checkpoints and config.json as they were (it was SIGABRT from absl's signal handler,
  status 134, which the retry loop of tpu_vm.sh took for a failure)."""
  first = run(cli(tmp_path, 3))
  assert first.returncode == 0, first.stderr[-3000:]
  config_before = (tmp_path / "config.json").read_text()
  # After the restore: the setup goes on after it.
  status, out, err = signalled(cli(tmp_path, 600), "resumed from checkpoint step 3", signal.SIGTERM)
  assert status == 0, err[-3000:]
  assert re.search(r"preempted: checkpoint at step 3 kept; exiting before the first step", err)
  assert json.loads(out.strip().splitlines()[-1]) == {"step": 3}
  assert latest_step(tmp_path) == 3
  assert (tmp_path / "config.json").read_text() == config_before  # steps=600 not recorded


def test_ctrl_c_during_the_setup_stops_at_once(tmp_path):
  """Ctrl-C before the first step (here as the state is set up): exit status 130 and one
  line, nothing written; after a compilation cut short it had ended in a segmentation
  fault (status 139)."""
  status, _, err = signalled(cli(tmp_path, 600), "parameters:", signal.SIGINT)
  assert status == 130, err[-3000:]
  assert err.strip().splitlines()[-1] == (
    "interrupted (Ctrl-C); the checkpoints already written are kept"
  )
  assert latest_step(tmp_path) is None and not (tmp_path / "config.json").exists()


def test_a_checkpoint_past_train_steps_is_a_config_error(tmp_path):
  """A finished 6-step run started again with train.steps=4 'finished' at step 6 and
  exported it under a config.json that said 4 steps."""
  config = tiny_config(6)
  train.train(config, str(tmp_path))
  config_before = (tmp_path / "config.json").read_text()
  shorter = tiny_config(4)
  with pytest.raises(ValueError, match=r"config\.train\.steps=4 is below step 6 of the checkpoint"):
    train.train(shorter, str(tmp_path))
  assert (tmp_path / "config.json").read_text() == config_before


def test_a_fresh_start_sets_the_earlier_runs_configs_aside(tmp_path):
  """A resume with a changed config keeps config.before_step_3.json; after the checkpoints
  are deleted, a new run's step 3 was exported with that earlier config, and its own
  resume was compared against it."""
  train.train(tiny_config(3), str(tmp_path))
  train.train(tiny_config(6), str(tmp_path))  # train.steps 3 -> 6
  assert (tmp_path / "config.before_step_3.json").exists()
  for name in ("checkpoints", "export"):
    subprocess.run(["rm", "-rf", str(tmp_path / name)], check=True)
  fresh = tiny_config(3)
  fresh.train.export_dtype = "bfloat16"
  train.train(fresh, str(tmp_path))
  assert not list(tmp_path.glob("config.before_step_*.json"))
  (moved,) = list((tmp_path / "earlier_runs").glob("*/config.before_step_3.json"))
  assert json.loads(moved.read_text())["train"]["steps"] == 3
  used = export.config_file_of_step(tmp_path, 3)
  assert used == tmp_path / export.CONFIG_FILE
  assert json.loads(used.read_text())["train"]["export_dtype"] == "bfloat16"
