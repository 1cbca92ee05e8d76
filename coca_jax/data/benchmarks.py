"""The public benchmarks' data: what each recipe reads, CLIP's class names and prompt
templates, and eval-preprocessed batches streamed from the split (ImageNet's 50,000
images do not fit in memory as pixels).

Legend: b batch, S image size (config.model.vision.image_size), n captions of an image.

| benchmark | source (users prepare it) | split | rows |
| --- | --- | --- | --- |
| imagenet2012 | TFDS `imagenet2012` (from the ILSVRC2012 tars) | validation | image, label (1000) |
| imagenet_v2 | TFDS `imagenet_v2` (matched-frequency) | test | image, label (1000) |
| cifar10, cifar100 | TFDS `cifar10`, `cifar100` | test | image, label |
| coco | TFDS `coco_captions` (2014 images, Karpathy splits) | test | image, captions/text (~5) |
| flickr30k | TFRecords: `image` bytes, `caption` bytes_list | all | image, caption (~5) |

Datasets are read from config.eval.benchmarks.tfds_data_dir ("" = TFDS's default);
nothing is downloaded. Images go through the eval transform of the checkpoint's config
(coca_jax/data/images.py eval_pixels: config.data.image mean, std and resize).
"""

import dataclasses
import importlib.resources
from typing import Iterator

import numpy as np
from absl import logging

NAMES_PACKAGE = "coca_jax.data"
NAMES_FOLDER = "benchmark_names"  # see its README.md for the sources of each file
TEMPLATE_SETS = ("clip80", "clip7", "clip_cifar")


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One recipe's data. kind: "classification" (zero-shot top-k) or "captions"
  (retrieval over all captions + captioning). tfds_name "" reads own TFRecords."""

  name: str
  kind: str
  tfds_name: str
  split: str
  classes: str = ""  # class-names file of benchmark_names/
  templates: str = ""  # its default template set


BENCHMARKS = {
  b.name: b
  for b in (
    Benchmark(
      "imagenet2012", "classification", "imagenet2012", "validation", "imagenet_classes", "clip80"
    ),
    Benchmark("imagenet_v2", "classification", "imagenet_v2", "test", "imagenet_classes", "clip80"),
    Benchmark("cifar10", "classification", "cifar10", "test", "cifar10_classes", "clip_cifar"),
    Benchmark("cifar100", "classification", "cifar100", "test", "cifar100_classes", "clip_cifar"),
    Benchmark("coco", "captions", "coco_captions", "test"),
    Benchmark("flickr30k", "captions", "", "test"),
  )
}


def read_lines(name: str) -> list[str]:
  """The lines of benchmark_names/<name>.txt (a file shipped with the package)."""
  path = importlib.resources.files(NAMES_PACKAGE) / NAMES_FOLDER / f"{name}.txt"
  return [line for line in path.read_text(encoding="utf-8").split("\n") if line]


def class_names(benchmark: Benchmark) -> list[str]:
  """The C class names, line i naming label i."""
  return read_lines(benchmark.classes)


def templates(benchmark: Benchmark, choice: str = "") -> list[str]:
  """The prompt templates: `choice` (config.eval.benchmarks.templates) or, when "", the
  benchmark's CLIP set."""
  choice = choice or benchmark.templates
  if choice not in TEMPLATE_SETS:
    raise ValueError(
      f"config.eval.benchmarks.templates={choice!r}; expected one of {', '.join(TEMPLATE_SETS)}"
    )
  return read_lines(f"templates_{choice}")


def check_available(benchmark: Benchmark, settings) -> None:
  """FileNotFoundError or ValueError naming the config key when the benchmark cannot read
  its data (a TFDS dataset not prepared, its TFRecords unset or matching no file) or its
  templates (settings: config.eval.benchmarks); reads metadata only. The trainer calls it
  before its first step, not to stop at its first evaluation."""
  if benchmark.kind == "classification":
    templates(benchmark, settings.templates)
  if not benchmark.tfds_name:
    _tfrecord_paths(benchmark, settings[f"{benchmark.name}_files"])
    return
  import tensorflow_datasets as tfds

  builder = tfds.builder(benchmark.tfds_name, data_dir=settings.tfds_data_dir or None)
  if not builder.is_prepared():
    raise FileNotFoundError(_not_prepared(benchmark, builder))


def _not_prepared(benchmark: Benchmark, builder) -> str:
  return (
    f"benchmark {benchmark.name!r}: TFDS {benchmark.tfds_name} is not prepared in "
    f"{builder.data_dir!r} (config.eval.benchmarks.tfds_data_dir); prepare it with "
    f"`tfds build {benchmark.tfds_name}` (ImageNet: --manual_dir with the ILSVRC2012 tars)"
  )


def _tfds_rows(benchmark: Benchmark, tfds_data_dir: str):
  """The split's rows with images as encoded bytes, in stored order."""
  import tensorflow_datasets as tfds

  builder = tfds.builder(benchmark.tfds_name, data_dir=tfds_data_dir or None)
  try:
    ds = builder.as_dataset(
      split=benchmark.split, decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=False
    )
  except AssertionError as e:  # TFDS's "could not find data in DIR ..."
    raise FileNotFoundError(_not_prepared(benchmark, builder)) from e
  if benchmark.kind == "classification":
    classes = builder.info.features["label"].num_classes
    names = class_names(benchmark)
    if classes != len(names):
      raise ValueError(
        f"benchmark {benchmark.name!r}: {benchmark.tfds_name} has {classes} classes but "
        f"{NAMES_FOLDER}/{benchmark.classes}.txt names {len(names)}"
      )
  return ds


def _tfrecord_paths(benchmark: Benchmark, files: str) -> list[str]:
  """The sorted files of config.eval.benchmarks.<name>_files (an error naming the key when
  it is unset or matches nothing)."""
  import tensorflow as tf

  key = f"config.eval.benchmarks.{benchmark.name}_files"
  if not files:
    raise ValueError(f"benchmark {benchmark.name!r} reads TFRecords: set {key} to their pattern")
  paths = sorted(tf.io.gfile.glob(files))
  if not paths:
    raise FileNotFoundError(f"{key}={files!r} matches no file")
  return paths


def _tfrecord_rows(benchmark: Benchmark, files: str):
  """Rows of own TFRecords: `image` (encoded bytes), `caption` ([n] strings)."""
  from coca_jax.data import tasks

  return tasks.read_alt_text_files(_tfrecord_paths(benchmark, files))


def batches(benchmark: Benchmark, config) -> Iterator[dict]:
  """Batches of config.eval.batch_size rows (the last may be smaller) of the first
  config.eval.num_examples (0: all) rows of the split, in stored order (a caption
  split's images without a non-blank caption skipped, with a warning that counts them):
    classification  {"image": [b, S, S, 3] float32, "label": [b] int64}
    captions        {"image": [b, S, S, 3] float32, "captions": b lists of strings}
  """
  import tensorflow as tf

  from coca_jax.data import images, preprocess, tasks

  tf.config.set_visible_devices([], "GPU")  # tf.data only; accelerators belong to JAX
  settings = config.eval.benchmarks
  if benchmark.tfds_name:
    ds = _tfds_rows(benchmark, settings.tfds_data_dir)
  else:
    ds = _tfrecord_rows(benchmark, settings[f"{benchmark.name}_files"])
  uncaptioned = []
  if benchmark.kind == "captions":
    ds = preprocess.caption_list(ds)  # coco_captions' captions/text or TFRecords' caption

    # An image without a non-blank caption can be neither retrieved (a sure miss of
    # image->text) nor scored (captioning's references): skipped, and counted.
    def has_caption(captions) -> bool:
      if not all(preprocess.is_blank(c) for c in captions):
        return True
      uncaptioned.append(1)
      return False

    def captioned(row):
      kept = tf.numpy_function(has_caption, [row["caption"]], tf.bool, stateful=True)
      return tf.ensure_shape(kept, [])

    ds = ds.filter(captioned)
  if config.eval.num_examples:
    ds = ds.take(config.eval.num_examples)
  options = tasks.eval_image_options(config.data)  # the checkpoint's mean, std, resize
  images.check_resize(options["resize"])
  size = options["size"]

  def pixels(encoded):
    return images.eval_pixels(images.decode(encoded), **options)

  def example(row):
    image = tf.numpy_function(pixels, [row["image"]], tf.float32, stateful=False)
    image.set_shape([size, size, 3])
    if benchmark.kind == "classification":
      return {"image": image, "label": row["label"]}
    return {"image": image, "caption": row["caption"]}

  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.padded_batch(config.eval.batch_size).prefetch(2)  # captions padded with ""
  for batch in ds.as_numpy_iterator():
    if benchmark.kind == "classification":
      yield {"image": batch["image"], "label": np.asarray(batch["label"])}
    else:
      # The same rule as has_caption's: an image kept above keeps a reference.
      captions = [
        [c.decode().strip() for c in row if not preprocess.is_blank(c)] for row in batch["caption"]
      ]
      yield {"image": batch["image"], "captions": captions}
  if uncaptioned:
    logging.warning(
      "benchmark %s: %d images of split %r skipped, with no non-blank caption",
      benchmark.name,
      len(uncaptioned),
      benchmark.split,
    )
