"""Test setup: 8 forced host CPU devices, set before JAX is imported anywhere."""

import atexit
import os
import shutil
import tempfile

# Compilation dominates these tiny programs. XLA's CPU backend at optimisation level 0
# compiles ~30% faster (measured on 2 cores) and runs them no slower that it shows. Its
# elemental emitters instead of the MLIR fusion emitters (XLA CPU's default) halve what is
# left: the tiny train step compiles in 4.9 s instead of 10.6 s, most of which went into
# emitting ~530 small fusion kernels, and runs as fast. The product keeps XLA's defaults.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
  + " --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (tf.data in the input pipeline) must not grab threads or devices needed by JAX.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Tests compile the same tiny programs many times, in-process and in subprocesses (which
# inherit these variables, pytest-xdist's workers too); JAX's persistent cache turns the
# repeats into loads. The process that made the folder removes it at exit (every run
# left one behind in /tmp).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="coca_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The scheduler flag and thread-pool size of coca_jax/cpu_collectives.py: entry points set
# them in console.start_backends, and tests build meshes without them. After the variables
# above: JAX reads its JAX_* variables when it is imported.
from coca_jax import cpu_collectives  # noqa: E402

cpu_collectives.avoid_deadlocks()

import pathlib  # noqa: E402  (after the environment above, like every import of JAX)
import sys  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> pathlib.Path:
  """The repository root (subprocess tests run there)."""
  return REPO


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory) -> str:
  """A 64-piece SentencePiece model file with the project's ids (pad 0, EOS 1, unk 2),
  trained on a few short captions; the vocabulary of the tiny test models."""
  from coca_jax.data import vocab

  sentences = ["a photo of a red heart", "a smiling face", "a green flag", "a blue star"]
  sentences += ["a cat", "a dog", "red green blue smiling face cat dog flag heart star"]
  sentences += ["a photo of a class " + c for c in "abcdefghij"]
  path = tmp_path_factory.mktemp("vocab") / "sp.model"
  return vocab.train(sentences * 20, str(path), 64)


@pytest.fixture
def run_main(capsys, monkeypatch):
  """Runs an entry point's main(argv) in-process on its own absl FlagValues:
  run_main(module, *args) -> (exit status, stdout, stderr)."""

  def run(module, *args):
    argv = [module.__name__, *args]
    # ml_collections' config flag registers `--config.KEY` overrides from sys.argv.
    monkeypatch.setattr(sys, "argv", argv)
    flag_values = flags.FlagValues()
    module.define_flags(flag_values)
    argv = flag_values(argv)
    try:
      status = module.main(argv, flag_values) or 0
    except SystemExit as e:
      status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err

  return run


def pytest_collection_modifyitems(config, items):
  """Tests marked slow run first (the order is otherwise kept): with pytest-xdist's work
  stealing (`--dist=worksteal`, pyproject.toml), the two workers then end together on
  short tests instead of one running the long multi-process tests alone at the end."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
