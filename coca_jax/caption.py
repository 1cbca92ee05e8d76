"""Caption images with an exported CoCa.

    python -m coca_jax.caption --export=DIR img1.png img2.jpg [--beam=4] [--prefix="a photo of"]

Prints one line per image: `<path>\t<caption>`. A missing or unreadable image prints
`<path>\tERROR: <reason>` on stderr instead; the others are still captioned, and the
exit status is 1 when any image failed.
"""

import sys

from absl import app, flags

flags.DEFINE_string("export", None, "Export directory (params/, config.json, vocab.model).")
flags.DEFINE_integer("beam", 0, "Beam size; > 0 selects beam search.")
flags.DEFINE_enum(
  "method", None, ["greedy", "beam", "sample"], "Decoding method (default: config.eval.decode)."
)
flags.DEFINE_integer("max_length", None, "Tokens to generate at most (default: config).")
flags.DEFINE_float("temperature", None, "Sampling temperature.")
flags.DEFINE_integer("top_k", None, "Sampling: keep the k most likely tokens.")
flags.DEFINE_float("top_p", None, "Sampling: nucleus probability mass.")
flags.DEFINE_string("prefix", None, "Text every caption continues (e.g. a question).")
flags.DEFINE_integer("batch_size", 32, "Jitted batch size.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
FLAGS = flags.FLAGS


def main(argv):
  paths = argv[1:]
  if not FLAGS.export or not paths:
    raise app.UsageError("usage: python -m coca_jax.caption --export=DIR IMAGE [IMAGE ...]")
  from coca_jax import inference

  model = inference.load(FLAGS.export, batch_size=FLAGS.batch_size)
  pixels, failures = model.read_images(paths, errors="collect")
  method = FLAGS.method or ("beam" if FLAGS.beam > 0 else None)
  captions = iter(
    model.caption(
      pixels,
      method,
      beam_size=FLAGS.beam or None,
      max_length=FLAGS.max_length,
      temperature=FLAGS.temperature,
      top_k=FLAGS.top_k,
      top_p=FLAGS.top_p,
      prefix=FLAGS.prefix,
      seed=FLAGS.seed,
    )
    if len(pixels)
    else []
  )
  for index, path in enumerate(paths):
    if index in failures:
      print(f"{path}\tERROR: {failures[index]}", file=sys.stderr, flush=True)
    else:
      print(f"{path}\t{next(captions)}", flush=True)
  return 1 if failures else 0


if __name__ == "__main__":
  app.run(main)
