"""python -m coca_jax.convert SOURCE --flags: SOURCE is the framework (open_clip)."""

import sys

from absl import app

SOURCES = ("open_clip",)


def run(argv: list[str]) -> None:
  """argv: [program, SOURCE, --flags...]."""
  if len(argv) < 2 or argv[1] not in SOURCES:
    raise SystemExit(
      f"usage: python -m coca_jax.convert {{{'|'.join(SOURCES)}}} --flags "
      f"(got {argv[1:2] or 'no source'}); see python -m coca_jax.convert open_clip --help"
    )
  from coca_jax.convert import open_clip

  open_clip.define_flags()
  app.run(open_clip.main, argv=[f"{argv[0]} {argv[1]}", *argv[2:]])


if __name__ == "__main__":
  run(sys.argv)
