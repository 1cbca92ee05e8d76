"""Inference API and CLIs on an export of the tiny config (random init)."""

import json
import re

import numpy as np
import pytest
from absl import app, flags
from flax import nnx
from PIL import Image

from coca_jax import caption, classify, console, export, inference, predict
from coca_jax.data import images
from coca_jax.evaluate import __main__ as evaluate_main
from coca_jax.models import coca
from configs import tiny


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, sentencepiece_model):
  root = tmp_path_factory.mktemp("export")
  config = tiny.get_config()
  config.unlock()
  config.data.source = "synthetic"  # the evaluate CLI then uses synthetic eval sets
  config.data.vocab_path = sentencepiece_model
  config.eval.num_examples = 16
  config.eval.batch_size = 8
  model = coca.build(config.model, seed=0)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  export.write(params, config, str(root / "export"), "float32", sentencepiece_model)
  return str(root / "export")


@pytest.fixture(scope="module")
def loaded(export_dir):
  return inference.load(export_dir, batch_size=4)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  paths = []
  for i in range(3):
    path = root / f"img{i}.png"
    Image.fromarray(rng.integers(0, 255, (20 + 4 * i, 24, 3), dtype=np.uint8)).save(path)
    paths.append(str(path))
  (root / "broken.png").write_bytes(b"not a png at all")
  return paths, str(root / "broken.png"), str(root / "missing.png")


def test_preprocess_resizes_the_short_side_and_centre_crops():
  # 16 x 48 image: left, middle, right thirds in three colours; the 16-pixel crop of a
  # 16 x 48 image keeps exactly the middle third.
  image = np.zeros((16, 48, 3), np.uint8)
  image[:, :16] = (255, 0, 0)
  image[:, 16:32] = (0, 255, 0)
  image[:, 32:] = (0, 0, 255)
  out = images.eval_pixels(image, 16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
  assert out.shape == (16, 16, 3) and out.dtype == np.float32
  np.testing.assert_allclose(
    out[:, 2:-2], np.broadcast_to([-1.0, 1.0, -1.0], (16, 12, 3)), atol=1e-6
  )


@pytest.mark.parametrize("resize", ["bilinear", "bicubic"])
def test_a_strip_is_resized_through_its_crop_alone(monkeypatch, resize):
  """A 1 x 8000 strip resized whole to a 224-pixel short side took 1.6 GB; beyond
  MAX_RESIZED_PIXELS only the crop's source box is resampled, within 1/255 of the whole
  resize for a smooth image (a 6 x 600 gradient here, S = 16: the whole resize is
  16 x 1600 pixels, over a budget lowered to 16 x 1000)."""
  rgb = np.zeros((6, 600, 3), np.uint8)
  rgb[..., 0] = np.arange(600) % 256  # a ramp, so that the crop's offset shows
  rgb[..., 1] = np.arange(6)[:, None] * 40
  monkeypatch.setattr(images, "MAX_RESIZED_PIXELS", 16 * 1000)
  boxed = images.eval_pixels(rgb, 16, (0, 0, 0), (1, 1, 1), resize)
  monkeypatch.setattr(images, "MAX_RESIZED_PIXELS", 16 * 1600)
  whole = images.eval_pixels(rgb, 16, (0, 0, 0), (1, 1, 1), resize)
  assert boxed.shape == whole.shape == (16, 16, 3)
  np.testing.assert_allclose(boxed, whole, atol=1.5 / 255)


def test_images_as_paths_pil_or_arrays_agree(loaded, image_files):
  paths, _, _ = image_files
  as_pil = [Image.open(p) for p in paths]
  as_arrays = [np.asarray(Image.open(p)) for p in paths]
  by_path = loaded.embed_images(paths)
  assert by_path.shape == (3, 16)
  np.testing.assert_allclose(loaded.embed_images(as_pil), by_path, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loaded.embed_images(as_arrays), by_path, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(by_path, axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow  # compiles the decoders for buckets of 4, 2 and 1 images (~10 s)
def test_padding_the_last_batch_does_not_change_results(loaded, image_files):
  """Batch size 4: five images run as a batch of 4 and a bucket of 1, two as a bucket of
  2; an image's embedding and captions are the same in each."""
  paths, _, _ = image_files
  five = paths + paths[:2]  # batch size 4: one full batch, one padded
  embeddings = loaded.embed_images(five)
  np.testing.assert_allclose(embeddings[3:], embeddings[:2], rtol=1e-5, atol=1e-6)
  captions = loaded.caption(five)
  assert len(captions) == 5 and captions[3:] == captions[:2]
  assert loaded.caption(five, method="beam", beam_size=2)[3:] == loaded.caption(
    paths[:2], method="beam", beam_size=2
  )


def test_classify_and_embed_texts(loaded, image_files):
  paths, _, _ = image_files
  result = loaded.classify(paths, ["cat", "dog", "red heart"])
  assert len(result.labels) == 3 and result.probabilities.shape == (3, 3)
  np.testing.assert_allclose(result.probabilities.sum(1), 1.0, rtol=1e-5)
  assert result.labels == [["cat", "dog", "red heart"][i] for i in result.probabilities.argmax(1)]
  assert loaded.embed_texts(["a cat", "a dog"]).shape == (2, 16)
  # Class names as a NumPy array: NumPy's "truth value ... is ambiguous" before (helper-89).
  as_array = loaded.classify(paths, np.array(["cat", "dog", "red heart"]))
  assert as_array.labels == result.labels
  np.testing.assert_array_equal(as_array.probabilities, result.probabilities)


def test_caption_with_a_prefix_continues_it(loaded, image_files):
  paths, _, _ = image_files
  with_prefix = loaded.caption(paths, prefix="a cat")  # 2-3 tokens of the tiny vocabulary
  assert len(with_prefix) == 3 and all(isinstance(c, str) for c in with_prefix)


@pytest.mark.slow  # compiles the greedy decoder
def test_arrays_are_never_taken_as_preprocessed_by_dtype(loaded):
  size = loaded.image_size
  unit = np.random.default_rng(1).random((2, size, size, 3)).astype(np.float32)  # 0..1
  # Reference: the pixels by hand (0..1 -> 0..255 rounded), then the eval transform.
  rgb = np.round(unit * 255).astype(np.uint8)
  pixels = np.stack([images.eval_pixels(x, size, loaded.mean, loaded.std) for x in rgb])
  expected = loaded.predictor.embed_images(pixels)
  for given in (unit, list(unit), unit.astype(np.float64), rgb):
    np.testing.assert_allclose(loaded.embed_images(given), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    loaded.embed_images(pixels, preprocessed=True), expected, rtol=1e-5, atol=1e-6
  )
  same = loaded.caption(pixels, method="greedy", preprocessed=True)
  assert loaded.caption(unit, method="greedy") == same
  with pytest.raises(ValueError, match=rf"\[N, {size}, {size}, 3\].*\(2, 8, 8, 3\)"):
    loaded.embed_images(np.zeros((2, 8, 8, 3), np.float32), preprocessed=True)


def test_decode_method_follows_the_options_given(loaded):
  beam_default = loaded.predictor  # the tiny config decodes with beam search
  assert beam_default.decode_options().method == "beam"
  options = beam_default.decode_options(temperature=0.7, top_p=0.9)
  assert (options.method, options.temperature, options.top_p) == ("sample", 0.7, 0.9)
  assert beam_default.decode_options(top_k=3).method == "sample"
  assert beam_default.decode_options(max_length=5).method == "beam"
  config = loaded.config.copy_and_resolve_references()
  config.eval.decode.method = "greedy"
  greedy_default = predict.Predictor(loaded.module, config, loaded.vocab, 4)
  assert greedy_default.decode_options().method == "greedy"
  options = greedy_default.decode_options(beam_size=8)
  assert (options.method, options.beam_size) == ("beam", 8)
  assert greedy_default.decode_options(length_penalty=0.0).method == "beam"
  with pytest.raises(ValueError, match="temperature does not apply to method='beam'"):
    loaded.caption(np.zeros((8, 8, 3), np.uint8), method="beam", temperature=0.7)
  with pytest.raises(ValueError, match="beam_size does not apply to method='greedy'"):
    loaded.caption(np.zeros((8, 8, 3), np.uint8), method="greedy", beam_size=4)
  with pytest.raises(ValueError, match="top_p does not apply to method='greedy'"):
    beam_default.decode_options(method="greedy", top_p=0.5)
  with pytest.raises(ValueError, match="length_penalty does not apply to method='sample'"):
    beam_default.decode_options(method="sample", length_penalty=0.6)
  with pytest.raises(ValueError, match="beam_size .* and top_k .* exclude each other"):
    beam_default.decode_options(beam_size=2, top_k=3)
  # Below 1e-6 the logits / temperature overflow (1e-38 sampled garbage): greedy's job.
  with pytest.raises(ValueError, match=r"temperature >= 1e-06 \(below it, method greedy\)"):
    beam_default.decode_options(temperature=1e-38)
  assert beam_default.decode_options(temperature=1e-6).method == "sample"


def test_edge_inputs_get_clear_answers(export_dir, loaded):
  """batch_size 0 was range()'s error, -1 an IndexError; no clips raised instead of
  returning none (no images return none); a PIL mode without an RGB conversion escaped
  errors="collect"."""
  for size in (0, -1):
    with pytest.raises(ValueError, match=f"batch_size={size}; the images per jitted call"):
      inference.load(export_dir, batch_size=size)
  assert loaded.embed_videos([]).shape == (0, loaded.config.model.embed_dim)
  odd = Image.new("La", (4, 4))
  with pytest.raises(images.ImageError, match="mode 'La' cannot be read as RGB"):
    images.read(odd)
  pixels, failures = loaded.read_images([np.zeros((8, 8, 3), np.uint8), odd], errors="collect")
  assert len(pixels) == 1 and list(failures) == [1]


@pytest.mark.slow  # compiles the sampling decoder
def test_sampling_seed_defaults_to_the_configs(loaded, image_files):
  paths, _, _ = image_files
  config = loaded.config.copy_and_resolve_references()
  config.eval.decode.seed = 7
  predictor = predict.Predictor(loaded.module, config, loaded.vocab, 4)
  pixels = loaded.read_images(paths)[0]
  options = predictor.decode_options(method="sample", temperature=3.0)
  by_seed = {seed: predictor.caption_tokens(pixels, options, seed=seed)[0] for seed in (0, 7)}
  assert (by_seed[0] != by_seed[7]).any()  # else the test below proves nothing
  np.testing.assert_array_equal(predictor.caption_tokens(pixels, options)[0], by_seed[7])
  assert predictor.caption(pixels, options) == predictor.caption(pixels, options, seed=7)
  with pytest.raises(ValueError, match="seed=7 applies to sampling only; the method is 'beam'"):
    loaded.caption(paths, beam_size=2, seed=7)  # was silently ignored


def test_a_sampled_caption_depends_on_the_seed_and_the_image_index_only(loaded, image_files):
  """Image j's sample comes from fold_in(key(seed), j): the same whatever batch_size
  chunks the images and whatever images share its batch (each batch had one key, drawn
  over all its rows, so a caption changed with batch_size and with its neighbours)."""
  paths, _, _ = image_files
  pixels = loaded.read_images(paths)[0]
  config = loaded.config.copy_and_resolve_references()
  tokens = {}
  for batch_size in (1, 4):
    predictor = predict.Predictor(loaded.module, config, loaded.vocab, batch_size)
    options = predictor.decode_options(method="sample", temperature=3.0)
    tokens[batch_size] = predictor.caption_tokens(pixels, options, seed=5)[0]
  assert len(pixels) > 2 and len({t.tobytes() for t in tokens[4]}) > 1  # rows differ
  np.testing.assert_array_equal(tokens[4], tokens[1])
  # A set captioned over several calls (the benchmark recipes, one call per batch) with
  # first_row: as one call. Without it each call's rows took keys 0, 1, ... again.
  parts = [
    predictor.caption_tokens(pixels[i : i + 2], options, seed=5, first_row=i)[0]
    for i in range(0, len(pixels), 2)
  ]
  np.testing.assert_array_equal(np.concatenate(parts), tokens[4])


def test_buckets_pad_a_short_batch_to_a_power_of_two():
  seen = []

  def rows(x):
    seen.append(len(x))
    return x + 1

  for total, batch, multiple in [(1, 8, None), (1, 8, 1), (3, 8, 1), (5, 8, 1), (11, 8, 1)]:
    seen.clear()
    (out,) = predict.map_in_batches(rows, [np.arange(total)], batch, multiple)
    np.testing.assert_array_equal(out, np.arange(total) + 1)  # padding rows dropped
    expected = {(1, 8, None): [8], (1, 8, 1): [1], (3, 8, 1): [4], (5, 8, 1): [8]}
    assert seen == expected.get((total, batch, multiple), [8, 4])
  # Padding repeats the last row (so a padded caption ends with its original).
  batches = []
  predict.map_in_batches(
    lambda x, y: batches.append((x, y)) or x, [np.arange(3), -np.ones(3)], 8, 1
  )
  np.testing.assert_array_equal(batches[0][0], [0, 1, 2, 2])
  np.testing.assert_array_equal(batches[0][1], [-1, -1, -1, -1])
  # On a mesh, buckets stay whole multiples of its batch shards (2 here), up to B = 6.
  assert [predict.bucket(n, 6, 2) for n in (1, 2, 3, 5, 6)] == [2, 2, 4, 6, 6]


def test_one_image_costs_one_row_in_the_api(loaded, image_files, monkeypatch):
  """The API (batch_size 4) ran one image as a batch of 4; its embedding is the same."""
  paths, _, _ = image_files
  sizes = []
  call = loaded.predictor._call
  monkeypatch.setattr(
    loaded.predictor, "_call", lambda fn, *b: sizes.append(len(b[0])) or call(fn, *b)
  )
  one = loaded.embed_images(paths[:1])
  three = loaded.embed_images(paths)
  assert sizes == [1, 4]
  np.testing.assert_allclose(one[0], three[0], atol=1e-5)


def test_no_images_give_empty_results(loaded):
  assert loaded.caption([]) == []
  assert loaded.caption([], prefix="a cat", method="greedy") == []
  embeddings = loaded.embed_images([])
  assert embeddings.shape == (0, 16) and embeddings.dtype == np.float32
  result = loaded.classify([], ["cat", "dog", "red heart"])
  assert isinstance(result, inference.Classification) and result.labels == []
  assert result.probabilities.shape == (0, 3) and result.probabilities.dtype == np.float32
  assert loaded.embed_texts([]).shape == (0, 16)
  # No preprocessed images either (np.asarray([]) is [0], not [0, S, S, 3]; helper-89).
  assert loaded.caption([], preprocessed=True) == []
  assert loaded.embed_images(np.zeros((0,)), preprocessed=True).shape == (0, 16)
  assert loaded.classify([], ["cat", "dog"], preprocessed=True).labels == []
  doubled, sums = predict.map_in_batches(
    lambda x: (2 * x, x.sum(1)), [np.zeros((0, 3), np.int32)], 4
  )
  assert doubled.shape == (0, 3) and sums.shape == (0,) and doubled.dtype == np.int32


def test_bad_inputs_name_the_path(loaded, image_files, tmp_path):
  paths, broken, missing = image_files
  with pytest.raises(inference.ImageError, match="missing.png"):
    loaded.embed_images([paths[0], missing])
  pixels, failures = loaded.read_images([paths[0], broken, missing, paths[1]], errors="collect")
  assert len(pixels) == 2 and set(failures) == {1, 2}
  assert "broken.png" in failures[1] and "missing.png" in failures[2]
  with pytest.raises(FileNotFoundError, match="params"):
    inference.load(str(tmp_path))


def test_an_empty_pil_image_is_collected_as_a_shape_error(loaded, image_files):
  """It reached the resize and raised ZeroDivisionError through errors="collect"."""
  paths, _, _ = image_files
  pixels, failures = loaded.read_images([paths[0], Image.new("RGB", (0, 5))], errors="collect")
  assert len(pixels) == 1 and failures == {1: "image of shape (5, 0, 3)"}


class _Tensor:
  """Stands for a torch tensor: no numpy type, only `__array__`."""

  def __init__(self, array):
    self.array = array

  def __array__(self, dtype=None, copy=None):
    return np.asarray(self.array, dtype)


def test_a_batch_array_of_any_kind_is_n_images(loaded):
  """A JAX array (or torch tensor) [N, H, W, 3] was taken as one image and refused."""
  import jax.numpy as jnp

  batch = np.random.default_rng(2).integers(0, 256, (2, 12, 10, 3), dtype=np.uint8)
  by_list = loaded.read_images(list(batch))[0]
  assert by_list.shape == (2, loaded.image_size, loaded.image_size, 3)
  for given in (jnp.asarray(batch), _Tensor(batch), batch):
    np.testing.assert_array_equal(loaded.read_images(given)[0], by_list)
  one = loaded.read_images(jnp.asarray(batch[1]))[0]  # [H, W, 3]: one image
  np.testing.assert_array_equal(one, by_list[1:])


@pytest.mark.parametrize(
  "classes, templates, message",
  [
    ("cat,dog", None, r"class_names='cat,dog' is a string; pass a list"),
    (
      ["cat", "dog"],
      "a photo of a {}.",
      r"templates='a photo of a \{\}.' is a string; pass a list",
    ),
    (["cat", "dog"], ["a photo"], r"template 'a photo' has placeholders: none; .*exactly one \{\}"),
    (["cat"], ["a {name}"], r"template 'a \{name\}' has placeholders: \{name\}"),
    (["cat"], ["{} on {}"], r"template '\{\} on \{\}' has placeholders: \{\} \{\}"),
    (["cat"], ["a {", "a {}"], r"template 'a \{' is not a format string"),
    # A repeated class split its probability: dog=0.43, dog=0.43, heart=0.13.
    (["dog", "heart", "dog"], None, r"class names repeated: \['dog'\]"),
    # A blank name was a class whose prompts say nothing ("a photo of a .").
    (["", "dog", "  "], None, r"class names at positions \[0, 2\] are blank"),
  ],
)
def test_classify_refuses_strings_and_templates_without_one_placeholder(
  loaded, classes, templates, message
):
  """A string was iterated by character, a template without `{}` gave every class the
  same prompts (uniform probabilities), `{name}` a KeyError."""
  with pytest.raises(ValueError, match=message):
    loaded.classify(np.zeros((8, 8, 3), np.uint8), classes, templates)


def test_classify_cli_checks_its_templates(export_dir, image_files, run_main, monkeypatch):
  """--template goes through the API's check, before the model loads."""
  paths, _, _ = image_files
  monkeypatch.setattr(console, "quiet", lambda: None)  # its TensorFlow import: 4 s alone
  with pytest.raises(app.UsageError, match=r"--template: template 'a photo' has placeholders"):
    run_main(
      classify, f"--export={export_dir}", "--classes=cat,dog", "--template=a photo", paths[0]
    )
  inference.check_prompts(["cat"], ["a {{literal}} {}"])  # escaped braces are text


def test_caption_cli_checks_its_decode_options_before_reading_images(
  export_dir, run_main, monkeypatch
):
  """Beam and sampling options together were a traceback after every image was read."""
  monkeypatch.setattr(console, "quiet", lambda: None)
  read = []
  monkeypatch.setattr(inference.Model, "read_images", lambda self, *a, **k: read.append(a))
  for flags_given, message in [
    (["--beam=4", "--temperature=0.7"], "exclude each other"),
    (["--temperature=0"], "temperature"),
    (["--max_length=1000"], "max_length=1000"),
    (["--min_length=9"], "min_length=9 must be in 0..max_length=8"),
    (["--temperature=nan"], "temperature=nan must be a finite number"),  # empty captions
    (["--temperature=inf"], "temperature=inf must be a finite number"),  # uniform tokens
    (["--prefix=" + "a red heart " * 4], "leaves no room within max_length=8"),
  ]:
    with pytest.raises(app.UsageError, match=message):
      run_main(caption, f"--export={export_dir}", *flags_given, "image.png")
  assert read == []


def test_decode_options_must_be_integers_and_finite_numbers(loaded):
  """A float beam size failed deep inside JAX; a NaN length penalty or temperature passed
  every range check and decoded empty captions."""
  pixels = np.zeros((1, 16, 16, 3), np.float32)
  for options, message in [
    (dict(beam_size=2.0), "beam_size=2.0 must be an integer"),
    (dict(method="sample", top_k=2.0), "top_k=2.0 must be an integer"),
    (dict(max_length=3.0), "max_length=3.0 must be an integer"),
    (dict(min_length=2.0), "min_length=2.0 must be an integer"),
    (dict(max_length=3, min_length=4), r"min_length=4 must be in 0..max_length=3"),
    (dict(min_length=-1), r"min_length=-1 must be in 0..max_length"),
    (dict(beam_size=2, length_penalty=float("nan")), "length_penalty=nan must be a finite"),
    (dict(method="sample", temperature=float("nan")), "temperature=nan must be a finite"),
    (dict(method="sample", top_p=float("inf")), "top_p=inf must be a finite"),
  ]:
    with pytest.raises(ValueError, match=message):
      loaded.caption(pixels, preprocessed=True, **options)


def test_decoding_is_limited_to_the_tokenizers_ids(loaded):
  """A tokenizer with fewer ids than the model's vocabulary: decode options carry it."""

  class Fewer:
    def get_piece_size(self):
      return 50

  config = loaded.config
  assert predict.Predictor(loaded.module, config, Fewer(), 4).decode_options().num_tokens == 50
  pieces = loaded.vocab.get_piece_size()  # the tiny test tokenizer's 37 of 64 rows
  assert loaded.predictor.decode_options().num_tokens == pieces < config.model.text.vocab_size


def test_raw_pixels_as_preprocessed_and_a_clip_as_frames_are_errors(loaded):
  """uint8 pixels with preprocessed=True were captioned as 0..255 normalised values; a
  clip given as a list of frames [f1, f2] (one clip is [[f1, f2]]) had each frame's rows
  read as grey images and returned one embedding per frame."""
  raw = np.zeros((2, 16, 16, 3), np.uint8)
  with pytest.raises(ValueError, match="got uint8: pass raw images without preprocessed"):
    loaded.caption(raw, preprocessed=True)
  frames = [np.zeros((20, 24, 3), np.uint8)] * 2
  with pytest.raises(ValueError, match=r"each clip is a list of frames .* shape \(20, 24, 3\)"):
    loaded.embed_videos(frames)
  assert loaded.embed_videos([frames]).shape == (1, 16)
  assert loaded.embed_videos(frame for frame in [frames]).shape == (1, 16)  # a generator


def test_a_prefix_that_would_be_forced_wrong_is_an_error(loaded):
  """The loop forces each row's FIRST prefix_length tokens, the length inferred as the
  count of non-pad tokens: a left-padded row had its pads forced and its words dropped,
  silently; a length past the row forced pads; a prefix of the wrong row count failed
  deep in JAX ("Incompatible shapes for broadcasting")."""
  pixels = np.zeros((2, 16, 16, 3), np.float32)
  options = loaded.predictor.decode_options(method="greedy")
  pad = options.contract.pad_id
  word = 5 if pad != 5 else 6
  for prefix, lengths, message in [
    ([[pad, word], [word, pad]], None, r"prefix row 0 \[0, 5\] has a token after a pad"),
    ([[word, pad, word], [word, pad, pad]], None, "row 0 .* has a token after a pad"),
    ([[word, word], [word, pad]], [3, 1], r"prefix_length \[3, 1\]: each must be in \[0, 2\]"),
    ([[word, word], [word, pad]], [-1, 1], "prefix_length"),
    ([[word, word]], None, r"prefix of shape \(1, 2\): expected \[2, P\]"),
    ([word, word], None, r"prefix of shape \(2,\): expected \[2, P\]"),
    # Ids outside the vocabulary (64): NaN scores, or beam rows all -1e9 (helper-89).
    ([[word, 64], [word, pad]], None, r"row 0 \[5, 64\] forces a token id outside .*\[0, 64\)"),
    ([[word, word], [-3, pad]], None, r"row 1 \[-3, 0\] forces a token id outside"),
  ]:
    with pytest.raises(ValueError, match=message):
      loaded.predictor.caption_tokens(pixels, options, prefix=prefix, prefix_lengths=lengths)
  tokens_out, _ = loaded.predictor.caption_tokens(pixels, options, prefix=[[word], [word]])
  assert (tokens_out[:, 0] == word).all()  # a right-padded prefix is forced as given
  # With the lengths given, pad may be a real token of the prefix.
  tokens_out, _ = loaded.predictor.caption_tokens(
    pixels, options, prefix=[[pad, word], [word, pad]], prefix_lengths=[2, 2]
  )
  np.testing.assert_array_equal(tokens_out[:, :2], [[pad, word], [word, pad]])


def test_the_clis_name_an_export_they_cannot_load(tmp_path, run_main):
  """A wrong --export was an 8-frame traceback."""
  missing = tmp_path / "nowhere"
  for module, flags_given in [(caption, []), (classify, ["--classes=cat,dog"])]:
    status, _, _ = run_main(module, f"--export={missing}", *flags_given, "image.png")
    assert status == f"error: --export: {missing} is not a coca_jax export: " + (
      f"{missing}/params is missing"
    )


def test_the_clis_refuse_a_batch_size_below_one():
  """--batch_size=0 was reported as a problem of --export."""
  for module in (caption, classify):
    flag_values = flags.FlagValues()
    module.define_flags(flag_values)
    with pytest.raises(flags.IllegalFlagValueError, match="0 is not a positive integer"):
      flag_values([module.__name__, "--export=x", "--batch_size=0", "image.png"])


@pytest.mark.slow  # ~7 s; the API tests above stay quick
def test_caption_and_classify_cli(export_dir, loaded, image_files, run_main):
  paths, broken, missing = image_files
  status, out, err = run_main(
    caption, f"--export={export_dir}", "--beam=2", paths[0], missing, broken, paths[1]
  )
  assert status == 1, err
  lines = out.splitlines()  # a random model's caption may be empty: "path\t"
  assert [line.split("\t")[0] for line in lines] == [paths[0], paths[1]]
  # The CLIs read the images once and pass the pixels on as preprocessed.
  api = loaded.caption([paths[0], paths[1]], beam_size=2)
  assert [line.split("\t", 1)[1] for line in lines] == api
  assert f"{missing}\tERROR" in err and f"{broken}\tERROR" in err
  status, out, err = run_main(classify, f"--export={export_dir}", "--classes=cat,dog", paths[0])
  assert status == 0, err
  path, label, probability, _ = out.strip().split("\t")
  assert path == paths[0] and label in ("cat", "dog") and 0.5 <= float(probability) <= 1.0
  api = loaded.classify([paths[0]], ["cat", "dog"])
  assert (label, probability) == (api.labels[0], f"{api.probabilities.max():.4f}")


def test_evaluate_cli_prints_a_final_json_line(export_dir, tmp_path, run_main, repo):
  status, out, err = run_main(
    evaluate_main,
    f"--export={export_dir}",
    f"--config={repo / 'configs' / 'tiny.py'}",
    "--config.eval.evals=zero_shot,retrieval,captioning",
    "--config.eval.num_examples=16",
    "--config.eval.batch_size=8",
    f"--workdir={tmp_path}",
  )
  assert status == 0, err[-3000:]
  metrics = json.loads(out.strip().splitlines()[-1])
  assert (
    "zero_shot/top1" in metrics
    and "captioning/cider" in metrics
    and "retrieval/text_to_image_r1" in metrics
  )
  assert "chance" in out
  assert (tmp_path / "eval" / "captions_0.html").exists()


@pytest.mark.parametrize(
  "override, message",
  [
    ("--config.eval.retrieval.recall_at=(0,)", r"config\.eval\.retrieval\.recall_at"),
    ("--config.eval.zero_shot.top_k=(0,)", r"config\.eval\.zero_shot\.top_k"),
    ("--config.eval.evals=vqa", "the model has no VQA"),
  ],
)
def test_evaluate_cli_checks_the_eval_config_as_training_does(
  export_dir, run_main, repo, override, message
):
  """It printed recall at 0 and top-0 accuracy as 0.0, and answered a model without a
  VQA head with an error about an empty answer vocabulary (helper-92)."""
  status, out, err = run_main(
    evaluate_main, f"--export={export_dir}", f"--config={repo / 'configs' / 'tiny.py'}", override
  )
  assert re.match(rf"error: --config: .*{message}", str(status)), (status, err[-2000:])
  assert not out.strip()


def test_evaluate_cli_refuses_overrides_outside_eval(export_dir, run_main, repo):
  """They were ignored: the model and data sources are the export's."""
  with pytest.raises(app.UsageError, match=r"--config.data.image.resize, --config.model.width: "):
    run_main(
      evaluate_main,
      f"--export={export_dir}",
      f"--config={repo / 'configs' / 'tiny.py'}",
      "--config.eval.evals=",
      "--config.model.width=7",
      "--config.data.image.resize=nonsense",
    )


def test_texts_cut_to_the_model_text_length_are_named_in_one_warning(loaded, image_files):
  """tokens.tokenize cut them silently: a served prompt cut short is another prompt."""
  import warnings

  room = 7  # tiny: config.model.text.max_len=8, minus the decoder's BOS
  long_text = "a red heart " * 6
  n_long = len(loaded.vocab.encode(long_text))
  assert n_long > room and len(loaded.vocab.encode("a cat")) <= room
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # short texts: no warning
    loaded.embed_texts(["a cat", "a dog"])
  with pytest.warns(UserWarning) as caught:
    loaded.embed_texts(["a cat", long_text, long_text + "cat"])
  assert len(caught) == 1 and caught[0].filename == __file__
  assert str(caught[0].message) == (
    "2 of 3 texts are longer than the model's 7 text tokens (config.model.text.max_len=8) "
    f"and were cut to 7; the first, 'a red heart a red heart a red heart a...', has "
    f"{n_long} tokens"
  )
  paths, _, _ = image_files
  with pytest.warns(UserWarning) as caught:  # 2 classes x 2 templates: one warning
    loaded.classify(paths[:1], ["cat", "dog"], ["a {}", "a {} " + "a red heart " * 4])
  assert len(caught) == 1 and caught[0].filename == __file__
  assert str(caught[0].message).startswith("2 of 4 texts are longer than the model's 7 ")
  with pytest.warns(UserWarning) as caught:
    loaded.class_embeddings(["cat", "dog"], ["a {}", "a {} " + "a red heart " * 4])
  assert len(caught) == 1 and caught[0].filename == __file__


def test_class_embeddings_computed_once_classify_as_before(loaded, image_files):
  paths, _, _ = image_files
  templates = ["a {0}", "{}"]  # {0} is what str.format fills too
  once = loaded.class_embeddings(["cat", "dog", "bird"], templates)
  assert once.shape == (3, loaded.config.model.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(once, axis=1), 1, rtol=1e-5)
  plain = loaded.classify(paths, ["cat", "dog", "bird"], templates)
  reused = loaded.classify(paths, ["cat", "dog", "bird"], templates, class_embeddings=once)
  assert reused.labels == plain.labels
  np.testing.assert_allclose(reused.probabilities, plain.probabilities, rtol=1e-6)
  with pytest.raises(ValueError, match=r"class_embeddings of shape \(3, .*2 class names need"):
    loaded.classify(paths, ["cat", "dog"], templates, class_embeddings=once)


@pytest.mark.slow  # two CLI runs, ~10 s
def test_the_clis_work_through_the_paths_a_batch_at_a_time(
  export_dir, loaded, image_files, run_main, monkeypatch
):
  """They read every image before the first batch ran: memory grew with the number of
  paths (0.6 MB per 224-pixel image) and nothing was printed until all were done. Now a
  batch of paths at a time; sampled captions stay those of one call over all images."""
  paths, broken, missing = image_files
  given = [paths[0], broken, paths[1], paths[2], missing, paths[0]]
  reads = []
  read_images = inference.Model.read_images

  def counting(self, images, errors="raise"):
    reads.append(len(images))
    return read_images(self, images, errors)

  monkeypatch.setattr(inference.Model, "read_images", counting)
  sampled = ["--method=sample", "--temperature=3", "--seed=4"]
  status, out, err = run_main(caption, f"--export={export_dir}", "--batch_size=2", *sampled, *given)
  assert status == 1 and reads == [2, 2, 2], (reads, err)
  lines = [line.split("\t") for line in out.strip().splitlines()]
  assert [line[0] for line in lines] == [paths[0], paths[1], paths[2], paths[0]]
  api = read_images(loaded, [paths[0], paths[1], paths[2], paths[0]])[0]
  want = loaded.caption(api, "sample", temperature=3, seed=4, preprocessed=True)
  assert [line[1].strip() for line in lines] == [c.strip() for c in want]
  assert len(set(want)) > 1
  assert err.count("ERROR") == 2
  reads.clear()
  status, out, err = run_main(
    classify, f"--export={export_dir}", "--batch_size=4", "--classes=cat,dog", *given
  )
  assert status == 1 and reads == [4, 2]
  api = loaded.classify([paths[0], paths[1], paths[2], paths[0]], ["cat", "dog"])
  got = [line.split("\t")[1:3] for line in out.strip().splitlines()]
  assert got == [[label, f"{p.max():.4f}"] for label, p in zip(api.labels, api.probabilities)]


def test_caption_max_length_beyond_the_model_is_an_error(loaded):
  """It was clamped to config.model.text.max_len (8 in tiny) silently."""
  with pytest.raises(
    ValueError, match=r"^caption max_length=9 is outside .* 1 to 8 \(config.model.text.max_len\)"
  ):
    loaded.caption(np.zeros((8, 8, 3), np.uint8), max_length=9)
  with pytest.raises(ValueError, match=r"^caption max_length=-1 is outside"):
    loaded.caption(np.zeros((8, 8, 3), np.uint8), max_length=-1)
  assert loaded.predictor.decode_options(max_length=8).max_length == 8  # the most allowed


def test_an_export_whose_params_do_not_fit_its_config_names_them(loaded, tmp_path):
  """It failed in jax.tree.map with a bare structure error."""
  params = nnx.to_pure_dict(nnx.state(loaded.module, nnx.Param))
  del params["text_projection"]["kernel"]  # [32, 16]
  params["text"]["pos_embedding"] = np.zeros((9, 32), np.float32)  # was [8, 32]
  params["extra"] = {"w": np.zeros(3, np.float32)}
  out = tmp_path / "mixed"
  export.write(params, loaded.config, str(out), "float32", None)
  expected = (
    f"export {out}: its params do not match the model its config.json builds (3 parameters "
    "differ: extra/w: expected none, found (3,); text/pos_embedding: expected (8, 32), "
    "found (9, 32); text_projection/kernel: expected (32, 16), found none). Its config.json "
    "and params/ likely come from different runs, or from a different coca_jax version"
  )
  with pytest.raises(ValueError) as error:
    inference.load(str(out))
  assert str(error.value).startswith(expected)
