"""Video (Section 4.2): clip embeddings, the video head, its loss, the demo clips and the
demo config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_runs import tiny_config

from coca_jax import losses
from coca_jax import params as params_lib
from coca_jax.models import coca
from coca_jax.models.pooler import AttentionalPooler


def _clips(config, batch=2, frames=3, seed=0):
  size = config.model.vision.image_size
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(batch, frames, size, size, 3)), jnp.float32)


def _param_names(model) -> list[str]:
  state = nnx.state(model, nnx.Param)
  return [
    "/".join(params_lib.path_names(p)) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]
  ]


def _count(config) -> int:
  return params_lib.total(jax.eval_shape(lambda: nnx.state(coca.build(config.model), nnx.Param)))


# ---- model ----


@pytest.mark.slow  # ~8 s
def test_clip_embedding_is_the_normalised_mean_of_frame_embeddings():
  config = tiny_config(1)
  model = coca.build(config.model)
  clips = _clips(config, batch=2, frames=3)
  got = np.asarray(model.encode_video(clips))
  # Independently: each frame alone through encode_image, mean in float64, normalise.
  for b in range(clips.shape[0]):
    frames = np.stack(
      [np.asarray(model.encode_image(clips[b, f][None])[0][0], np.float64) for f in range(3)]
    )
    mean = frames.mean(axis=0)
    np.testing.assert_allclose(got[b], mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)


def test_head_absent_by_default_and_sized_when_asked():
  config = tiny_config(1)
  assert config.model.video.num_classes == 0
  assert not [n for n in _param_names(coca.build(config.model)) if "video" in n]
  base = _count(config)
  config.model.video.num_classes = 5
  width = config.model.width
  with nnx.use_eager_sharding(False):
    pooler = AttentionalPooler(
      1, width, config.model.heads, eps=1e-6, dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
  pooler_params = params_lib.total(nnx.state(pooler, nnx.Param))
  assert _count(config) == base + pooler_params + width * 5 + 5


def test_paper_param_counts_unchanged():
  # The same count `python -m coca_jax.params --config=configs/base.py` prints.
  from configs import base

  config = base.get_config()
  assert config.model.video.num_classes == 0
  assert _count(config) == 388_572_929  # `coca_jax.params` before the video head existed


def test_video_logits_see_every_frame_and_train_with_cross_entropy():
  config = tiny_config(1)
  config.model.video.num_classes = 4
  model = coca.build(config.model)
  clips = _clips(config, batch=2, frames=3)
  logits = model.video_logits(clips)
  assert logits.shape == (2, 4) and logits.dtype == jnp.float32
  changed = clips.at[:, 2].set(0.0)  # the last frame only
  assert not np.allclose(model.video_logits(changed), logits)
  outputs = model(dict(video=clips, label=jnp.asarray([1, 3])))
  np.testing.assert_allclose(outputs["video_logits"], logits, rtol=1e-5, atol=1e-6)
  loss, terms = losses.total_loss(outputs, dict(label=jnp.asarray([1, 3])), config.loss)
  z = np.asarray(logits, np.float64)
  log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
  np.testing.assert_allclose(loss, -(log_p[0, 1] + log_p[1, 3]) / 2, rtol=1e-5)
  assert terms["video_loss"] == loss and terms["contrastive_loss"] == 0


def test_no_head_is_a_clear_error():
  config = tiny_config(1)
  with pytest.raises(ValueError, match="no video head"):
    coca.build(config.model).video_logits(_clips(config))


# ---- the demo clips ----


def test_camera_motion_makes_distinct_frames_of_one_image():
  from coca_jax.data import video

  rng = np.random.default_rng(0)
  image = np.zeros((28, 28, 3), np.uint8)
  image[4:22, 9:17] = rng.integers(80, 255, size=(18, 8, 3))  # an off-centre object
  for motion in video.MOTIONS:
    for direction in (1, -1):
      clip = video.camera_motion(image, 4, motion, 32, direction)
      assert clip.shape == (4, 32, 32, 3) and clip.dtype == np.uint8
      for i in range(4):
        for j in range(i):
          assert np.abs(clip[i].astype(int) - clip[j]).mean() > 1.0, (motion, direction, i, j)
  with pytest.raises(ValueError, match="motion='tilt'"):
    video.camera_motion(image, 4, "tilt", 32)


def test_clip_pixels_pick_and_pad_frames():
  from coca_jax.data import images, video

  frames = [np.full((8, 8, 3), 40 * i, np.uint8) for i in range(5)]
  encoded = np.asarray([video._png(f) for f in frames], object)
  mean = std = (0.5, 0.5, 0.5)
  pixels, keep = video.clip_pixels(encoded, 3, 8, mean, std)
  assert keep and pixels.shape == (3, 8, 8, 3)
  for got, i in zip(pixels, (0, 2, 4)):  # evenly spaced
    np.testing.assert_allclose(got, images.eval_pixels(frames[i], 8, mean, std))
  # Fewer frames than F: each repeated in turn, evenly (the last alone weighed 3/4 before).
  pixels, keep = video.clip_pixels(encoded[:2], 4, 8, mean, std)
  for got, i in zip(pixels, (0, 0, 1, 1)):
    np.testing.assert_allclose(got, images.eval_pixels(frames[i], 8, mean, std))
  pixels, _ = video.clip_pixels(encoded[:3], 8, 8, mean, std)
  for got, i in zip(pixels, (0, 0, 0, 1, 1, 1, 2, 2)):
    np.testing.assert_allclose(got, images.eval_pixels(frames[i], 8, mean, std))
  _, keep = video.clip_pixels(np.asarray([b"not an image"], object), 2, 8, mean, std)
  assert not keep


@pytest.mark.slow
def test_own_tfrecords_read_as_clips(tmp_path):
  import tensorflow as tf

  from coca_jax.data import video
  from configs import demo_video

  config = demo_video.get_config()
  rng = np.random.default_rng(0)
  with tf.io.TFRecordWriter(str(tmp_path / "clips.tfrecord")) as writer:
    for label, count in enumerate((5, 1, 3)):  # frames per clip: more, fewer, as many as F
      frames = rng.integers(0, 256, size=(count, 20, 24, 3), dtype=np.uint8)
      writer.write(video._example([video._png(f) for f in frames], label))
  (tmp_path / "names.txt").write_text("walking\nrunning\njumping\n")
  config.data.video.update(
    files=str(tmp_path / "clips.tfrecord"), class_names=str(tmp_path / "names.txt"), frames=3
  )
  config.eval.num_examples = 0
  got = video.eval_set(config)
  assert got["clips"].shape == (3, 3, 32, 32, 3)
  np.testing.assert_array_equal(got["labels"], [0, 1, 2])
  assert got["class_names"] == ["walking", "running", "jumping"]
  np.testing.assert_array_equal(got["clips"][1, 0], got["clips"][1, 2])  # 1 frame, repeated
  batch = next(video.batches(config, "train", shard_index=0, num_shards=1, local_batch_size=2))
  assert batch["video"].shape == (2, 3, 32, 32, 3) and batch["label"].dtype == np.int32
  config.data.video.class_names = ""
  with pytest.raises(ValueError, match="class_names is empty"):
    video.class_names(config.data)


@pytest.mark.slow
def test_tfds_video_dataset_read_as_clips():
  """ucf101's layout (tfds.features.Video + ClassLabel), from TFDS's mock data: frames
  picked and preprocessed as for files, class names from the label feature."""
  import tensorflow_datasets as tfds

  from coca_jax.data import images, video
  from configs import demo_video

  config = demo_video.get_config()
  config.data.video.update(
    tfds_name="ucf101/ucf101_1_256:2.0.0", train_split="train", eval_split="test", frames=4
  )
  config.data.shuffle_buffer = 2  # mock clips are generated on demand
  config.eval.num_examples = 2
  with tfds.testing.mock_data(num_examples=3):
    got = video.eval_set(config)
    reference = tfds.load("ucf101", split="test", decoders={"video": tfds.decode.SkipDecoding()})
    first = next(iter(reference.as_numpy_iterator()))
    batch = next(video.batches(config, "train", shard_index=0, num_shards=1, local_batch_size=2))
  assert got["clips"].shape == (2, 4, 32, 32, 3)
  assert len(got["class_names"]) == 101 and got["class_names"][0] == "ApplyEyeMakeup"
  picks = np.linspace(0, len(first["video"]) - 1, 4).round().astype(int)
  image = config.data.image
  want = [
    images.eval_pixels(images.decode(first["video"][i]), 32, image.mean, image.std) for i in picks
  ]
  np.testing.assert_allclose(got["clips"][0], np.stack(want), atol=1e-6)
  assert got["labels"][0] == first["label"]
  assert batch["video"].shape == (2, 4, 32, 32, 3)
  config.data.video.tfds_name = "mnist:3.0.1"
  with pytest.raises(ValueError, match="no Video feature 'video'"):
    video.class_names(config.data)
  config.data.video.tfds_name = "ucf101"
  with pytest.raises(ValueError, match="needs a version"):
    video.class_names(config.data)


# ---- the eval and the serving API ----


@pytest.mark.slow  # ~11 s: exports and compiles a model
def test_video_eval_and_embed_videos(tmp_path, sentencepiece_model):
  from coca_jax import export, inference
  from coca_jax.evaluate import video as video_eval

  config = tiny_config(1)
  config.model.video.num_classes = 3
  config.data.vocab_path = sentencepiece_model
  params = nnx.to_pure_dict(nnx.state(coca.build(config.model), nnx.Param))
  export.write(params, config, str(tmp_path / "export"), "float32", sentencepiece_model)
  model = inference.load(str(tmp_path / "export"), batch_size=4)
  size = config.model.vision.image_size
  rng = np.random.default_rng(0)
  clips = rng.integers(0, 256, size=(3, 2, size, size, 3), dtype=np.uint8)
  got = model.embed_videos(clips)
  assert got.shape == (3, config.model.embed_dim)
  frames = model.embed_images(list(clips.reshape(6, size, size, 3))).reshape(3, 2, -1)
  mean = frames.mean(1)
  np.testing.assert_allclose(got, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
  np.testing.assert_allclose(model.embed_videos([list(c) for c in clips]), got, atol=1e-6)

  pixels = model.read_images(list(clips.reshape(6, size, size, 3)))[0].reshape(3, 2, size, size, 3)
  eval_set = dict(clips=pixels, labels=np.asarray([0, 1, 2]), class_names=["a", "b", "c"])
  result = video_eval.evaluate(model.predictor, [eval_set], ("a photo of {}.",), has_head=True)
  assert set(result) == {"zero_shot/top1", "top1", "chance", "examples"}
  assert result["chance"] == pytest.approx(1 / 3) and result["examples"] == 3
  assert 0 <= result["zero_shot/top1"] <= 1 and 0 <= result["top1"] <= 1
  labels = eval_set["labels"]
  head = np.argmax(model.predictor.video_logits(pixels), axis=-1)
  assert result["top1"] == pytest.approx(np.mean(head == labels))
  # The split read in parts (data.video.eval_sets) scores the same.
  parts = [
    dict(eval_set, clips=pixels[rows], labels=labels[rows]) for rows in (slice(0, 2), slice(2, 3))
  ]
  in_parts = video_eval.evaluate(model.predictor, parts, ("a photo of {}.",), has_head=True)
  assert in_parts == pytest.approx(result)
  # The k of config.eval.zero_shot.top_k (it was (1, 5) whatever the config), below C.
  ks = video_eval.evaluate(model.predictor, parts, ("{}",), has_head=False, top_k=(1, 2, 3))
  assert set(ks) == {"zero_shot/top1", "zero_shot/top2", "chance", "examples"}


# ---- the demo config, on tiny shapes, from a tiny export ----


@pytest.mark.slow
def test_demo_config_trains_from_a_tiny_export(tmp_path):
  from coca_jax import export, train
  from coca_jax import state as state_lib
  from configs import demo_video

  config = demo_video.get_config()
  tiny = tiny_config(1).model
  for key in ("width", "heads", "embed_dim"):
    config.model[key] = tiny[key]
  config.model.vision.layers = config.model.text.unimodal_layers = 1
  config.model.text.multimodal_layers = 1
  config.model.vision.mlp_dim = config.model.text.mlp_dim = 64
  config.model.vision.image_size = 16
  config.model.pooler.caption_queries = 8
  config.data.video.update(frames=2, demo_fashion_train=64, demo_fashion_eval=16)
  config.data.global_batch_size = 8
  config.data.shuffle_buffer = 64
  config.train.update(steps=4, log_every=2, eval_every=4, eval_steps=1, checkpoint_every=4)
  config.eval.batch_size = 8
  # The source: the same model without the head, as an export.
  source = config.copy_and_resolve_references()
  source.model.video.num_classes = 0
  run = state_lib.setup(source)
  export.write(
    state_lib.create(source, run)["params"], source, str(tmp_path / "src"), "float32", None
  )
  config.train.init_from = str(tmp_path / "src")

  final = train.train(config, str(tmp_path / "work"))
  assert final["step"] == 4
  assert np.isfinite(final["video_loss"])
  assert 0.0 <= final["eval/video/zero_shot/top1"] <= 1.0
  assert 0.0 <= final["eval/video/top1"] <= 1.0
  assert final["eval/video/chance"] == pytest.approx(0.1)
  assert final["eval/video/examples"] == 16
  for name in ("video/zero_shot/top1", "video/top1", "video/chance"):
    assert final[name] == final[f"eval/{name}"]  # config.eval.headline

  # A finetune from that export whose classes come in another order loaded its classifier
  # silently, every row scoring another class; now refused unless the classifier is fresh.
  from coca_jax import init_from
  from coca_jax.data import video

  names = video.class_names(config.data)
  again = config.copy_and_resolve_references()
  again.train.init_from = str(tmp_path / "work" / "export")
  (tmp_path / "reordered.txt").write_text("\n".join([names[1], names[0], *names[2:]]) + "\n")
  again.data.video.class_names = str(tmp_path / "reordered.txt")
  run = state_lib.setup(again)
  with pytest.raises(ValueError, match=r"scores other classes .*\(2 of 10 differ; row 0 is"):
    init_from.create(again, run)
  again.train.init_exclude = ("^video_head/classifier/",)
  init_from.create(again, run)


@pytest.mark.skipif(
  not __import__("coca_jax.data.prepare").data.prepare.is_prepared(),
  reason="demo data not prepared (.ci/run prepares it)",
)
def test_more_source_classes_than_the_head_has_is_an_early_error(tmp_path):
  """Labels past the head's classes made the loss NaN at the first logged step."""
  from coca_jax.data import loader
  from configs import demo_video

  config = demo_video.get_config()
  (tmp_path / "names.txt").write_text("walking\nrunning\njumping\n")
  config.data.video.update(
    files=str(tmp_path / "none.tfrecord"), class_names=str(tmp_path / "names.txt")
  )
  config.model.video.num_classes = 2
  with pytest.raises(ValueError, match="3 classes but config.model.video.num_classes=2"):
    loader.resolve(config)
  config.model.video.num_classes = 3
  assert loader.resolve(config).model.video.num_classes == 3


# ---- files with no usable clip ----


def _write_clips(path, clips) -> str:
  """A video TFRecord of (encoded frames, label) clips."""
  import tensorflow as tf

  from coca_jax.data import video

  with tf.io.TFRecordWriter(str(path)) as writer:
    for frames, label in clips:
      writer.write(video._example(frames, label))
  return str(path)


def _files_config(tmp_path, vocab_path, files, eval_files):
  """The tiny model with a 2-class video head on the video source's own files."""
  (tmp_path / "names.txt").write_text("walking\nrunning\n")
  config = tiny_config(1)
  config.data.source = "video"
  config.model.video.num_classes = 2
  config.data.video.update(
    files=files, eval_files=eval_files, class_names=str(tmp_path / "names.txt"), frames=2
  )
  config.data.vocab_path = vocab_path
  config.data.jft_style.tfds_data_dir = str(tmp_path)  # not the demo data: none prepared
  return config


def test_video_files_without_a_usable_clip_are_an_error_before_the_run_writes(
  tmp_path, sentencepiece_model
):
  """An empty train file was a bare StopIteration at the first batch (after config.json
  was written); an empty eval file numpy's 'need at least one array to stack' at the
  first evaluation, after training."""
  from coca_jax.data import loader, video

  frame = video._png(np.full((8, 8, 3), 90, np.uint8))
  good = _write_clips(tmp_path / "good.tfrecord", [([frame, frame], 0)])
  empty = _write_clips(tmp_path / "empty.tfrecord", [])
  unusable = _write_clips(tmp_path / "unusable.tfrecord", [([], 0), ([frame, b"not an image"], 1)])
  cases = [
    (empty, good, f"config.data.video.files='{empty}' holds no examples .* video train split"),
    (good, empty, f"config.data.video.eval_files='{empty}' holds no examples .* eval split"),
    (unusable, good, f"config.data.video.files='{unusable}': none of its 2 examples .*usable"),
    (good, unusable, f"config.data.video.eval_files='{unusable}': none of its 2 examples"),
  ]
  for files, eval_files, message in cases:
    config = _files_config(tmp_path, sentencepiece_model, files, eval_files)
    with pytest.raises(ValueError, match=message):
      loader.check_files(loader.resolve(config))
  loader.check_files(loader.resolve(_files_config(tmp_path, sentencepiece_model, good, good)))

  # The demo clips: none in a split of 0 images.
  config = _files_config(tmp_path, sentencepiece_model, "", "")
  config.data.video.update(class_names="", demo_fashion_eval=0)
  config.model.video.num_classes = 10
  with pytest.raises(ValueError, match="config.data.video.demo_fashion_eval=0"):
    loader.check_files(loader.resolve(config))


def test_video_eval_set_with_every_clip_rejected_names_its_file(tmp_path, sentencepiece_model):
  from coca_jax.data import video

  frame = video._png(np.full((8, 8, 3), 90, np.uint8))
  good = _write_clips(tmp_path / "good.tfrecord", [([frame, frame], 0)])
  rejected = _write_clips(tmp_path / "rejected.tfrecord", [([b"not an image"], 1)])
  config = _files_config(tmp_path, sentencepiece_model, good, rejected)
  config.eval.num_examples = 0
  with pytest.raises(
    ValueError, match=f"video eval split has no clip: config.data.video.eval_files='{rejected}'"
  ):
    video.eval_set(config)


@pytest.mark.slow  # ~11 s: reads clip files through tf.data
def test_a_label_that_is_no_class_index_names_the_files(tmp_path, sentencepiece_model):
  """1-based labels (1..C) on 2 class names: label 2 made the loss NaN (train) and the
  accuracy silently wrong (eval)."""
  from coca_jax.data import video

  frame = video._png(np.full((8, 8, 3), 90, np.uint8))
  clips = _write_clips(tmp_path / "clips.tfrecord", [([frame], 1), ([frame], 2)])
  config = _files_config(tmp_path, sentencepiece_model, clips, clips)
  config.eval.num_examples = 0
  outside = f"config.data.video.files='{clips}' holds label 2, outside 0..1"
  with pytest.raises(ValueError, match=outside):
    next(video.batches(config, "train", shard_index=0, num_shards=1, local_batch_size=2))
  with pytest.raises(ValueError, match="eval_files=.* holds label 2, outside 0..1"):
    video.eval_set(config)
  video.check_labels(np.array([0, 1]), 2, config.data, "train")  # in range: no error


@pytest.mark.slow  # ~11 s: four tf.data pipelines
def test_a_shard_whose_files_are_empty_is_an_error_naming_it(tmp_path, sentencepiece_model):
  """Two files, one empty, two data shards: seqio gives each shard one whole file, so
  shard 1 reads nothing. Its host ran out of batches without a word (one eval batch
  short of the others: a hang in the next collective); now its stream says so."""
  from coca_jax import sharding
  from coca_jax.data import loader, video

  frame = video._png(np.full((8, 8, 3), 90, np.uint8))
  _write_clips(tmp_path / "clips-0.tfrecord", [([frame], 0), ([frame], 1)])
  _write_clips(tmp_path / "clips-1.tfrecord", [])
  pattern = str(tmp_path / "clips-*.tfrecord")
  config = loader.resolve(_files_config(tmp_path, sentencepiece_model, pattern, pattern))
  for split in ("train", "eval"):
    first = sharding.DataShard(index=0, count=2, rows=np.array([0, 2]), device_rows={})
    assert next(loader.shard_batches(config, split, first))["video"].shape[0] == 2
    empty = sharding.DataShard(index=1, count=2, rows=np.array([1, 3]), device_rows={})
    with pytest.raises(RuntimeError, match=f"the {split} input of data shard 1 of 2 ended"):
      next(loader.shard_batches(config, split, empty))
