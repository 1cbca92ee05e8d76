"""Run the configured evaluations on an export and print the metrics.

    python -m coca_jax.evaluate --export=DIR [--config=configs/demo.py] \
        [--config.eval.evals=zero_shot,retrieval,captioning,frozen] [--workdir=DIR]

The model and its data settings come from the export's config.json; `--config` (with
command-line overrides) supplies the `eval` section. Prints a table with chance levels,
then, as the last line, the metrics as one JSON object.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

flags.DEFINE_string("export", None, "Export directory (params/, config.json, vocab.model).")
config_flags.DEFINE_config_file(
  "config", None, "Config file whose `eval` section to use.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where to write eval/captions_<step>.html (default: none).")
flags.DEFINE_integer("step", 0, "Step number to label the outputs with.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.export:
    raise app.UsageError("--export=DIR is required")
  from coca_jax import evaluate, export, predict
  from coca_jax.data import eval_sets

  model, config = export.load_model(FLAGS.export)
  if FLAGS.config is not None:
    config.eval = FLAGS.config.eval
  predictor = predict.Predictor(
    model, config, export.load_vocab(FLAGS.export, config), config.eval.batch_size
  )
  sets = eval_sets.load(config)
  metrics = evaluate.run(predictor, config, step=FLAGS.step, workdir=FLAGS.workdir, datasets=sets)
  print(evaluate.report(metrics, evaluate.chance_levels(config, sets)))
  print(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
