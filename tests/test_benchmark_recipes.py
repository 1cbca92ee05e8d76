"""Public benchmark recipes (zero-shot ImageNet / CIFAR, COCO / Flickr30k retrieval and
captioning) end to end through the evaluate CLI on TFDS mock data and a tiny export;
open_clip's bicubic eval transform; multi-caption recall and held-out zero-shot by hand."""

import importlib.util
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from flax import nnx
from PIL import Image

from coca_jax import export, inference
from coca_jax.data import benchmarks, images, preprocess
from coca_jax.evaluate import __main__ as evaluate_main
from coca_jax.evaluate import retrieval, suite, zero_shot
from coca_jax.models import coca
from configs import tiny

OPEN_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPEN_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ---- data files


@pytest.mark.parametrize(
  "name, lines, first, last",
  [
    ("imagenet_classes", 1000, "tench", "toilet paper"),
    ("cifar10_classes", 10, "airplane", "truck"),
    ("cifar100_classes", 100, "apple", "worm"),
    ("templates_clip80", 80, "a bad photo of a {}.", "a tattoo of the {}."),
    ("templates_clip7", 7, "itap of a {}.", "a photo of the small {}."),
    ("templates_clip_cifar", 18, "a photo of a {}.", "a photo of the big {}."),
  ],
)
def test_shipped_names_and_templates(name, lines, first, last):
  got = benchmarks.read_lines(name)
  assert (len(got), got[0], got[-1]) == (lines, first, last)
  # CLIP's ImageNet names repeat two (labels 657 / 744 "missile", 836 / 837 "sunglasses").
  assert len(set(got)) == lines - 2 * (name == "imagenet_classes")
  if name.startswith("templates"):
    assert all(t.count("{}") == 1 for t in got)


def test_unknown_template_set_names_the_config_key():
  with pytest.raises(ValueError, match="config.eval.benchmarks.templates='clip9'"):
    benchmarks.templates(benchmarks.BENCHMARKS["imagenet2012"], "clip9")


# ---- bicubic eval transform (open_clip's)


def test_bicubic_resize_truncates_the_long_side_and_rounds_the_crop_offset():
  # 24 x 37 (h x w) to 16: the long side is int(16 * 37 / 24) = int(24.67) = 24 (rounding
  # would give 25), the crop's left offset round((24 - 16) / 2) = 4.
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (24, 37, 3), dtype=np.uint8)
  resized = np.asarray(Image.fromarray(rgb).resize((24, 16), Image.BICUBIC), np.float32)
  expected = (resized[:, 4:20] / 255 - OPEN_CLIP_MEAN) / OPEN_CLIP_STD
  got = images.eval_pixels(rgb, 16, OPEN_CLIP_MEAN, OPEN_CLIP_STD, "bicubic")
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # Bilinear (the default) keeps its own geometry: long side round(24.67) = 25, offset 4.
  bilinear = np.asarray(Image.fromarray(rgb).resize((25, 16), Image.BILINEAR), np.float32)
  np.testing.assert_allclose(
    images.eval_pixels(rgb, 16, (0, 0, 0), (1, 1, 1)), bilinear[:, 4:20] / 255, atol=1e-6
  )
  with pytest.raises(ValueError, match="config.data.image.resize='nearest'"):
    images.eval_pixels(rgb, 16, (0, 0, 0), (1, 1, 1), "nearest")


def test_the_training_crop_resizes_with_the_configs_filter():
  """open_clip trains with a bicubic RandomResizedCrop: with `resize="bicubic"` the crop
  (here the whole image) is resized like PIL's bicubic filter, antialiased when
  shrinking, to within one level of 255 (PIL rounds to 8 bits); the bilinear default
  stays bilinear."""
  rng = np.random.default_rng(0)
  x = np.linspace(0, 1, 64)
  smooth = 255 * np.stack([np.outer(x, x), np.outer(1 - x, x), np.outer(x, 1 - x)], -1)
  rgb = np.clip(smooth + rng.integers(-60, 60, smooth.shape), 0, 255).astype(np.uint8)
  options = dict(mean=(0, 0, 0), std=(1, 1, 1), crop_area=(1, 1), crop_aspect=(1, 1), flip=False)
  seeds = tf.constant([[1, 2], [3, 4]])
  for resize, pil_filter in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)):
    got = 255 * preprocess.train_pixels(rgb, seeds, 16, resize=resize, **options).numpy()
    expected = np.asarray(Image.fromarray(rgb).resize((16, 16), pil_filter), np.float32)
    np.testing.assert_allclose(got, expected, atol=1.0)
  bilinear = 255 * preprocess.train_pixels(rgb, seeds, 16, **options).numpy()
  bicubic = np.asarray(Image.fromarray(rgb).resize((16, 16), Image.BICUBIC), np.float32)
  assert np.abs(bilinear - bicubic).max() > 3.0  # the filters differ by more than the tolerance
  with pytest.raises(ValueError, match="config.data.image.resize='nearest'"):
    preprocess.train_pixels(rgb, seeds, 16, resize="nearest", **options)


OPEN_CLIP_TRANSFORM = """
import sys
import numpy as np
import open_clip
from PIL import Image

transform = open_clip.image_transform(16, is_train=False, mean={mean}, std={std})
inputs = np.load(sys.argv[1])
outputs = [transform(Image.fromarray(inputs[k])).numpy().transpose(1, 2, 0) for k in inputs]
np.savez(sys.argv[2], *outputs)
"""


@pytest.mark.slow  # torch in a subprocess (it crashes beside TensorFlow in one process)
def test_bicubic_matches_open_clip_eval_transform(tmp_path):
  if importlib.util.find_spec("open_clip") is None:
    pytest.skip("open_clip is not installed (extra [open_clip])")
  rng = np.random.default_rng(1)
  # (100, 15) and (15, 100): longer than 4:1, pixel noise upscaled (the old crop-box path
  # for such images differed from open_clip by up to 21/255).
  shapes = [(24, 37), (37, 24), (16, 16), (50, 21), (9, 13), (31, 31), (100, 15), (15, 100)]
  inputs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
  np.savez(tmp_path / "in.npz", *inputs)
  script = OPEN_CLIP_TRANSFORM.format(mean=OPEN_CLIP_MEAN, std=OPEN_CLIP_STD)
  subprocess.run(
    [sys.executable, "-c", script, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
    check=True,
    timeout=300,
  )
  expected = np.load(tmp_path / "out.npz")
  for i, (rgb, shape) in enumerate(zip(inputs, shapes)):
    got = images.eval_pixels(rgb, 16, OPEN_CLIP_MEAN, OPEN_CLIP_STD, "bicubic")
    np.testing.assert_allclose(got, expected[f"arr_{i}"], atol=1e-5, err_msg=f"{shape}")


# ---- multi-caption recall and held-out zero-shot, by hand


def test_recall_over_all_captions_by_hand():
  # 3 images; image 0 owns texts 0-2, image 1 texts 3-4, image 2 text 5.
  owner = np.array([0, 0, 0, 1, 1, 2])
  similarity = np.array(
    [
      [0.1, 0.2, 0.9, 0.5, 0.3, 0.0],  # its 3rd caption ranks first -> hit at 1
      [0.8, 0.1, 0.2, 0.3, 0.7, 0.6],  # text 0 first, its text 4 second -> hit at 2
      [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # its only caption ranks 6th -> hit at 6
    ]
  )
  got = retrieval.recall_at_k(similarity, owner, ks=(1, 2, 5, 6))
  assert [got[f"image_to_text_r{k}"] for k in (1, 2, 5, 6)] == [1 / 3, 2 / 3, 2 / 3, 1.0]
  # Per caption, rank of its own image (column order): t0 image 2 > 1 > 0 -> 3rd; t1
  # 2 > 0 > 1 -> 2nd; t2 0 first; t3 2 > 0 > 1 -> 3rd; t4 1 first; t5 1 > 2 -> 2nd.
  assert [got[f"text_to_image_r{k}"] for k in (1, 2)] == [2 / 6, 4 / 6]


def test_zero_shot_among_held_out_classes_by_hand():
  classifier = np.eye(4)  # class c embeds along axis c
  # Labels 1, 3, 3, 0: among classes {1, 3}, image 0 scores (0.2, 0.9) -> 3 (wrong),
  # image 1 (0.1, 0.8) -> 3, image 2 (0.7, 0.1) -> 1 (wrong); image 3 (class 0) left out.
  embeddings = np.array(
    [[0.0, 0.2, 0.0, 0.9], [0.9, 0.1, 0.0, 0.8], [0.0, 0.7, 0.9, 0.1], [1.0, 0, 0, 0]]
  )
  labels = np.array([1, 3, 3, 0])
  got = zero_shot.evaluate_among(embeddings, labels, classifier, [1, 3], ks=(1, 5))
  assert got == {"top1": 1 / 3}  # top5 of 2 classes is left out


def test_held_out_rows_are_dropped_from_training_rows():
  rows = tf.data.Dataset.from_tensor_slices(
    {"label_names": [["sneaker", "footwear"], ["coat", "clothing"], ["bag", "accessory"]]}
  )
  kept = preprocess.drop_labels(rows, names=("sneaker", "bag"))
  assert [r["label_names"][0] for r in kept.as_numpy_iterator()] == [b"coat"]


def test_class_groups_check_the_names():
  config = tiny.get_config()
  config.data.jft_style.held_out_classes = ("bag", "sneaker")
  names = ["t-shirt", "bag", "coat", "sneaker"]
  assert suite.class_groups(config, names) == {"seen": [0, 2], "held_out": [1, 3]}
  config.data.jft_style.held_out_classes = ("bags",)
  with pytest.raises(ValueError, match=r"held_out_classes names \['bags'\]"):
    suite.class_groups(config, names)


# ---- the recipes end to end on mock data


@pytest.fixture(scope="module")
def bicubic_export(tmp_path_factory, sentencepiece_model):
  """A tiny random-init export preprocessing like an open_clip import."""
  config = tiny.get_config()
  config.data.source = "synthetic"
  config.data.vocab_path = sentencepiece_model
  config.data.image.mean = OPEN_CLIP_MEAN
  config.data.image.std = OPEN_CLIP_STD
  config.data.image.resize = "bicubic"
  # Room for whole prompts: at tiny's 8 tokens of this 64-piece vocabulary nearly every
  # template is cut before its class name, the class embeddings then differ in their last
  # bits only, and batches of another size (the API's, the CLI's) flipped their ties.
  config.model.text.max_len = 48
  params = nnx.to_pure_dict(nnx.state(coca.build(config.model, seed=0), nnx.Param))
  path = str(tmp_path_factory.mktemp("bench") / "export")
  export.write(params, config, path, "float32", sentencepiece_model)
  return path


def run_recipe(run_main, export_dir, config, *overrides):
  status, out, err = run_main(
    evaluate_main, f"--export={export_dir}", f"--config={config}", *overrides
  )
  assert status == 0, err
  return json.loads(out.strip().splitlines()[-1]), out


@pytest.mark.slow
def test_imagenet_recipes_on_mock_data(run_main, bicubic_export):
  with tfds.testing.mock_data(num_examples=7):
    metrics, out = run_recipe(
      run_main,
      bicubic_export,
      "configs/eval/imagenet.py:imagenet2012,imagenet_v2",
      "--config.eval.benchmarks.templates=clip7",
      "--config.eval.batch_size=64",
    )
  for name in ("imagenet2012", "imagenet_v2"):
    assert metrics[f"{name}/examples"] == 7.0  # the whole (mock) split
    top1, top5 = metrics[f"{name}/zero_shot/top1"], metrics[f"{name}/zero_shot/top5"]
    assert 0.0 <= top1 <= top5 <= 1.0
  assert "0.0010" in out and "0.0050" in out  # chance 1/1000, 5/1000 beside them


def _decoded_mock_rows(name, count):
  """The mock split's first `count` (image, label) rows, decoded by PIL (the CLI's rows)."""
  rows = tfds.builder(name).as_dataset(
    split="test", decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=False
  )
  pairs = [
    (images.decode(r["image"]), int(r["label"])) for r in rows.take(count).as_numpy_iterator()
  ]
  return [p for p, _ in pairs], np.array([label for _, label in pairs])


@pytest.mark.slow
def test_cifar_recipes_agree_with_the_inference_api(run_main, bicubic_export):
  with tfds.testing.mock_data(num_examples=12):
    metrics, _ = run_recipe(
      run_main,
      bicubic_export,
      "configs/eval/cifar.py:cifar10,cifar100",
      "--config.eval.num_examples=10",
    )
    pixels, labels = _decoded_mock_rows("cifar10", 10)
  assert metrics["cifar10/examples"] == metrics["cifar100/examples"] == 10.0
  # The same rows scored through coca_jax.inference (its own batching) on pixels made
  # here: the streamed batches keep images and labels aligned.
  model = inference.load(bicubic_export, batch_size=4)
  pixels = np.stack(
    [images.eval_pixels(p, 16, OPEN_CLIP_MEAN, OPEN_CLIP_STD, "bicubic") for p in pixels]
  )
  names = benchmarks.read_lines("cifar10_classes")
  probabilities = model.classify(
    pixels, names, benchmarks.read_lines("templates_clip_cifar"), preprocessed=True
  )
  expected = zero_shot.top_k_accuracy(probabilities.probabilities, labels, (1, 5))
  assert metrics["cifar10/zero_shot/top1"] == pytest.approx(expected["top1"])
  assert metrics["cifar10/zero_shot/top5"] == pytest.approx(expected["top5"])


def _jpeg(rng, shape) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


CAPTIONS = [
  ["a red heart", "a heart", "red heart symbol", "a big red heart", "heart"],
  ["a smiling face", "a face that smiles", "smiling face", "a happy face", "face"],
  ["a green flag", "a flag", "green flag on a pole", "a waving flag", "flag"],
]


def coco_rows(self, *args, **kwargs):
  """coco_captions' layout (captions/text, 5 per image), images as encoded bytes."""
  rng = np.random.default_rng(0)
  rows = [_jpeg(rng, (20 + 7 * i, 31, 3)) for i in range(len(CAPTIONS))]
  return tf.data.Dataset.from_tensor_slices(
    {"image": rows, "captions": {"text": CAPTIONS, "id": np.arange(15).reshape(3, 5)}}
  )


def _flickr_files(tmp_path, captions: list[list[str]], seed: int) -> str:
  """Flickr30k as own TFRecords: one random JPEG per entry of `captions` (its captions)."""
  files = str(tmp_path / "flickr30k_test.tfrecord")
  rng = np.random.default_rng(seed)
  with tf.io.TFRecordWriter(files) as writer:
    for image_captions in captions:
      feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_jpeg(rng, (18, 25, 3))])),
        "caption": tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[c.encode() for c in image_captions])
        ),
      }
      writer.write(
        tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
      )
  return files


@pytest.mark.slow
def test_coco_and_flickr_recipes(run_main, bicubic_export, tmp_path):
  # Flickr30k from own TFRecords: 2 images with 3 and 2 captions.
  files = _flickr_files(tmp_path, [["a cat", "a small cat", "cat"], ["a dog", "dog"]], seed=1)
  with tfds.testing.mock_data(as_dataset_fn=coco_rows):
    metrics, _ = run_recipe(
      run_main,
      bicubic_export,
      "configs/eval/coco.py:coco,flickr30k",
      f"--config.eval.benchmarks.flickr30k_files={files}",
      "--config.eval.batch_size=2",  # a padded last batch of captions and images
      "--config.eval.decode.max_length=4",
    )
  assert (metrics["coco/images"], metrics["coco/texts"]) == (3.0, 15.0)
  assert (metrics["flickr30k/images"], metrics["flickr30k/texts"]) == (2.0, 5.0)
  for name in ("coco", "flickr30k"):
    for direction in ("image_to_text", "text_to_image"):
      assert metrics[f"{name}/retrieval/{direction}_r10"] == 1.0  # fewer candidates than 10
      assert 0.0 <= metrics[f"{name}/retrieval/{direction}_r1"] <= 1.0
    assert metrics[f"{name}/captioning/cider"] >= 0.0
    assert 0.0 <= metrics[f"{name}/captioning/bleu4"] <= 1.0


def test_an_image_without_a_caption_is_skipped_and_counted(tmp_path, caplog):
  """It was an image->text query with no possible match (a sure miss of R@K) and, with
  captioning on, "image 1 has no reference captions" after the whole split was decoded."""
  captions = [["a cat"], ["", "  "], ["a dog", "dog", "\u200b"], ["\u00a0"], ["a bird"]]
  files = _flickr_files(tmp_path, captions, seed=2)
  config = tiny.get_config()
  config.eval.benchmarks.flickr30k_files = files
  config.eval.num_examples = 3  # the first three images that have a caption
  with caplog.at_level("WARNING"):
    batches = list(benchmarks.batches(benchmarks.BENCHMARKS["flickr30k"], config))
  # Blank by the rule that rejects a training row: a zero-width space is no reference,
  # and an image with only a no-break space is skipped (it had passed as captioned and
  # then held no reference).
  want = [["a cat"], ["a dog", "dog"], ["a bird"]]
  assert [c for b in batches for c in b["captions"]] == want
  assert sum(len(b["image"]) for b in batches) == 3
  assert "benchmark flickr30k: 2 images of split 'test' skipped" in caplog.text


def test_unprepared_dataset_names_the_config_key(tmp_path):
  config = tiny.get_config()
  config.eval.benchmarks.tfds_data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="config.eval.benchmarks.tfds_data_dir"):
    next(benchmarks.batches(benchmarks.BENCHMARKS["cifar10"], config))
  with pytest.raises(ValueError, match="config.eval.benchmarks.flickr30k_files"):
    next(benchmarks.batches(benchmarks.BENCHMARKS["flickr30k"], config))
