"""Video data: a seqio Task of clips (encoded frames) and labels, the demo clips, batches.

Legend: b local batch, F frames per clip (config.data.video.frames), S image size,
C classes.

Files: TFRecords of tf.train.Examples with `frames` (a bytes_list of the clip's F encoded
frames, PNG or JPEG, in time order) and `label` (int64, 0..C-1), `config.data.video.files`
/ `eval_files`; class names in `config.data.video.class_names` (a text file, line i =
label i's name). A clip with more frames than F keeps F evenly spaced ones; fewer are
padded by repeating the last.

TFDS: `config.data.video.tfds_name` (e.g. ucf101) reads a TFDS video dataset instead:
its `video` feature (tfds.features.Video, a sequence of encoded frames, read undecoded)
takes the place of `frames`, its `label` ClassLabel's names are the class names (unless
class_names is set), splits `train_split` / `eval_split`.

Empty files: the demo clips that `build_demo` writes under <data_dir>/video_demo/, offline
(~10 s): each Fashion-MNIST image becomes one clip of F frames filmed by a moving camera
(`camera_motion`: a pan, a zoom or a rotation, direction and kind drawn per clip), labelled
by the image's class (10 classes). Train clips come from the first demo_fashion_train
TRAIN images, eval clips from the first demo_fashion_eval TEST images: held out by image.

Tasks (registered by `register`): NAME and NAME_eval, output features `video`
[F, S, S, 3] float32 (each frame through the evaluation transform of the input pipeline:
the camera motion is the augmentation) and `label` int32.

Trainer batches (`batches`, config.data.source = "video"): {"video" [b, F, S, S, 3],
"label" [b] int32}, read from NAME_rows: a resume at step k skips k b clips undecoded
(pipeline.row_batches), and the shuffle buffer holds encoded clips.
"""

import io
import math
import os

import numpy as np
import seqio
import tensorflow as tf
from PIL import Image

from coca_jax.data import images, loader, pipeline, prepare, raw, tasks

DEMO_DIR = "video_demo"
# Clips per eval set that `eval_sets` holds in memory (16 frames at 288px: 1 GB).
EVAL_CLIPS = 64
DEMO_SPLITS = {"train": "train.tfrecord", "validation": "validation.tfrecord"}
CLASS_NAMES_FILE = "class_names.txt"
FEATURES = {
  "frames": tf.io.VarLenFeature(tf.string),
  "label": tf.io.FixedLenFeature([], tf.int64),
}
MOTIONS = ("pan", "zoom", "rotate")
# Motion ranges over a clip (start -> end): a pan moves the view by PAN of the image
# width, a zoom goes from 1x to ZOOM x, a rotation turns by ROTATE degrees.
PAN, ZOOM, ROTATE = 0.3, 1.5, 40.0


# ---- the demo clips ----


def camera_motion(
  image: np.ndarray, frames: int, motion: str, size: int, direction: int = 1
) -> np.ndarray:
  """[h, w, 3] uint8 -> [F, size, size, 3] uint8: the image seen by a camera that pans
  (horizontally), zooms in (direction -1: out) or rotates over F frames; pixels from
  outside the image are black (the Fashion-MNIST background)."""
  if motion not in MOTIONS:
    raise ValueError(f"motion={motion!r}; use one of {MOTIONS}")
  if frames < 2:
    raise ValueError(f"a clip with camera motion needs frames >= 2, got {frames}")
  picture = Image.fromarray(image)
  h, w = image.shape[:2]
  out = []
  for t in np.linspace(0.0, 1.0, frames):
    s = t if direction > 0 else 1.0 - t  # progress along the motion
    zoom, angle, shift = 1.0, 0.0, 0.0
    if motion == "pan":
      shift = (s - 0.5) * PAN * w
    elif motion == "zoom":
      zoom = 1.0 + s * (ZOOM - 1.0)
    else:
      angle = math.radians((s - 0.5) * ROTATE)
    # Output pixel (x, y) reads input center + R(angle) (x - out center) (w / size) / zoom.
    k = (w / size) / zoom
    a, b = k * math.cos(angle), -k * math.sin(angle)
    d, e = k * math.sin(angle), k * math.cos(angle)
    o = (size - 1) / 2
    c = (w - 1) / 2 + shift - (a * o + b * o)
    f = (h - 1) / 2 - (d * o + e * o)
    frame = picture.transform(
      (size, size), Image.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR, fillcolor=(0, 0, 0)
    )
    out.append(np.asarray(frame))
  return np.stack(out)


def _png(frame: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(frame).save(buffer, format="PNG")
  return buffer.getvalue()


def _example(frames: list[bytes], label: int) -> bytes:
  feature = dict(
    frames=tf.train.Feature(bytes_list=tf.train.BytesList(value=frames)),
    label=tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
  )
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def demo_clips(data_config, split: str):
  """(encoded frames, label) of the demo clips of `split` ("train" or "validation")."""
  import tensorflow_datasets as tfds

  v = data_config.video
  data_dir = data_config.data_dir or prepare.default_data_dir()
  name, version = data_config.jft_style.tfds_name.split(":")
  builder = tfds.builder_from_directory(
    os.path.join(prepare.paths(data_dir)["tfds"], name, version)
  )
  fashion_split = "train" if split == "train" else data_config.jft_style.eval_split
  limit = v.demo_fashion_train if split == "train" else v.demo_fashion_eval
  rng = np.random.default_rng(0 if split == "train" else 1)
  rows = builder.as_dataset(split=fashion_split, decoders={"image": tfds.decode.SkipDecoding()})
  for i, row in enumerate(rows.as_numpy_iterator()):
    if i == limit:
      break
    motion = MOTIONS[rng.integers(len(MOTIONS))]
    direction = int(rng.choice([-1, 1]))
    clip = camera_motion(
      images.decode(row["image"]), v.frames, motion, data_config.image_size, direction
    )
    yield [_png(frame) for frame in clip], int(row["label"])


def demo_folder(data_config) -> str:
  data_dir = data_config.data_dir or prepare.default_data_dir()
  v = data_config.video
  return os.path.join(
    data_dir,
    DEMO_DIR,
    f"fashion{v.demo_fashion_train}_{v.demo_fashion_eval}_f{v.frames}_s{data_config.image_size}",
  )


def build_demo(data_config) -> dict[str, str]:
  """Writes the demo clips' TFRecords and class names (idempotent); returns {split: path}."""
  folder = demo_folder(data_config)
  paths = {split: os.path.join(folder, file) for split, file in DEMO_SPLITS.items()}
  with prepare.exclusive(folder):
    names_path = os.path.join(folder, CLASS_NAMES_FILE)
    if not os.path.exists(names_path):
      with open(names_path + ".tmp", "w") as f:
        f.write("".join(name + "\n" for name, _ in raw.FASHION_MNIST_CLASSES))
      os.replace(names_path + ".tmp", names_path)
    for split, path in paths.items():
      if os.path.exists(path):
        continue
      with tf.io.TFRecordWriter(path + ".tmp") as writer:
        for frames, label in demo_clips(data_config, split):
          writer.write(_example(frames, label))
      os.replace(path + ".tmp", path)
  return paths


def files(data_config) -> dict[str, str]:
  """{"train", "validation"}: the file patterns of the video source (the demo's built)."""
  v = data_config.video
  if v.files:
    return tasks.split_files("config.data.video", v.files, v.eval_files)
  return build_demo(data_config)


def tfds_builder(data_config):
  """The TFDS builder of config.data.video.tfds_name (a clear error when it has no
  `video` / `label` features)."""
  import tensorflow_datasets as tfds

  v = data_config.video
  if ":" not in v.tfds_name:
    raise ValueError(
      f"config.data.video.tfds_name={v.tfds_name!r} needs a version (seqio reads a fixed "
      "one), e.g. 'ucf101/ucf101_1_256:2.0.0'"
    )
  builder = tfds.builder(v.tfds_name, data_dir=v.tfds_data_dir or None)
  features = builder.info.features
  for key, kind in (("video", tfds.features.Video), ("label", tfds.features.ClassLabel)):
    if not isinstance(features[key] if key in features else None, kind):
      raise ValueError(
        f"config.data.video.tfds_name={v.tfds_name!r} has no {kind.__name__} feature "
        f"{key!r} (features: {sorted(features)})"
      )
  return builder


def source(data_config) -> seqio.DataSource:
  """The clips: the TFDS dataset, the TFRecord files, or the demo clips."""
  v = data_config.video
  if v.tfds_name:
    import tensorflow_datasets as tfds

    tfds_builder(data_config)
    return seqio.TfdsDataSource(
      tfds_name=v.tfds_name,
      tfds_data_dir=v.tfds_data_dir or None,
      splits=dict(train=v.train_split, validation=v.eval_split),
      decoders={"video": tfds.decode.SkipDecoding()},
    )
  return tasks.tf_example_source(files(data_config), FEATURES)


def class_names(data_config) -> list[str]:
  """The class names, label order (config.data.video.class_names, the TFDS dataset's
  label names, or the demo's)."""
  path = data_config.video.class_names
  if not path and data_config.video.tfds_name:
    return list(tfds_builder(data_config).info.features["label"].names)
  if not path:
    if data_config.video.files:
      raise ValueError(
        "config.data.video.files is set but config.data.video.class_names is empty: name a "
        "text file with one class name per line (line i = label i)"
      )
    # The demo's: what build_demo writes to its class-names file (no clips built here).
    return [name for name, _ in raw.FASHION_MNIST_CLASSES]
  with tf.io.gfile.GFile(path) as f:
    return [line.strip() for line in f if line.strip()]


# ---- seqio ----


def output_features() -> dict:
  passthrough = seqio.PassThroughVocabulary(size=0)
  return {
    "video": seqio.Feature(passthrough, add_eos=False, dtype=tf.float32, rank=4),
    "label": seqio.Feature(passthrough, add_eos=False, dtype=tf.int32, rank=0),
  }


def clip_pixels(encoded: np.ndarray, frames: int, size: int, mean, std, resize="bilinear"):
  """numpy: F' encoded frames -> ([F, S, S, 3] float32 eval pixels, keep). F evenly spaced
  frames of F' >= F; when F' < F, each frame repeated in turn, evenly ([a, a, b, b] of
  [a, b] for F=4), so that none weighs more than another; keep False (zeros) when a
  frame does not decode or there is none. Each frame: images.eval_pixels (`resize` its
  method)."""
  encoded = list(encoded)
  if not encoded:
    return np.zeros((frames, size, size, 3), np.float32), False
  if len(encoded) < frames:
    picks = np.arange(frames) * len(encoded) // frames
  else:
    picks = np.linspace(0, len(encoded) - 1, frames).round().astype(int)
  try:
    pixels = [images.eval_pixels(images.decode(encoded[i]), size, mean, std, resize) for i in picks]
  except images.ImageError:
    return np.zeros((frames, size, size, 3), np.float32), False
  return np.stack(pixels).astype(np.float32), True


# What a clip needs for `usable` (in messages).
USABLE = "at least one frame, every frame an image that decodes"


def usable(row: dict, data_config) -> bool:
  """Whether a parsed clip (numpy: "frames" [F'] encoded) is one the pipeline keeps
  (`clip_pixels`' keep)."""
  frames = data_config.video.frames
  return clip_pixels(row["frames"], frames, **tasks.eval_image_options(data_config))[1]


def _rows(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Source rows -> {"frames" [F'] encoded frames, "label" int32} (TFDS names them
  `video`; TFRecords hold them sparse)."""

  def convert(row):
    encoded = row["frames"] if "frames" in row else row["video"]
    if isinstance(encoded, tf.SparseTensor):
      encoded = tf.sparse.to_dense(encoded)
    return dict(frames=encoded, label=tf.cast(row["label"], tf.int32))

  return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def example_fn(data_config):
  """(row of `_rows`, seeds) -> {"video" [F, S, S, 3] float32, "label", "keep"}: the
  clip's frames decoded (`clip_pixels`; no randomness, `seeds` unused), keep False when
  one does not decode."""
  options = tasks.eval_image_options(data_config)
  frames = data_config.video.frames

  def example(row, seeds=None):
    video, keep = tf.numpy_function(
      lambda e: clip_pixels(e, frames, **options),
      [row["frames"]],
      [tf.float32, tf.bool],
      stateful=False,
    )
    video.set_shape([frames, options["size"], options["size"], 3])
    keep.set_shape([])
    return dict(video=video, label=row["label"], keep=keep)

  return example


def _preprocessors(data_config) -> list:
  example = example_fn(data_config)

  def decode_and_filter(ds):
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE).filter(lambda r: r["keep"])
    return ds.map(lambda r: dict(video=r["video"], label=r["label"]))

  return [_rows, decode_and_filter]


def register(data_config) -> tuple[str, str]:
  """Registers NAME and NAME_eval over the clips (`source`), and NAME_rows (the clips
  undecoded, which `batches` reads); -> (train, eval) task names."""
  name = data_config.video.task_name
  clips = source(data_config)
  passthrough = seqio.PassThroughVocabulary(size=0)
  row_features = {
    "frames": seqio.Feature(passthrough, add_eos=False, dtype=tf.string, rank=1),
    "label": seqio.Feature(passthrough, add_eos=False, dtype=tf.int32, rank=0),
  }
  return tasks.register_tasks(
    name,
    clips,
    data_config,
    train=_preprocessors(data_config),
    held_out=_preprocessors(data_config),
    features=output_features(),
    rows=[_rows],
    row_features=row_features,
  )


def check_labels(labels: np.ndarray, classes: int, data_config, split: str) -> None:
  """A ValueError naming the split's files when a label is not a class index 0..C-1
  (C = the class names): the loss would be NaN, or an accuracy silently wrong."""
  bad = (labels < 0) | (labels >= classes)
  if bad.any():
    raise ValueError(
      f"{loader.describe_split(data_config, 'video', split)} holds label "
      f"{int(labels[bad][0])}, outside 0..{classes - 1}: labels are 0-based indices into "
      f"the {classes} class names (config.data.video.class_names, line i = label i)"
    )


def batches(
  config, split: str, *, shard_index: int, num_shards: int, local_batch_size: int, start_step=0
):
  """Endless host batches {"video" [b,F,S,S,3] float32, "label" [b] int32}; split "train"
  (shuffled) or "eval" (the held-out files, in order); resumable without decoding the
  skipped clips (pipeline.row_batches). A label that is no class index is an error
  (`check_labels`)."""
  name, _ = register(config.data)
  classes = len(class_names(config.data))
  rows = pipeline.row_batches(
    config.data,
    name + tasks.ROWS_SUFFIX,
    split,
    example_fn(config.data),
    shard_index=shard_index,
    num_shards=num_shards,
    local_batch_size=local_batch_size,
    start_step=start_step,
  )
  for batch in rows:
    check_labels(batch["label"], classes, config.data, split)
    yield dict(video=batch["video"], label=batch["label"].astype(np.int32))


def eval_sets(config, clips: int = EVAL_CLIPS):
  """The first config.eval.num_examples (0: all) held-out clips, as eval sets of at most
  `clips` clips each (0: one set of them all), read as they are consumed (16 frames at
  288px are 16 MB of float32 a clip): {"clips" [n,F,S,S,3] float32, "labels" [n] int,
  "class_names" [C]}. A ValueError when the split yields no clip, or a label outside the
  class names."""
  _, eval_name = register(config.data)
  names = class_names(config.data)
  empty = True
  for part in tasks.eval_parts(eval_name, config.data, config.eval.num_examples, clips):
    empty = False
    labels = np.asarray([int(r["label"]) for r in part])
    check_labels(labels, len(names), config.data, "eval")
    videos = np.stack([r["video"] for r in part]).astype(np.float32)
    yield dict(clips=videos, labels=labels, class_names=names)
  if empty:
    raise ValueError(
      f"the video eval split has no clip: {loader.describe_split(config.data, 'video', 'eval')} "
      "yields none whose frames decode"
    )


def eval_set(config) -> dict:
  """All the clips of `eval_sets` in one eval set (small splits, tests)."""
  return next(eval_sets(config, clips=0))
