"""The `config.data` section: sources, mixture rates, preprocessing, vocabulary.

Defaults describe the offline demo mixture that `python -m coca_jax.data.prepare` builds
(Fashion-MNIST as the JFT-style half, emoji alt-text as the other half). To train on
your own data, point the task entries at your TFDS datasets (`tfds_name`,
`tfds_data_dir`) or set `alt_text.files` to a TFRecord pattern of tf.train.Examples
with `image` (encoded bytes) and `caption` (string) features, and set `vocab_path` to
your SentencePiece model.
"""

import os

import ml_collections

DEMO_VOCAB_SIZE = 1_000


def default_data_dir() -> str:
  """Where prepare writes (raw packages, TFDS datasets, vocabulary): $COCA_JAX_DATA or
  ~/.cache/coca_jax."""
  return os.environ.get(
    "COCA_JAX_DATA", os.path.join(os.path.expanduser("~"), ".cache", "coca_jax")
  )


def get_config() -> ml_collections.ConfigDict:
  """Defaults for the data section; config files override leaves."""
  return ml_collections.ConfigDict(
    dict(
      global_batch_size=256,
      max_text_len=64,  # tokens incl. BOS (inputs) / EOS (labels)
      image_size=288,
      # SentencePiece model (pad 0, EOS 1, unk 2); "" = the demo vocabulary built by
      # prepare under data_dir.
      vocab_path="",
      # "" = default_data_dir(); prepare's output and the demo TFDS data dir.
      data_dir="",
      # Build the demo data on first use when it is missing (demo sources only).
      prepare_demo=True,
      seed=0,
      shuffle_buffer=10_000,
      # Mixture rates by task name (Section 4.1: half JFT-style, half alt-text).
      rates=dict(jft_style=0.5, alt_text=0.5),
      jft_style=dict(
        task_name="jft_style",
        tfds_name="coca_fashion_mnist:1.0.0",
        tfds_data_dir="",  # "" = <data_dir>/tfds
        train_split="train",
        eval_split="test",
        # The example's label names, shuffled and joined, fill `{}` of a template
        # drawn at random (Section 4.1: "a photo of the cat, animal").
        templates=(
          "a photo of the {}.",
          "a photo of a {}.",
          "an image of the {}.",
          "a picture of a {}.",
        ),
      ),
      alt_text=dict(
        task_name="alt_text",
        tfds_name="coca_emoji:1.0.0",
        tfds_data_dir="",
        train_split="train",
        eval_split="validation",
        # A TFRecord pattern (gs:// works) of tf.train.Examples with `image` (encoded
        # bytes) and `caption` (string); replaces the TFDS source when set.
        files="",
        eval_files="",
      ),
      image=dict(
        mean=(0.5, 0.5, 0.5),  # per channel, images in [0, 1] before normalising
        std=(0.5, 0.5, 0.5),
        crop_area=(0.5, 1.0),  # random resized crop: fraction of the image area
        crop_aspect=(3 / 4, 4 / 3),
        # Horizontal flips in training; off for the demo (emoji names say "left").
        flip=True,
      ),
      # Decode/augment parallelism of tf.data (AUTOTUNE = -1).
      num_parallel_calls=-1,
      # Keep tf.data from taking every core of a small host away from JAX.
      max_intra_op_parallelism=1,
    )
  )
