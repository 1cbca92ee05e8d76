"""The captioning finetune (issue 12): several captions per image from TFDS (coco_captions'
`captions/text` layout) or TFRecords reach training and the references; the demo config
trains from an export with the captioning loss alone."""

import io
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from tiny_runs import tiny_config

from coca_jax import export, train
from coca_jax import params as params_lib
from coca_jax import state as state_lib
from coca_jax import step as step_lib
from coca_jax.data import eval_sets, pipeline, synthetic, vocab
from configs import demo_caption_ft, tiny

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
COLOURS |= {"white": (250, 250, 250), "black": (5, 5, 5), "pink": (250, 120, 200)}
OBJECTS = ("cat", "dog", "star")
TRAIN, VALIDATION = ("red", "green", "blue", "white"), ("black", "pink")


def captions_of(colour: str) -> list[str]:
  """Three captions per image, all naming its colour."""
  return [f"a {colour} {thing}" for thing in OBJECTS]


def png(colour: str) -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.full((20, 24, 3), COLOURS[colour], np.uint8)).save(out, format="PNG")
  return out.getvalue()


class CocoLikeCaptions(tfds.core.GeneratorBasedBuilder):
  """Flat-colour images with coco_captions' features: `image`, `image/id` and
  `captions` (a sequence of {id, text}), three captions per image."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
          "image/id": tf.int64,
          "captions": tfds.features.Sequence({"id": tf.int64, "text": tfds.features.Text()}),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(TRAIN), "val": self._generate_examples(VALIDATION)}

  def _generate_examples(self, colours):
    for colour in colours:
      index = list(COLOURS).index(colour)
      rgb = np.full((20, 24, 3), COLOURS[colour], np.uint8)
      captions = [dict(id=10 * index + j, text=c) for j, c in enumerate(captions_of(colour))]
      yield colour, {"image": rgb, "image/id": index, "captions": captions}


def write_tfrecord(path, colours):
  """tf.train.Examples with `image` bytes and all captions of the image in `caption`."""
  with tf.io.TFRecordWriter(str(path)) as writer:
    for colour in colours:
      feature = dict(
        image=tf.train.Feature(bytes_list=tf.train.BytesList(value=[png(colour)])),
        caption=tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[c.encode() for c in captions_of(colour)])
        ),
      )
      writer.write(
        tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
      )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """The coco-like TFDS dataset, the same rows as TFRecords, a vocabulary."""
  root = tmp_path_factory.mktemp("captions")
  CocoLikeCaptions(data_dir=str(root / "tfds")).download_and_prepare()
  write_tfrecord(root / "train.tfrecord", TRAIN)
  write_tfrecord(root / "val.tfrecord", VALIDATION)
  texts = [c for colour in COLOURS for c in captions_of(colour)]
  vocab.train(texts * 10, str(root / "vocab.model"), 40)
  return root


def caption_config(root, layout: str):
  """configs/tiny.py reading alt-text only, from the coco-like TFDS data or TFRecords."""
  c = tiny.get_config()
  c.model.text.max_len = 32  # room for a whole caption in pieces of a tiny vocabulary
  c.data.source = "mixture"
  c.data.data_dir = str(root)
  c.data.vocab_path = str(root / "vocab.model")
  c.data.prepare_demo = False
  c.data.shuffle_buffer = 16
  c.data.rates.jft_style = 0.0
  c.data.rates.alt_text = 1.0
  c.data.jft_style.tfds_data_dir = str(root / "tfds")  # not the demo's: never prepared
  if layout == "tfds":
    c.data.alt_text.tfds_name = "coco_like_captions:1.0.0"
    c.data.alt_text.tfds_data_dir = str(root / "tfds")
    c.data.alt_text.eval_split = "val"
  else:
    c.data.alt_text.files = str(root / "train.tfrecord")
    c.data.alt_text.eval_files = str(root / "val.tfrecord")
  c.eval.evals = "captioning"
  c.eval.num_examples = 0
  return c


def colour_of(image) -> str:
  """The name of a flat image's colour, from its normalised pixels (mean 0.5, std 0.5)."""
  rgb = np.round((image.reshape(-1, 3).mean(0) * 0.5 + 0.5) * 255)
  return min(COLOURS, key=lambda name: np.abs(rgb - COLOURS[name]).sum())


@pytest.mark.parametrize("layout", ["tfds", "tfrecord"])
def test_every_caption_of_an_image_reaches_training_and_the_references(root, layout):
  config = caption_config(root, layout)
  sp = vocab.load(config.data.vocab_path)
  batches = pipeline.batches(config.data, "train", shard_index=0, num_shards=1, local_batch_size=4)
  seen = set()
  for _ in range(30):  # 30 passes over the 4 training images
    batch = next(batches)
    for image, labels, mask in zip(batch["image"], batch["text"]["labels"], batch["text"]["mask"]):
      text = sp.decode([int(t) for t in labels[mask.astype(bool)][:-1]])  # drop EOS
      colour = colour_of(image)
      assert text in captions_of(colour), (text, colour)  # one of its own image's captions
      seen.add(text)
  # One caption per image and pass, drawn at random: 30 passes see all 3 of each image
  # (each is missed with probability (2/3)^30, about 5e-6; the draws are seeded).
  assert seen == {c for colour in TRAIN for c in captions_of(colour)}

  sets = eval_sets.load(config)
  assert sets.classification is None  # captioning reads the alt-text source only
  refs = sets.alt_text
  assert [colour_of(image) for image in refs.images] == list(VALIDATION)
  assert refs.captions == [captions_of(colour) for colour in VALIDATION]
  texts, owner = refs.flat_texts()
  assert len(texts) == 6 and owner.tolist() == [0, 0, 0, 1, 1, 1]


def test_training_text_is_a_stateless_draw_among_the_non_blank_captions():
  from coca_jax.data import preprocess

  captions = tf.constant([" a cat ", "", "a dog", "  "])
  drawn = {
    preprocess.alt_caption(captions, tf.constant([s, 0])).numpy().decode() for s in range(40)
  }
  assert drawn == {"a cat", "a dog"}
  assert preprocess.alt_caption(captions).numpy().decode() == "a cat"  # eval: the first
  seed = tf.constant([7, 3])
  assert (
    preprocess.alt_caption(captions, seed).numpy() == preprocess.alt_caption(captions, seed).numpy()
  )
  assert preprocess.alt_caption(tf.constant(["", " "]), seed).numpy() == b""


def test_caption_layout_is_read_from_the_rows_or_named_in_an_error():
  from coca_jax.data import preprocess

  rows = tf.data.Dataset.from_tensors({"image": b"x", "text": "no caption feature"})
  with pytest.raises(ValueError, match=r"features \['image', 'text'\]: expected `caption`"):
    preprocess.caption_list(rows)
  one = tf.data.Dataset.from_tensors({"image": b"x", "caption": "a cat"})
  assert next(iter(preprocess.caption_list(one)))["caption"].numpy().tolist() == [b"a cat"]


# ---- the demo config


def flat(params) -> dict:
  return {
    "/".join(params_lib.path_names(p)): np.asarray(x)
    for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
  }


def tiny_caption_ft(init_from, steps=3):
  """configs/demo_caption_ft.py at configs/tiny.py's shapes on synthetic batches."""
  config = demo_caption_ft.get_config()
  small = tiny_config(steps)
  for section in ("model", "mesh"):
    config[section] = small[section]
  config.data.source = "synthetic"
  # The data section referred to the replaced model section's sizes: the tiny ones now.
  config.data.image_size = small.model.vision.image_size
  config.data.max_text_len = small.model.text.max_len
  config.data.global_batch_size = small.data.global_batch_size
  config.optim.factored_min_dim = small.optim.factored_min_dim
  config.train.steps = steps
  config.train.log_every = config.train.checkpoint_every = steps
  config.train.eval_every = 0
  # No eval on synthetic batches, so no before/after CIDEr-D to name (test_train_headline).
  config.eval.at_start = False
  config.eval.headline = {}
  config.train.init_from = str(init_from)
  return config


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  """A tiny model, as a float32 export: the pretrained model of the finetune."""
  path = tmp_path_factory.mktemp("pretrained") / "export"
  config = tiny_config(3, train=dict(seed=1))
  state = state_lib.create(config, state_lib.setup(config))
  export.write(state["params"], config, str(path), "float32", None)
  return dict(path=path, params=flat(state["params"]))


def test_demo_caption_ft_config_reads_as_the_recipe():
  c = demo_caption_ft.get_config()
  assert c.loss.contrastive_weight == 0.0 and c.loss.caption_weight > 0
  assert dict(c.data.rates) == dict(jft_style=0.0, alt_text=1.0)
  assert c.train.init_from == "/tmp/coca_demo/export"
  assert c.optim.decay == "cosine" and c.optim.lr == demo_caption_ft.LEARNING_RATE < 1e-3
  assert c.eval.evals == "captioning" and c.train.eval_every == c.train.steps
  # The final JSON line: the finetune's CIDEr-D beside the export's, measured before step 1.
  assert c.eval.at_start
  assert c.eval.headline["caption_ft/cider"] == "eval/captioning/cider"
  assert c.eval.headline["caption_ft/pretrained_cider"] == "eval_at_start/captioning/cider"


@pytest.mark.slow
def test_demo_caption_ft_trains_from_an_export_with_the_captioning_loss(
  tiny_export, tmp_path, caplog
):
  config = tiny_caption_ft(tiny_export["path"])
  with caplog.at_level(logging.INFO):
    final = train.train(config, str(tmp_path / "run"))
  assert f"init_from export {tiny_export['path']}: loaded" in caplog.text
  assert "new (initialised fresh) 0" in caplog.text
  assert final["step"] == 3 and np.isfinite(final["captioning_loss"])
  # Contrastive weight 0: the loss is the captioning term alone.
  np.testing.assert_allclose(
    final["loss"], config.loss.caption_weight * final["captioning_loss"], rtol=1e-5
  )
  assert (tmp_path / "run" / "export" / "config.json").exists()


@pytest.mark.slow
def test_contrastive_only_parameters_get_no_gradient_at_contrastive_weight_0(tiny_export):
  config = tiny_caption_ft(tiny_export["path"])
  run = state_lib.setup(config)
  state = state_lib.create(config, run)
  batch = next(synthetic.batches(config, np.arange(config.data.global_batch_size)))
  gradients = step_lib.make_gradients(config, run.layout.graphdef)
  grads, terms = jax.jit(gradients)(state["params"], jax.tree.map(jnp.asarray, batch))
  grads = flat(grads)
  # What feeds only the contrastive loss: its pooler, both projections, the temperature.
  contrastive_only = [
    name
    for name in grads
    if name.startswith(("contrastive_pooler/", "image_projection/", "text_projection/"))
    or name == "log_inv_temperature"
  ]
  assert len(contrastive_only) > 3
  for name in contrastive_only:
    np.testing.assert_array_equal(grads[name], 0.0, err_msg=name)
  assert any(np.abs(grads[name]).max() > 0 for name in grads if name.startswith("caption_pooler/"))
  assert float(terms["contrastive_loss"]) > 0  # still computed and logged
