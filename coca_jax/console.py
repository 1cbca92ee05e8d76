"""What an entry point prints: our log lines and every library's warnings, without the
libraries' INFO floods (seqio and TFDS per dataset, Orbax per save) and without
TensorFlow's start-up notices on machines without a GPU (CUDA probing, oneDNN).

Every `python -m coca_jax.<entry>` calls `quiet()` first thing in its main().
"""

import logging
import os
import re
import sys
import tempfile

import coca_jax

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


def import_tensorflow() -> None:
  """Imports TensorFlow, hides GPUs from it, with its start-up notices filtered out of
  stderr (file
  descriptor 2 is captured only for the import and restored after it, also on error;
  every other line is written back)."""
  if "tensorflow" in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow

      # TensorFlow only runs tf.data here; accelerators belong to JAX. Listing the
      # devices also runs the CUDA probe now, inside the capture.
      tensorflow.config.set_visible_devices([], "GPU")
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors="replace").splitlines(keepends=True)
      sys.stderr.write("".join(line for line in lines if not TF_IMPORT_NOISE.search(line)))
      sys.stderr.flush()


def quiet() -> None:
  """Filters INFO/DEBUG records of other packages from the absl and root log handlers,
  and imports TensorFlow without its start-up notices."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  import_tensorflow()
  from absl import logging as absl_logging

  handlers = [absl_logging.get_absl_handler(), *logging.getLogger().handlers]
  for handler in handlers:
    if ours_or_warning not in handler.filters:
      handler.addFilter(ours_or_warning)
