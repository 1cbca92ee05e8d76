"""`--threads` of the open_clip comparisons follows the process's CPU affinity mask
(`taskset -c`), which XLA's side follows, not the machine's core count.

The masks are faked (os.sched_getaffinity) and the open_clip worker is never started:
its spec is caught on the way, so nothing is installed, compiled or timed.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
from test_bench_decode import TINY_OPEN_CLIP
from test_benchmarks_open_clip import TINY, load_benchmark

# A machine of 8 cores, this process pinned to one of them (`taskset -c 3`).
MACHINE_CPUS = 8
PINNED = {3}


class WorkerStarted(Exception):
  """Raised in place of starting the open_clip worker; carries its spec."""


def load_decode_benchmark(repo):
  spec = importlib.util.spec_from_file_location(
    "benchmarks_open_clip_decode", repo / "benchmarks" / "open_clip_decode.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def pinned(monkeypatch):
  monkeypatch.setattr(os, "cpu_count", lambda: MACHINE_CPUS)
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(PINNED))


def worker_spec_of(run_main) -> dict:
  """The spec the benchmark would send its open_clip worker."""
  with pytest.raises(WorkerStarted) as started:
    run_main()
  return started.value.args[0]


def training_benchmark(monkeypatch):
  bench = load_benchmark()
  monkeypatch.setattr(bench.host_memory, "tune_for_cpu", lambda: False)
  monkeypatch.setattr(bench, "ensure_bench_venv", lambda venv, install: sys.executable)

  def start_worker(python, spec, batch):
    raise WorkerStarted(spec)

  monkeypatch.setattr(bench, "run_open_clip", start_worker)
  monkeypatch.setattr(bench, "run_coca_jax", lambda *args: {})  # row 0 runs it first
  return bench


def decode_benchmark(repo, monkeypatch):
  bench = load_decode_benchmark(repo)

  def start_worker(python, spec):
    raise WorkerStarted(spec)

  monkeypatch.setattr(bench, "run_open_clip", start_worker)
  return bench


def test_open_clip_threads_default_to_the_pinned_cpus(pinned, monkeypatch):
  bench = training_benchmark(monkeypatch)
  assert worker_spec_of(lambda: bench.main(TINY))["threads"] == len(PINNED)


def test_open_clip_decode_threads_default_to_the_pinned_cpus(pinned, repo, monkeypatch):
  bench = decode_benchmark(repo, monkeypatch)
  argv = [*TINY_OPEN_CLIP, f"--python={sys.executable}"]
  assert worker_spec_of(lambda: bench.main(argv))["threads"] == len(PINNED)


def test_threads_above_the_pinned_cpus_are_refused(pinned, repo, monkeypatch, capsys):
  training = training_benchmark(monkeypatch)
  decoding = decode_benchmark(repo, monkeypatch)
  for main in (
    lambda: training.main([*TINY, "--threads=2"]),
    lambda: decoding.main([*TINY_OPEN_CLIP, f"--python={sys.executable}", "--threads=2"]),
  ):
    with pytest.raises(SystemExit) as exit_info:
      main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--threads" in err and "the 1 CPU(s) this process may run on" in err
  with pytest.raises(SystemExit):
    training.main([*TINY, "--threads=0"])


def test_threads_within_the_pinned_cpus_are_kept(monkeypatch, repo):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
  bench = decode_benchmark(repo, monkeypatch)
  argv = [*TINY_OPEN_CLIP, f"--python={sys.executable}", "--threads=3"]
  assert worker_spec_of(lambda: bench.main(argv))["threads"] == 3


@pytest.mark.slow  # a subprocess that imports jax
def test_pinned_process_shows_one_thread_as_the_default(repo):
  """Really pinned, as by `taskset -c CPU` (the process pins itself before any import):
  the default shown is 1 thread."""
  cpu = min(os.sched_getaffinity(0))
  pin_and_run = (
    "import os, runpy, sys; "
    f"os.sched_setaffinity(0, {{{cpu}}}); "
    "sys.argv = ['coca_jax.bench', 'open_clip_decode', '--help']; "
    "runpy.run_module('coca_jax.bench', run_name='__main__')"
  )
  result = subprocess.run(
    [sys.executable, "-c", pin_and_run], capture_output=True, text=True, cwd=repo
  )
  assert result.returncode == 0, result.stderr
  threads_help = " ".join(result.stdout.split()).split("--threads THREADS")[-1].split(" --")[0]
  assert threads_help.endswith("(default: 1)"), threads_help
