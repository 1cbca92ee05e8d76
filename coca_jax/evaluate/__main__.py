"""Run the configured evaluations on an export and print the metrics.

    python -m coca_jax.evaluate --export=DIR [--workdir=DIR] \
        [--config=configs/demo.py [--config.eval.evals=zero_shot,retrieval,captioning,frozen]]
    python -m coca_jax.evaluate --export=DIR --config=configs/eval/imagenet.py[:imagenet_v2]
    python -m coca_jax.evaluate --export=DIR --config=configs/eval/cifar.py[:cifar100]
    python -m coca_jax.evaluate --export=DIR --config=configs/eval/coco.py[:flickr30k]

The model and its data settings (image size, config.data.image mean / std / resize) come
from the export's config.json; `--config` (with command-line overrides) supplies the
`eval` section: the export's own suite (configs/demo.py) or a public benchmark recipe
(configs/eval/, coca_jax/evaluate/benchmarks.py). `--config.KEY=VALUE` overrides need
`--config=FILE` (without it the export's own eval section runs as written). Prints a
table with chance levels, then, as the last line, the metrics as one JSON object.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from coca_jax import config as config_lib
from coca_jax import console


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line; defined only when run as a program or by a test's own FlagValues
  (importing this module registers no flags)."""
  flags.DEFINE_string(
    "export", None, "Export directory (params/, config.json, vocab.model).", flag_values=flag_values
  )
  config_lib.configs_importable()
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file whose `eval` section to use.",
    lock_config=True,
    flag_values=flag_values,
  )
  flags.DEFINE_string(
    "workdir",
    None,
    "Where to write eval/captions_<step>.html (default: none).",
    flag_values=flag_values,
  )
  flags.DEFINE_integer("step", 0, "Step number to label the outputs with.", flag_values=flag_values)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  f = flag_values
  console.quiet()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not f.export:
    raise app.UsageError("--export=DIR is required")
  ignored = [n for n in f if n.startswith("config.") and not n.startswith("config.eval.")]
  ignored = sorted(f"--{n}" for n in ignored if f[n].present)
  if ignored:
    raise app.UsageError(
      f"{', '.join(ignored)}: only --config's `eval` section is used; the model, its "
      "preprocessing and its data sources are the export's (config.json)"
    )
  from coca_jax import evaluate, export, predict
  from coca_jax.data import eval_sets

  try:
    model, config = export.load_model(f.export)
  except (FileNotFoundError, ValueError) as e:  # not an export, or one for another model
    sys.exit(f"error: --export: {e}")
  # The eval sets are read with the export's own vocabulary (a converted open_clip export
  # holds CLIP's merges and names no config.data.vocab_path).
  config.data.vocab_path = export.vocab_file_in(f.export) or config.data.vocab_path
  if f.config is not None:
    config.eval = f.config.eval
  from coca_jax.evaluate import suite

  try:  # what training refuses before it starts (a k of 0, no VQA head)
    suite.check(config, data=False)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: --config: {e}")
  predictor = predict.Predictor(
    model, config, export.load_vocab(f.export, config), config.eval.batch_size
  )
  sets = eval_sets.load(config)
  metrics = evaluate.run(predictor, config, step=f.step, workdir=f.workdir, datasets=sets)
  print(evaluate.report(metrics, evaluate.chance_levels(config, sets)))
  print(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)
