"""What an entry point prints: our log lines and every library's warnings, without the
libraries' INFO floods (seqio and TFDS per dataset, Orbax per save) and without
TensorFlow's start-up notices on machines without a GPU (CUDA probing, oneDNN), nor
libtpu's on machines without a TPU.

Every `python -m coca_jax.<entry>` calls `quiet()` first thing in its main().
"""

import contextlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
from typing import NoReturn

import coca_jax
from coca_jax import accelerators, cpu_collectives

_PACKAGE_DIR = os.path.dirname(os.path.abspath(coca_jax.__file__))


def ours_or_warning(record: logging.LogRecord) -> bool:
  """Log filter: keep WARNING and above from anyone, lower levels only from coca_jax."""
  return record.levelno >= logging.WARNING or os.path.abspath(record.pathname).startswith(
    _PACKAGE_DIR
  )


# Lines TensorFlow's C++ runtime writes to stderr while it is imported, before its log
# settings apply (TF_CPP_MIN_LOG_LEVEL does not hide them in TensorFlow 2.21): the CUDA
# probe of a GPU-less machine and the oneDNN notice. Anything else passes through.
TF_IMPORT_NOISE = re.compile(
  r"cudart_stub\.cc|cuda_platform\.cc.*cuInit|port\.cc:\d+\] oneDNN custom operations"
  r"|All log messages before absl::InitializeLog\(\) is called"
)


# Lines libtpu writes while JAX starts its backends on a host without TPU chips (libtpu is
# installed for coca_jax.aot's TPU topologies): JAX tries the TPU backend anyway, libtpu
# reports the failed TPU metadata lookup as an INVALID_ARGUMENT error, and JAX then falls
# back to the CPU or GPU quietly. Filtered only where no TPU chip is present.
LIBTPU_NO_CHIP_NOISE = re.compile(
  r"could not determine TPU (accelerator type|worker hostnames)"
  r"|Logging before InitGoogle\(\) is written to STDERR"
  r"|^=== Source Location Trace: ===\s*$|libtpu_init_utils\.cc:\d+\s*$"
)


@contextlib.contextmanager
def _stderr_without(noise: re.Pattern):
  """Captures file descriptor 2 (C++ libraries write there directly) for the block and
  restores it after, also on error; every line `noise` does not match is written back."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors="replace").splitlines(keepends=True)
      sys.stderr.write("".join(line for line in lines if not noise.search(line.rstrip("\n"))))
      sys.stderr.flush()


def exit_now(message: str, status: int = 1) -> NoReturn:
  """Ends the process at once with `message` as its last line (stderr and log), exit
  `status`, skipping the normal exit's joins: Orbax's threads of a failed save wait out
  its 5-minute coordination timeout for signals that will not come, and jax.distributed's
  shutdown barrier waits 5 minutes for processes still inside a collective (then aborts
  them all)."""
  from absl import logging as absl_logging

  absl_logging.error("%s", message)
  print(message, file=sys.stderr)
  absl_logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def import_tensorflow() -> None:
  """Imports TensorFlow, hides GPUs from it, with its start-up notices filtered out of
  stderr."""
  if "tensorflow" in sys.modules:
    return
  with _stderr_without(TF_IMPORT_NOISE):
    import tensorflow

    # TensorFlow only runs tf.data here; accelerators belong to JAX. Listing the
    # devices also runs the CUDA probe now, inside the capture.
    tensorflow.config.set_visible_devices([], "GPU")


def start_backends() -> None:
  """Starts JAX's backends (`jax.devices()`). Where libtpu is installed on a host without
  accelerator device files, stderr is captured meanwhile and libtpu's start-up noise
  dropped; elsewhere (TPU and GPU hosts: a start that waits for other hosts or fails must
  print as it happens) nothing is captured. Call it after jax.distributed.initialize and
  host_memory.tune_for_cpu, which must precede the backends. First it sets what keeps a
  multi-device CPU program's collectives from deadlocking (`cpu_collectives`: an XLA flag
  and the size of XLA's CPU thread pools), which XLA reads when the CPU client starts."""
  import jax

  cpu_collectives.avoid_deadlocks()
  with libtpu_quiet():
    jax.devices()


@contextlib.contextmanager
def libtpu_quiet():
  """Where libtpu is installed on a host without accelerators, the block's stderr without
  libtpu's start-up noise (LIBTPU_NO_CHIP_NOISE); elsewhere nothing is captured."""
  if importlib.util.find_spec("libtpu") is None or accelerators.present():
    yield
    return
  with _stderr_without(LIBTPU_NO_CHIP_NOISE):
    yield


def quiet(start: bool = True) -> None:
  """Filters INFO/DEBUG records of other packages from the absl and root log handlers,
  imports TensorFlow without its start-up notices, and (`start`) starts JAX's backends
  without libtpu's (`start_backends`; the trainer and the benchmarks start them later)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  import_tensorflow()
  from absl import logging as absl_logging

  handlers = [absl_logging.get_absl_handler(), *logging.getLogger().handlers]
  for handler in handlers:
    if ours_or_warning not in handler.filters:
      handler.addFilter(ours_or_warning)
  if start:
    start_backends()
