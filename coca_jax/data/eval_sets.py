"""Held-out evaluation sets as arrays, read through the eval tasks (eval preprocessing).

- `classification(config)`: the JFT-style source's eval split (Fashion-MNIST test for
  the demo) with its ClassLabel names, for zero-shot and frozen-feature evaluation.
- `alt_text(config)`: the alt-text source's eval split (emoji validation), one image per
  distinct caption (the two vendors draw the same emoji under the same caption; keeping
  both would make text->image retrieval ambiguous), for retrieval and captioning.

Both read the first `config.eval.num_examples` rows (0: all) in the split's stored order,
so every evaluation sees the same examples.
"""

import seqio
import tensorflow_datasets as tfds

from coca_jax.data import prepare, tasks


def _rows(config, kind: str):
  prepare.ensure_demo_data(config.data)
  tasks.register(config.data)
  task = seqio.get_mixture_or_task(config.data[kind].task_name + tasks.EVAL_SUFFIX)
  ds = task.get_dataset(
    sequence_length=None, split="validation", use_cached=False, shuffle=False, num_epochs=1
  )
  return ds.as_numpy_iterator()


def class_names(config) -> list[str]:
  c = config.data.jft_style
  name, version = c.tfds_name.split(":")
  builder = tfds.builder_from_directory(f"{tasks.tfds_data_dir(config.data, c)}/{name}/{version}")
  return list(builder.info.features["label"].names)


def classification(config) -> dict:
  """-> images [N, S, S, 3] float32, labels [N] int, class_names [C], name."""
  limit = config.eval.num_examples
  images, labels = [], []
  for row in _rows(config, "jft_style"):
    images.append(row["image"])
    labels.append(int(row["label"]))
    if len(images) == limit:
      break
  return dict(
    images=images,
    labels=labels,
    class_names=class_names(config),
    name=f"{config.data.jft_style.task_name}_eval",
  )


def alt_text(config) -> dict:
  """-> images [N, S, S, 3] float32, captions: N lists of one reference, name."""
  limit = config.eval.num_examples
  images, captions, seen = [], [], set()
  for row in _rows(config, "alt_text"):
    caption = row["text_pretokenized"].decode()
    if caption in seen:
      continue
    seen.add(caption)
    images.append(row["image"])
    captions.append([caption])
    if len(images) == limit:
      break
  return dict(images=images, captions=captions, name=f"{config.data.alt_text.task_name}_eval")
