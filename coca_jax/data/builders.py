"""TFDS builders of the demo datasets, reading the raw packages from `manual_dir`.

Built once by `python -m coca_jax.data.prepare`; afterwards seqio reads the prepared
TFDS data directory and these classes are not needed (nor imported) at train time.

- `coca_fashion_mnist`: image [28, 28, 1] uint8, label (10 classes), label_names (the class
  name and its parent category); splits train (60k) and test (10k).
- `coca_emoji`: image [64, 64, 4] uint8 (RGBA), caption (CLDR name and keywords), code,
  vendor; splits train and validation, split by base emoji (see raw.emoji_split).
"""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from coca_jax.data import raw


class CocaFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from the Debian package, with label names for JFT-style text."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "A folder with Fashion-MNIST's four idx .gz files (see coca_jax.data.raw)."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Fashion-MNIST (Xiao et al. 2017) with class names and parent categories.",
      features=tfds.features.FeaturesDict(
        dict(
          image=tfds.features.Image(shape=(28, 28, 1)),
          label=tfds.features.ClassLabel(names=[name for name, _ in raw.FASHION_MNIST_CLASSES]),
          label_names=tfds.features.Sequence(tfds.features.Text()),
        )
      ),
      license="MIT",
    )

  def _split_generators(self, dl_manager):
    return {
      split: self._generate_examples(dl_manager.manual_dir, split) for split in ("train", "test")
    }

  def _generate_examples(self, folder, split):
    images, labels = raw.fashion_mnist(str(folder), split)
    for index, (image, label) in enumerate(zip(images, labels)):
      yield (
        index,
        dict(
          image=image[..., None],
          label=int(label),
          label_names=list(raw.FASHION_MNIST_CLASSES[label]),
        ),
      )


class CocaEmoji(tfds.core.GeneratorBasedBuilder):
  """Noto and Twemoji images captioned with emojibase's CLDR names and keywords."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.1.0": "Split by base emoji across genders and ages too (raw.base_emoji).",
    "1.0.0": "Split by base emoji across skin tones.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = "A folder with the npm tarballs of coca_jax.data.raw.NPM_PACKAGES."

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Emoji images of two vendors with their CLDR names and keywords as alt-text.",
      features=tfds.features.FeaturesDict(
        dict(
          image=tfds.features.Image(shape=(64, 64, 4)),
          caption=tfds.features.Text(),
          code=tfds.features.Text(),
          vendor=tfds.features.Text(),
        )
      ),
      license="Images: Apache-2.0 (Noto), CC-BY-4.0 (Twemoji); text: MIT (emojibase)",
    )

  def _split_generators(self, dl_manager):
    folder = str(dl_manager.manual_dir)
    paths = {key: raw.tarball_path(folder, package) for key, package in raw.NPM_PACKAGES.items()}
    return {split: self._generate_examples(paths, split) for split in ("train", "validation")}

  def _generate_examples(self, paths, split):
    for record in raw.emoji_records(paths):
      if record["split"] != split:
        continue
      image = Image.open(io.BytesIO(record["png"])).convert("RGBA").resize((64, 64), Image.BICUBIC)
      key = f"{record['vendor']}/{record['code']}"
      yield (
        key,
        dict(
          image=np.asarray(image),
          caption=record["caption"],
          code=record["code"],
          vendor=record["vendor"],
        ),
      )
