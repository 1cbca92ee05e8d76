"""What an entry point prints: our log lines and every library's warnings, without the
libraries' INFO floods (seqio and TFDS per dataset, Orbax per save, TensorFlow's start-up).

Every `python -m coca_jax.<entry>` calls `quiet()` first thing in its main().
"""

import logging
import os

import coca_jax

_PACKAGE_DIR = os.path.dirname(os.path.abspath(coca_jax.__file__))


def ours_or_warning(record: logging.LogRecord) -> bool:
  """Log filter: keep WARNING and above from anyone, lower levels only from coca_jax."""
  return record.levelno >= logging.WARNING or os.path.abspath(record.pathname).startswith(
    _PACKAGE_DIR
  )


def quiet() -> None:
  """Filters INFO/DEBUG records of other packages from the absl and root log handlers
  and lowers TensorFlow's C++ logging to warnings (before TensorFlow is imported)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  from absl import logging as absl_logging

  handlers = [absl_logging.get_absl_handler(), *logging.getLogger().handlers]
  for handler in handlers:
    if ours_or_warning not in handler.filters:
      handler.addFilter(ours_or_warning)
