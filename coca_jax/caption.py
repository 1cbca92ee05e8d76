"""Caption images with an exported CoCa.

    python -m coca_jax.caption --export=DIR img1.png img2.jpg [--beam=4] [--prefix="a photo of"]

Prints one line per image: `<path>\t<caption>`. A missing or unreadable image prints
`<path>\tERROR: <reason>` on stderr instead; the others are still captioned, and the
exit status is 1 when any image failed.
"""

import sys

import numpy as np
from absl import app, flags

from coca_jax import console


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line; defined only when run as a program or by a test's own FlagValues
  (importing this module registers no flags)."""
  flags.DEFINE_string(
    "export", None, "Export directory (params/, config.json, vocab.model).", flag_values=flag_values
  )
  flags.DEFINE_integer("beam", 0, "Beam size; > 0 selects beam search.", flag_values=flag_values)
  flags.DEFINE_enum(
    "method",
    None,
    ["greedy", "beam", "sample"],
    "Decoding method (default: config.eval.decode).",
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "max_length", None, "Tokens to generate at most (default: config).", flag_values=flag_values
  )
  flags.DEFINE_integer(
    "min_length",
    None,
    "Tokens a caption holds at least, EOS included (default: config; open_clip uses 5).",
    flag_values=flag_values,
  )
  flags.DEFINE_float("temperature", None, "Sampling temperature.", flag_values=flag_values)
  flags.DEFINE_integer(
    "top_k", None, "Sampling: keep the k most likely tokens.", flag_values=flag_values
  )
  flags.DEFINE_float("top_p", None, "Sampling: nucleus probability mass.", flag_values=flag_values)
  flags.DEFINE_string(
    "prefix", None, "Text every caption continues (e.g. a question).", flag_values=flag_values
  )
  flags.DEFINE_integer(
    "batch_size", 32, "Jitted batch size.", lower_bound=1, flag_values=flag_values
  )
  flags.DEFINE_integer(
    "seed",
    None,
    "Sampling seed (default: the export config's eval.decode.seed).",
    flag_values=flag_values,
  )


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  f = flag_values
  console.quiet()
  paths = argv[1:]
  if not f.export or not paths:
    raise app.UsageError("usage: python -m coca_jax.caption --export=DIR IMAGE [IMAGE ...]")
  from coca_jax import inference

  try:
    model = inference.load(f.export, batch_size=f.batch_size)
  except (FileNotFoundError, ValueError) as e:  # not an export, or no vocabulary in it
    sys.exit(f"error: --export: {e}")

  def caption(pixels, first_row=0):
    return model.caption(
      pixels,
      f.method,  # unset: --beam > 0 picks beam search, sampling flags sampling
      beam_size=f.beam or None,
      max_length=f.max_length,
      min_length=f.min_length,
      temperature=f.temperature,
      top_k=f.top_k,
      top_p=f.top_p,
      prefix=f.prefix,
      seed=f.seed,
      first_row=first_row,
      preprocessed=True,
    )

  size = model.config.model.vision.image_size
  try:  # the decode options and --prefix, checked before any image is read
    caption(np.zeros((0, size, size, 3), np.float32))
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  failed = captioned = 0
  # --batch_size images at a time: memory stays one batch of pixels whatever the number of
  # paths, and lines come out as they are captioned. Sampling keys each image by its row
  # among the images read (first_row), as one call over them all would.
  for start in range(0, len(paths), f.batch_size):
    chunk = paths[start : start + f.batch_size]
    pixels, failures = model.read_images(chunk, errors="collect")
    captions = iter(caption(pixels, captioned) if len(pixels) else [])
    captioned += len(pixels)
    failed += len(failures)
    for index, path in enumerate(chunk):
      if index in failures:
        print(f"{path}\tERROR: {failures[index]}", file=sys.stderr, flush=True)
      else:
        print(f"{path}\t{next(captions)}", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
