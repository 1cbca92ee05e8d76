"""Zero-shot classification of images with an exported CoCa.

    python -m coca_jax.classify --export=DIR --classes="cat,dog" img.png [img2.png ...]

Prints one line per image: `<path>\t<best class>\t<probability>\t<class=prob,...>`. A
missing or unreadable image prints `<path>\tERROR: <reason>` on stderr; the others are
still classified, and the exit status is 1 when any image failed.
"""

import sys

from absl import app, flags

from coca_jax import console


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line; defined only when run as a program or by a test's own FlagValues
  (importing this module registers no flags)."""
  flags.DEFINE_string(
    "export", None, "Export directory (params/, config.json, vocab.model).", flag_values=flag_values
  )
  flags.DEFINE_string("classes", None, "Comma-separated class names.", flag_values=flag_values)
  flags.DEFINE_multi_string(
    "template",
    None,
    "Prompt template with {} (repeatable; default: config.eval).",
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "batch_size", 32, "Jitted batch size.", lower_bound=1, flag_values=flag_values
  )


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  f = flag_values
  console.quiet()
  paths = argv[1:]
  classes = [c.strip() for c in (f.classes or "").split(",") if c.strip()]
  if not f.export or not paths or not classes:
    raise app.UsageError(
      'usage: python -m coca_jax.classify --export=DIR --classes="a,b" IMAGE [IMAGE ...]'
    )
  from coca_jax import inference

  try:  # before the model loads; Model.classify makes the same check
    inference.check_prompts(classes, f.template)
  except ValueError as e:
    raise app.UsageError(f"--classes / --template: {e}") from e
  try:
    model = inference.load(f.export, batch_size=f.batch_size)
  except (FileNotFoundError, ValueError) as e:  # not an export, or no vocabulary in it
    sys.exit(f"error: --export: {e}")
  class_embeddings = model.class_embeddings(classes, f.template)  # once, for every batch
  failed = 0
  # --batch_size images at a time: memory stays one batch of pixels whatever the number of
  # paths, and lines come out as they are classified.
  for start in range(0, len(paths), f.batch_size):
    chunk = paths[start : start + f.batch_size]
    pixels, failures = model.read_images(chunk, errors="collect")
    failed += len(failures)
    result = model.classify(
      pixels, classes, f.template, preprocessed=True, class_embeddings=class_embeddings
    )
    row = 0
    for index, path in enumerate(chunk):
      if index in failures:
        print(f"{path}\tERROR: {failures[index]}", file=sys.stderr, flush=True)
        continue
      probabilities = result.probabilities[row]
      ranked = ",".join(
        f"{classes[c]}={probabilities[c]:.4f}" for c in probabilities.argsort()[::-1]
      )
      print(f"{path}\t{result.labels[row]}\t{probabilities.max():.4f}\t{ranked}", flush=True)
      row += 1
  return 1 if failed else 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
