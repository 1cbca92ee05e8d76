"""launch/*.sh: syntax, -h, and the commands each prints under --dry-run (no gcloud,
SLURM or JAX)."""

import os
import re
import shlex
import shutil
import subprocess
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
  trainer = shlex.split(re.search(r"nohup (.*?) >", remote).group(1))
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
  trainer = subprocess.Popen(["sleep", "60"])
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


def test_tpu_vm_setup_ships_the_working_tree_with_a_file_deleted(tmp_path):
  """A tracked file deleted but not committed: git still lists it, and tar stopped the
  script (set -e) before anything was copied. gcloud is a stub that records its calls."""
  repo = tmp_path / "repo"
  subprocess.run(["git", "clone", "-q", str(LAUNCH.parent), str(repo)], check=True)
  shutil.copytree(LAUNCH, repo / "launch", dirs_exist_ok=True)  # the scripts under test
  (repo / "docs" / "ARCHITECTURE.md").unlink()
  (repo / "NEW.txt").write_text("untracked\n")
  stub = tmp_path / "bin" / "gcloud"
  stub.parent.mkdir()
  stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/gcloud.log\n')
  stub.chmod(0o755)
  env = {**TPU_ENV, "PATH": f"{stub.parent}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
  subprocess.run(
    ["bash", str(repo / "launch" / "tpu_vm.sh"), "setup"],
    env={**os.environ, **env},
    check=True,
    capture_output=True,
    timeout=60,
  )
  import tarfile

  names = tarfile.open(tmp_path / "coca_jax_src.tar.gz").getnames()
  assert "NEW.txt" in names and "coca_jax/train.py" in names
  assert "docs/ARCHITECTURE.md" not in names
  assert "scp" in (tmp_path / "gcloud.log").read_text()


def test_tpu_vm_quotes_overrides_for_the_remote_shell():
  out = run(
    "tpu_vm.sh", "--dry-run", "train", "--config.data.prompt=a photo of the {}", env=TPU_ENV
  ).stdout
  (train,) = commands(out)
  remote = flag(train, "--command")
  trainer = shlex.split(re.search(r"nohup (.*?) >", remote).group(1))
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


def test_gpu_rejects_missing_master_addr():
  result = run(
    "gpu_multinode.sh",
    "--dry-run",
    "--workdir=/w",
    env=dict(NNODES="2", NODE_RANK="1"),
    check=False,
  )
  assert result.returncode != 0 and "MASTER_ADDR" in result.stderr


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
