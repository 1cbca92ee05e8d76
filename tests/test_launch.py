"""launch/*.sh: syntax, -h, and the commands each prints under --dry-run (no gcloud,
SLURM or JAX). The TPU VM's remote commands run here, in a fake home, with stand-ins for
gcloud and the trainer."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses / end-to-end training

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = ("tpu_vm.sh", "gpu_multinode.sh", "local.sh")

# Variables a developer's shell may have set that would change what the scripts print.
SCRIPT_ENV = (
  "PROJECT",
  "ZONE",
  "ACCELERATOR_TYPE",
  "RUNTIME_VERSION",
  "TPU_NAME",
  "WORKDIR",
  "CONFIG",
  "SPOT",
  "PREEMPTIBLE",
  "DRY_RUN",
  "LOG_WORKER",
  "STOP_TIMEOUT",
  "COORDINATOR_PORT",
  "MASTER_PORT",
  "MASTER_ADDR",
  "NNODES",
  "NODE_RANK",
  "NPROC_PER_NODE",
  "PYTHON",
  "CUDA_VISIBLE_DEVICES",
)


def run(
  script: str, *args: str, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
  clean = {
    k: v for k, v in os.environ.items() if k not in SCRIPT_ENV and not k.startswith("SLURM_")
  }
  result = subprocess.run(
    ["bash", str(LAUNCH / script), *args],
    env={**clean, **(env or {})},
    capture_output=True,
    text=True,
    timeout=30,
  )
  if check:
    assert result.returncode == 0, result.stderr
  return result


def commands(output: str) -> list[list[str]]:
  """The commands printed as `+ CMD` lines, split as the shell would split them."""
  return [shlex.split(line[2:]) for line in output.splitlines() if line.startswith("+ ")]


def flag(argv: list[str], name: str) -> str:
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")]
  assert len(values) == 1, f"{name} in {argv}"
  return values[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax_and_help(script):
  subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
  assert "set -euo pipefail" in (LAUNCH / script).read_text()
  help_text = run(script, "-h").stdout
  assert f"launch/{script}" in help_text and "--dry-run" in help_text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
  # -x follows `source launch/common.sh` (paths relative to the repository root).
  subprocess.run(["shellcheck", "-x", str(LAUNCH / script)], check=True, cwd=LAUNCH.parent)


TPU_ENV = dict(
  PROJECT="my-project", ZONE="us-central2-b", TPU_NAME="coca-test", WORKDIR="gs://bucket/run1"
)


def remote_trainer(remote: str) -> list[str]:
  """The trainer's command line in train's remote command: the arguments of its wrapper
  (`bash -c SCRIPT coca_train ARGS`) after $0, up to the log redirection."""
  return shlex.split(re.search(r" coca_train (.*?) >", remote).group(1))


def fake_trainer(code: str = "import time; time.sleep(60)") -> subprocess.Popen:
  """A process the remote commands take for a trainer: coca_jax.train on its command line."""
  return subprocess.Popen([sys.executable, "-c", code, "-m", "coca_jax.train"])


def on_worker(command: str, home: Path, **env: str) -> subprocess.CompletedProcess:
  """Runs a remote --command here, as the worker's shell would, in a fake home."""
  return subprocess.run(
    ["bash", "-c", command],
    env={**os.environ, "HOME": str(home), **env},
    capture_output=True,
    text=True,
    timeout=30,
  )


def wait_for(condition, seconds: float = 10) -> None:
  deadline = time.monotonic() + seconds
  while not condition():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.05)


# The trainer on a fake worker (~/coca_venv/bin/python): its command line says coca_jax.train
# like the real one's; $FAKE_TRAINER picks what it does.
TRAINER_STUB = """#!/bin/sh
echo "trainer $*"
case "$FAKE_TRAINER" in
  preempted) echo "W1130 train.py:396] preempted: checkpoint at step 5 written; exiting" ;;
  error) echo "ValueError: boom" >&2; exit 3 ;;
  sigterm)
    trap 'sleep 1; echo "W1130 train.py:396] preempted: checkpoint at step 7 written"; exit 0' TERM
    touch ~/trainer_ready
    while :; do sleep 0.1; done ;;
esac
exit 0
"""

# gcloud on PATH: logs its arguments; describe prints $FAKE_STATE (fails when it is empty, as
# for a slice that does not exist), create prints $FAKE_CREATE_ERR on stderr and exits
# $FAKE_CREATE_RC, scp copies the archive to
# shipped.tar.gz, ssh runs --command here in the fake home (setup's pip install excepted;
# the log stream exits $FAKE_LOGS_RC instead when it is set: a dropped connection).
GCLOUD_STUB = """#!/bin/bash
echo "$*" >>{tmp}/gcloud.log
case "$4" in
  describe) if [ -n "${{FAKE_STATE:-}}" ]; then echo "$FAKE_STATE"; else exit 1; fi ;;
  create) echo "${{FAKE_CREATE_ERR:-}}" >&2; exit "${{FAKE_CREATE_RC:-0}}" ;;
  scp) echo "$5" >>{tmp}/archives.log; cp "$5" {tmp}/shipped.tar.gz ;;
  ssh)
    for arg; do case "$arg" in --command=*) command="${{arg#--command=}}" ;; esac; done
    case "$command" in *"pip install"*) exit "${{FAKE_SETUP_RC:-0}}" ;; esac
    case "$command" in *"tail "*) [ -z "${{FAKE_LOGS_RC:-}}" ] || exit "$FAKE_LOGS_RC" ;; esac
    HOME={home} exec bash -c "$command" ;;
esac
"""


def fake_slice(tmp_path: Path) -> tuple[Path, dict]:
  """A fake home (the worker's) and the environment that makes gcloud a stand-in using it."""
  home = tmp_path / "home"
  (home / "coca_jax").mkdir(parents=True)
  python = home / "coca_venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text(TRAINER_STUB)
  python.chmod(0o755)
  gcloud = tmp_path / "bin" / "gcloud"
  gcloud.parent.mkdir()
  gcloud.write_text(GCLOUD_STUB.format(tmp=tmp_path, home=home))
  gcloud.chmod(0o755)
  (tmp_path / "tmpdir").mkdir()
  env = dict(
    TPU_ENV,
    PATH=f"{gcloud.parent}:{os.environ['PATH']}",
    TMPDIR=str(tmp_path / "tmpdir"),
    FAKE_STATE="READY",
  )
  return home, env


def test_tpu_vm_all_dry_run():
  out = run(
    "tpu_vm.sh",
    "--dry-run",
    "--spot",
    "--accelerator_type=v4-64",
    "all",
    "--config=configs/large.py:bf16",
    "--config.optim.lr=5e-4",
    "--",
    "--config.train.steps=100",
    env=TPU_ENV,
  ).stdout
  cmds = commands(out)
  gcloud = [c for c in cmds if c[:1] == ["gcloud"]]
  assert all(c[1:4] == ["compute", "tpus", "tpu-vm"] for c in gcloud)
  verbs = [c[4] for c in gcloud]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"], (
    verbs
  )  # ... setup, train, logs

  create = gcloud[1]
  assert create[5] == "coca-test"
  assert (
    "--accelerator-type=v4-64" in create and "--spot" in create and "--preemptible" not in create
  )
  assert "--zone=us-central2-b" in create and "--project=my-project" in create
  assert flag(create, "--version") == "tpu-ubuntu2204-base"

  scp, setup, train, logs = gcloud[2:]
  assert "--worker=all" in scp and scp[-4].endswith(".tar.gz")
  assert "--worker=all" in setup and "pip install" in flag(setup, "--command")
  assert "-e '.[tpu]'" in flag(setup, "--command")

  assert "--worker=all" in train
  remote = flag(train, "--command")
  assert "nohup" in remote
  trainer = remote_trainer(remote)
  assert trainer[1:3] == ["-m", "coca_jax.train"]
  assert trainer[3:] == [
    "--config=configs/large.py:bf16",
    "--workdir=gs://bucket/run1",
    "--config.optim.lr=5e-4",
    "--config.train.steps=100",
  ]
  assert "--worker=0" in logs and "tail" in flag(logs, "--command")


def test_tpu_vm_all_again_leaves_a_running_trainer_alone(tmp_path):
  """`all` run again while training (a retry loop whose log stream dropped): setup must not
  replace the code under the live trainer, and train must leave it running and succeed,
  so that `all` goes on to the logs. The remote commands run here, in a fake home."""
  out = run("tpu_vm.sh", "--dry-run", "all", env=TPU_ENV).stdout
  _, _, _, setup, train, _ = [c for c in commands(out) if c[:1] == ["gcloud"]]
  home = tmp_path / "home"
  (home / "coca_jax").mkdir(parents=True)
  (home / "coca_jax" / "running_code.py").touch()
  trainer = fake_trainer()
  try:
    (home / "coca_train.pid").write_text(f"{trainer.pid}\n")
    for remote in (flag(setup, "--command"), flag(train, "--command")):
      result = subprocess.run(
        ["bash", "-c", remote],
        env={**os.environ, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=30,
      )
      assert result.returncode == 0, result.stderr
      assert f"(pid {trainer.pid})" in result.stdout
    assert (home / "coca_jax" / "running_code.py").exists()
    assert (home / "coca_train.pid").read_text() == f"{trainer.pid}\n"
  finally:
    trainer.kill()
    trainer.wait()


def clone_for_setup(tmp_path: Path) -> Path:
  """A clone of this repository (its last commit) with the scripts under test."""
  repo = tmp_path / "repo"
  subprocess.run(["git", "clone", "-q", str(LAUNCH.parent), str(repo)], check=True)
  shutil.copytree(LAUNCH, repo / "launch", dirs_exist_ok=True)
  return repo


def setup_in(repo: Path, env: dict) -> subprocess.CompletedProcess:
  return subprocess.run(
    ["bash", str(repo / "launch" / "tpu_vm.sh"), "setup"],
    env={**os.environ, **env},
    capture_output=True,
    text=True,
    timeout=60,
  )


def test_tpu_vm_setup_ships_the_working_tree_with_a_file_deleted(tmp_path):
  """A tracked file deleted but not committed: git still lists it, and tar stopped the
  script (set -e) before anything was copied. gcloud is a stub that records its calls
  and keeps a copy of the archive it is given."""
  repo = clone_for_setup(tmp_path)
  (repo / "docs" / "ARCHITECTURE.md").unlink()
  (repo / "NEW.txt").write_text("untracked\n")
  _, env = fake_slice(tmp_path)
  result = setup_in(repo, env)
  assert result.returncode == 0, result.stderr
  names = tarfile.open(tmp_path / "shipped.tar.gz").getnames()
  assert "NEW.txt" in names and "coca_jax/train.py" in names
  assert "docs/ARCHITECTURE.md" not in names
  assert "scp" in (tmp_path / "gcloud.log").read_text()


def test_tpu_vm_setup_with_the_last_listed_file_deleted(tmp_path):
  """The file-list filter ended with status 1 when the LAST path git lists was gone, and
  pipefail + set -e stopped the script without a word, before the copy."""
  repo = clone_for_setup(tmp_path)
  listed = subprocess.run(
    ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
    cwd=repo,
    check=True,
    capture_output=True,
    text=True,
  ).stdout.splitlines()
  (repo / listed[-1]).unlink()
  _, env = fake_slice(tmp_path)
  result = setup_in(repo, env)
  assert result.returncode == 0, result.stderr
  names = tarfile.open(tmp_path / "shipped.tar.gz").getnames()
  assert listed[-1] not in names and "coca_jax/train.py" in names


def test_tpu_vm_setup_archive_is_its_own_and_removed(tmp_path):
  """Each launch writes its archive to a path of its own (two launches at once shipped
  whichever was written last) and removes it once copied."""
  repo = clone_for_setup(tmp_path)
  _, env = fake_slice(tmp_path)
  for _ in range(2):
    result = setup_in(repo, env)
    assert result.returncode == 0, result.stderr
  first, second = (tmp_path / "archives.log").read_text().split()
  assert first != second
  assert all(Path(a).is_relative_to(tmp_path / "tmpdir") for a in (first, second))
  assert list((tmp_path / "tmpdir").iterdir()) == []


def test_tpu_vm_quotes_overrides_for_the_remote_shell():
  out = run(
    "tpu_vm.sh", "--dry-run", "train", "--config.data.prompt=a photo of the {}", env=TPU_ENV
  ).stdout
  (train,) = commands(out)
  remote = flag(train, "--command")
  trainer = remote_trainer(remote)
  assert trainer[-1] == "--config.data.prompt=a photo of the {}"


def test_tpu_vm_preemptible_and_delete():
  create = commands(run("tpu_vm.sh", "--dry-run", "--preemptible", "create", env=TPU_ENV).stdout)[
    -1
  ]
  assert "--preemptible" in create and "--spot" not in create
  (delete,) = commands(run("tpu_vm.sh", "--dry-run", "delete", env=TPU_ENV).stdout)
  assert delete[4:6] == ["delete", "coca-test"] and "--quiet" in delete
  (stop,) = commands(run("tpu_vm.sh", "--dry-run", "stop", env=TPU_ENV).stdout)
  assert "--worker=all" in stop and "kill -TERM" in flag(stop, "--command")


def test_tpu_vm_rejects_bad_input():
  no_workdir = run(
    "tpu_vm.sh", "--dry-run", "train", env={**TPU_ENV, "WORKDIR": "/tmp/local"}, check=False
  )
  assert no_workdir.returncode != 0 and "gs://" in no_workdir.stderr
  both = run(
    "tpu_vm.sh", "--dry-run", "--spot", "--preemptible", "create", env=TPU_ENV, check=False
  )
  assert both.returncode != 0
  unknown = run("tpu_vm.sh", "--dry-run", "launch", env=TPU_ENV, check=False)
  assert unknown.returncode != 0 and "unknown subcommand" in unknown.stderr


@pytest.mark.parametrize(
  "accelerator, version",
  [
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
  ],
)
def test_tpu_vm_runtime_version_follows_the_accelerator(accelerator, version):
  def create_version(*args, **env):
    out = run("tpu_vm.sh", "--dry-run", *args, "create", env={**TPU_ENV, **env}).stdout
    return flag(commands(out)[-1], "--version")

  assert create_version(f"--accelerator_type={accelerator}") == version
  assert create_version(ACCELERATOR_TYPE=accelerator) == version
  # Given, it is kept.
  assert create_version(f"--accelerator_type={accelerator}", "--runtime_version=mine") == "mine"
  assert create_version(ACCELERATOR_TYPE=accelerator, RUNTIME_VERSION="mine") == "mine"


@pytest.mark.parametrize("state", ["PREEMPTED", "TERMINATED", "STOPPED", "UNHEALTHY", "DELETING"])
def test_tpu_vm_create_replaces_only_a_preempted_or_terminated_slice(tmp_path, state):
  _, env = fake_slice(tmp_path)
  result = run("tpu_vm.sh", "create", env={**env, "FAKE_STATE": state}, check=False)
  verbs = [line.split()[3] for line in (tmp_path / "gcloud.log").read_text().splitlines()]
  if state in ("PREEMPTED", "TERMINATED"):
    assert result.returncode == 0, result.stderr
    assert verbs == ["describe", "delete", "create"]
  else:
    assert result.returncode != 0 and state in result.stderr
    assert verbs == ["describe"]


# A quota refusal is RESOURCE_EXHAUSTED too, but another try gets the same quota.
NO_QUOTA = (
  'ERROR: {"code": 8, "message": "Quota limit \'TPUV6EPreemptiblePerProjectPerRegionForTPUAPI\' '
  'has been exceeded. Limit: 0 in region us-east5."}'
)
# What gcloud says when a zone has no TPU left (RESOURCE_EXHAUSTED).
NO_CAPACITY = (
  'ERROR: (gcloud.compute.tpus.tpu-vm.create) {"code": 8, "message": "There is no more '
  'capacity in the zone \\"us-central2-b\\""}'
)


@pytest.mark.parametrize(
  "trainer, env, status",
  [
    ("finished", {}, 0),
    ("preempted", {}, 75),  # exit 0 after the preempted line: worth retrying
    ("error", {}, 3),  # the trainer's own failure: not retried
    ("finished", {"FAKE_LOGS_RC": "255"}, 75),  # the ssh connection dropped
    ("finished", {"FAKE_STATE": "", "FAKE_CREATE_RC": "1", "FAKE_CREATE_ERR": NO_CAPACITY}, 75),
    # Any other refusal fails every time: a retry loop on 75 looped forever on it.
    (
      "finished",
      {"FAKE_STATE": "", "FAKE_CREATE_RC": "1", "FAKE_CREATE_ERR": "ERROR: PERMISSION_DENIED"},
      1,
    ),
    ("finished", {"FAKE_STATE": "", "FAKE_CREATE_RC": "1", "FAKE_CREATE_ERR": NO_QUOTA}, 1),
    (
      "finished",
      {"FAKE_STATE": "", "FAKE_CREATE_RC": "1", "FAKE_CREATE_ERR": "ERROR: INVALID_ARGUMENT v4-33"},
      1,
    ),
    ("finished", {"FAKE_SETUP_RC": "1"}, 1),  # setup failed on a live slice: not retried
    # setup's ssh failed because the slice was preempted under it: retried
    ("finished", {"FAKE_SETUP_RC": "1", "FAKE_STATE": "PREEMPTED"}, 75),
  ],
)
def test_tpu_vm_all_ends_with_a_status_a_retry_loop_can_use(tmp_path, trainer, env, status):
  """`all` ended only when killed (`tail -F` forever), so `until all; do ...; done` never
  ended. Now it returns once the trainer has exited: 0 done, 75 worth retrying, else failed.
  `logs` alone exits with the trainer's own status."""
  home, slice_env = fake_slice(tmp_path)
  env = {**slice_env, "FAKE_TRAINER": trainer, **env}
  result = run("tpu_vm.sh", "all", "--config.train.steps=9", env=env, check=False)
  assert result.returncode == status, result.stderr
  if "FAKE_CREATE_RC" in env or "FAKE_SETUP_RC" in env:
    assert not (home / "coca_train.pid").exists()  # no trainer was started
    return
  trainer_pid = int((home / "coca_train.pid").read_text())
  if "FAKE_LOGS_RC" not in env:
    assert "trainer -m coca_jax.train --config=configs/base.py" in result.stdout
    assert "--config.train.steps=9" in result.stdout
  wait_for(lambda: not Path(f"/proc/{trainer_pid}").exists())
  env.pop("FAKE_LOGS_RC", None)  # connected again
  logs = run("tpu_vm.sh", "logs", env=env, check=False)
  assert logs.returncode == {"error": 3}.get(trainer, 0), logs.stderr
  assert "trainer -m coca_jax.train" in logs.stdout


def test_tpu_vm_stop_waits_and_all_then_exits_0(tmp_path):
  """`stop` returned right after SIGTERM, so `stop && train` found the old trainer alive
  and started nothing; now it returns once the trainer has exited (checkpoint written)
  and leaves a marker, so that `all` following the log does not take the exit for a
  preemption."""
  home, env = fake_slice(tmp_path)
  env = {**env, "FAKE_TRAINER": "sigterm"}
  clean = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
  all_ = subprocess.Popen(
    ["bash", str(LAUNCH / "tpu_vm.sh"), "all"],
    env={**clean, **env},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  pid_file = home / "coca_train.pid"
  try:
    wait_for((home / "trainer_ready").exists)  # its SIGTERM trap in place
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip())
    trainer_pid = int(pid_file.read_text())
    stop = run("tpu_vm.sh", "stop", env=env)
    assert not Path(f"/proc/{trainer_pid}").exists(), "stop returned, the trainer still running"
    assert "exited" in stop.stdout
    assert not pid_file.exists() and (home / "coca_train.stopped").exists()
    out, err = all_.communicate(timeout=30)
    assert all_.returncode == 0, err
    assert "preempted: checkpoint at step 7" in out
  finally:
    all_.kill()
    all_.wait()
    if pid_file.exists():
      subprocess.run(["kill", pid_file.read_text().strip()], check=False)


def test_tpu_vm_stop_gives_up_after_stop_timeout(tmp_path):
  (stop,) = commands(
    run("tpu_vm.sh", "--dry-run", "stop", env={**TPU_ENV, "STOP_TIMEOUT": "1"}).stdout
  )
  home = tmp_path / "home"
  home.mkdir()
  ready = tmp_path / "ready"
  trainer = fake_trainer(
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    f"open({str(ready)!r}, 'w').close(); time.sleep(60)"
  )
  try:
    wait_for(ready.exists)
    (home / "coca_train.pid").write_text(f"{trainer.pid}\n")
    result = on_worker(flag(stop, "--command"), home)
    assert result.returncode != 0 and "STOP_TIMEOUT" in result.stderr
    assert trainer.poll() is None
  finally:
    trainer.kill()
    trainer.wait()


def test_tpu_vm_a_stale_pid_file_is_not_a_trainer(tmp_path):
  """After a reboot ~/coca_train.pid can name some other process: train must not take it
  for a trainer (and leave it alone), it starts one."""
  home, _ = fake_slice(tmp_path)
  (train,) = commands(run("tpu_vm.sh", "--dry-run", "train", env=TPU_ENV).stdout)
  other = subprocess.Popen(["sleep", "60"])
  try:
    (home / "coca_train.pid").write_text(f"{other.pid}\n")
    result = on_worker(flag(train, "--command"), home, FAKE_TRAINER="finished")
    assert result.returncode == 0, result.stderr
    assert "started pid" in result.stdout
    assert int((home / "coca_train.pid").read_text()) != other.pid
    wait_for(lambda: (home / "coca_train.rc").exists())
    assert other.poll() is None
  finally:
    other.kill()
    other.wait()


def trainer_args(argv: list[str]) -> list[str]:
  start = argv.index("-m")
  assert argv[start + 1] == "coca_jax.train"
  return argv[start + 2 :]


def test_gpu_slurm_dry_run(tmp_path):
  # A stand-in for scontrol: expands the job's node list as SLURM would.
  scontrol = tmp_path / "scontrol"
  scontrol.write_text("#!/bin/sh\nprintf 'gpu-01\\ngpu-02\\ngpu-03\\n'\n")
  scontrol.chmod(0o755)
  env = dict(
    PATH=f"{tmp_path}:{os.environ['PATH']}",
    SLURM_JOB_ID="42",
    SLURM_JOB_NODELIST="gpu-[01-03]",
    SLURM_NNODES="3",
    SLURM_NTASKS="6",
  )
  out = run(
    "gpu_multinode.sh",
    "--dry-run",
    "--workdir=/shared/run1",
    "--port=23456",
    "--config.optim.lr=5e-4",
    env=env,
  ).stdout
  (srun,) = commands(out)
  assert srun[0] == "srun" and "--ntasks=6" in srun and "--ntasks-per-node=2" in srun
  assert "--task" in srun and "--coordinator=gpu-01:23456" in srun
  processes = [line for line in out.splitlines() if line.startswith("# process ")]
  assert len(processes) == 6
  for process_id, line in enumerate(processes):
    head, command = line.split(": ", 1)
    assert head == f"# process {process_id} on gpu-0{process_id // 2 + 1}"
    argv = shlex.split(command)
    assert argv[0] == f"CUDA_VISIBLE_DEVICES={process_id % 2}"
    args = trainer_args(argv)
    assert args[:3] == [
      "--config=configs/base.py",
      "--workdir=/shared/run1",
      "--config.optim.lr=5e-4",
    ]
    assert flag(args, "--coordinator_address") == "gpu-01:23456"
    assert flag(args, "--num_processes") == "6"
    assert flag(args, "--process_id") == str(process_id)


def test_gpu_env_vars_dry_run():
  env = dict(
    NNODES="3", NODE_RANK="2", MASTER_ADDR="10.1.2.3", MASTER_PORT="29500", NPROC_PER_NODE="2"
  )
  out = run(
    "gpu_multinode.sh",
    "--dry-run",
    "--workdir=/shared/run1",
    "--",
    "--config.train.steps=7",
    env=env,
  ).stdout
  cmds = commands(out)
  assert len(cmds) == 2
  for local_rank, argv in enumerate(cmds):
    assert argv[0] == f"CUDA_VISIBLE_DEVICES={local_rank}"
    args = trainer_args(argv)
    assert "--config.train.steps=7" in args
    assert flag(args, "--coordinator_address") == "10.1.2.3:29500"
    assert flag(args, "--num_processes") == "6"
    assert flag(args, "--process_id") == str(4 + local_rank)


def test_gpu_one_process_per_node():
  env = dict(NNODES="2", NODE_RANK="0", MASTER_ADDR="node0")
  (argv,) = commands(run("gpu_multinode.sh", "--dry-run", "--workdir=/w", env=env).stdout)
  args = trainer_args(argv)
  assert not argv[0].startswith("CUDA_VISIBLE_DEVICES")
  assert (flag(args, "--num_processes"), flag(args, "--process_id")) == ("2", "0")


@pytest.mark.parametrize(
  "env, missing",
  [
    (dict(NNODES="2", NODE_RANK="1"), "MASTER_ADDR"),
    # Two nodes both defaulting to NODE_RANK=0 claimed the same process ids.
    (dict(NNODES="2", MASTER_ADDR="node0"), "NODE_RANK"),
  ],
)
def test_gpu_several_nodes_need_master_addr_and_node_rank(env, missing):
  result = run("gpu_multinode.sh", "--dry-run", "--workdir=/w", env=env, check=False)
  assert result.returncode != 0 and missing in result.stderr


def test_gpu_task_mode_execs_trainer(tmp_path):
  # The per-task path srun takes, with a stand-in python that prints its arguments.
  python = tmp_path / "python"
  python.write_text('#!/bin/sh\necho "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES $*"\n')
  python.chmod(0o755)
  env = dict(
    SLURM_NTASKS="4",
    SLURM_NNODES="2",
    SLURM_PROCID="3",
    SLURM_LOCALID="1",
    CUDA_VISIBLE_DEVICES="4,5",
  )
  out = run(
    "gpu_multinode.sh",
    "--task",
    "--coordinator=gpu-01:12345",
    f"--python={python}",
    "--workdir=/w",
    "--",
    "--config.train.steps=2",
    env=env,
  ).stdout.split()
  assert out[0] == "CUDA_VISIBLE_DEVICES=5"
  # SLURM bound one GPU to the task (--gpus-per-task=1): it stays, whatever SLURM_LOCALID.
  bound = run(
    "gpu_multinode.sh",
    "--task",
    "--coordinator=gpu-01:12345",
    f"--python={python}",
    "--workdir=/w",
    env={**env, "CUDA_VISIBLE_DEVICES": "0"},
  ).stdout.split()
  assert bound[0] == "CUDA_VISIBLE_DEVICES=0"
  # --gpus-per-task=2: the task's two GPUs stay (SLURM_LOCALID 1 took GPU 5, another's).
  pair = run(
    "gpu_multinode.sh",
    "--task",
    "--coordinator=gpu-01:12345",
    f"--python={python}",
    "--workdir=/w",
    env={**env, "CUDA_VISIBLE_DEVICES": "4,5", "SLURM_GPUS_PER_TASK": "2"},
  ).stdout.split()
  assert pair[0] == "CUDA_VISIBLE_DEVICES=4,5"
  # Tasks that do not split over the nodes, or more tasks than listed GPUs: an error.
  for more, message in (
    (dict(SLURM_NTASKS="3"), "same number of tasks"),
    (dict(SLURM_NTASKS="8", SLURM_LOCALID="2"), "lists 2 GPU"),
  ):
    failed = run(
      "gpu_multinode.sh",
      "--task",
      "--coordinator=gpu-01:12345",
      f"--python={python}",
      "--workdir=/w",
      env={**env, **more},
      check=False,
    )
    assert failed.returncode != 0 and message in failed.stderr, failed.stderr
  assert out[1:] == [
    "-m",
    "coca_jax.train",
    "--config=configs/base.py",
    "--workdir=/w",
    "--config.train.steps=2",
    "--coordinator_address=gpu-01:12345",
    "--num_processes=4",
    "--process_id=3",
  ]


def test_local_dry_run():
  (argv,) = commands(
    run("local.sh", "--dry-run", "--config.train.steps=50", env=dict(PYTHON="python3")).stdout
  )
  assert argv == [
    "python3",
    "-m",
    "coca_jax.train",
    "--config=configs/demo.py",
    "--workdir=/tmp/coca_demo",
    "--config.train.steps=50",
  ]
  (argv,) = commands(
    run("local.sh", "--dry-run", env=dict(PYTHON="python3", WORKDIR="/tmp/elsewhere")).stdout
  )
  assert "--workdir=/tmp/elsewhere" in argv


def test_gpu_rejects_too_few_visible_gpus():
  env = dict(NPROC_PER_NODE="4", CUDA_VISIBLE_DEVICES="2,3")
  result = run("gpu_multinode.sh", "--dry-run", "--workdir=/w", env=env, check=False)
  assert result.returncode != 0 and "CUDA_VISIBLE_DEVICES" in result.stderr
  env["CUDA_VISIBLE_DEVICES"] = "2,3,5,7"
  cmds = commands(run("gpu_multinode.sh", "--dry-run", "--workdir=/w", env=env).stdout)
  assert [argv[0] for argv in cmds] == [f"CUDA_VISIBLE_DEVICES={g}" for g in (2, 3, 5, 7)]


def test_gpu_rejects_nnodes_inside_a_slurm_job():
  env = dict(SLURM_JOB_ID="42", SLURM_JOB_NODELIST="gpu-01,gpu-02", NNODES="2")
  result = run("gpu_multinode.sh", "--dry-run", "--workdir=/w", env=env, check=False)
  assert result.returncode != 0
  assert "SLURM_JOB_ID" in result.stderr and "NNODES" in result.stderr


def test_gpu_one_process_runs_without_a_coordinator():
  """A lone process needs no jax.distributed; its coordinator's port made two single-GPU
  runs on one machine collide."""
  (argv,) = commands(run("gpu_multinode.sh", "--dry-run", "--workdir=/w").stdout)
  assert trainer_args(argv) == ["--config=configs/base.py", "--workdir=/w"]
  two = commands(
    run("gpu_multinode.sh", "--dry-run", "--workdir=/w", env=dict(NPROC_PER_NODE="2")).stdout
  )
  assert all(flag(trainer_args(argv), "--num_processes") == "2" for argv in two)


def local_copy(tmp_path: Path) -> Path:
  """launch/local.sh and common.sh in an empty repository folder, whose .venv the test makes."""
  (tmp_path / "repo" / "launch").mkdir(parents=True)
  for name in ("local.sh", "common.sh"):
    shutil.copy(LAUNCH / name, tmp_path / "repo" / "launch" / name)
  return tmp_path / "repo" / "launch" / "local.sh"


def test_local_repairs_a_half_made_venv(tmp_path):
  """A .venv/bin/python without coca_jax (an interrupted install) was taken for a ready
  .venv, and the trainer then failed on every run."""
  script = local_copy(tmp_path)
  python = tmp_path / "repo" / ".venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  # A Python, but without coca_jax: this one with no site-packages.
  python.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
  python.chmod(0o755)
  clean = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
  result = subprocess.run(
    ["bash", str(script), "--dry-run"], env=clean, capture_output=True, text=True, timeout=30
  )
  assert result.returncode == 0, result.stderr
  setup, install, train = commands(result.stdout)
  assert setup[1:] == ["-m", "venv", ".venv"] and install[:4] == [
    ".venv/bin/python",
    "-m",
    "pip",
    "install",
  ]
  assert train[0] == str(python)


def test_local_needs_python_3_11(tmp_path):
  script = local_copy(tmp_path)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  os.symlink(shutil.which("dirname"), bin_dir / "dirname")
  old = bin_dir / "python3"  # a python3 older than 3.11, and no python3.11
  old.write_text("#!/bin/sh\nexit 1\n")
  old.chmod(0o755)
  clean = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
  result = subprocess.run(
    [shutil.which("bash"), str(script), "--dry-run"],
    env={**clean, "PATH": str(bin_dir)},
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert result.returncode != 0 and "Python 3.11" in result.stderr
