"""coca_jax.data.images.read / decode: array dtypes and PIL modes to 8-bit RGB."""

import io
import re

import numpy as np
import pytest
from PIL import Image

from coca_jax.data import images


def _png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def _grey(values) -> np.ndarray:
  """[h, w] grey values -> the [h, w, 3] uint8 RGB `read` should return."""
  return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=-1)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.uint32])
def test_integer_arrays_within_0_to_255_are_8_bit(dtype):
  values = np.asarray([[0, 1, 100], [128, 254, 255]])
  np.testing.assert_array_equal(images.read(values.astype(dtype)), _grey(values))


def test_a_random_int64_image_reads_as_its_uint8_twin():
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3))  # int64, as numpy makes it
  assert rgb.dtype == np.int64
  np.testing.assert_array_equal(images.read(rgb), rgb.astype(np.uint8))


def test_uint16_arrays_are_16_bit():
  # x / 257 rounded: 65535 -> 255, 32896 = 128 * 257 -> 128, 385 -> 1.498 -> 1.
  values = np.asarray([[0, 257, 385], [32896, 65278, 65535]], np.uint16)
  np.testing.assert_array_equal(images.read(values), _grey([[0, 1, 1], [128, 254, 255]]))


@pytest.mark.parametrize(
  "values, dtype, named",
  [([[0, -1]], np.int64, r"int64 .*\[-1, 0\]"), ([[0, 300]], np.int32, r"int32 .*\[0, 300\]")],
)
def test_integer_arrays_outside_0_to_255_raise_naming_dtype_and_range(values, dtype, named):
  with pytest.raises(images.ImageError, match=named):
    images.read(np.asarray(values, dtype))


def test_float_arrays_are_0_to_1_negatives_clipped():
  values = np.asarray([[-0.5, 0.0, 0.2], [0.5, 0.998, 1.0]])
  # 0.2 * 255 = 51; 0.5 * 255 = 127.5 rounds to even 128; 0.998 * 255 = 254.49 -> 254.
  expected = _grey([[0, 0, 51], [128, 254, 255]])
  np.testing.assert_array_equal(images.read(values), expected)
  np.testing.assert_array_equal(images.read(values.astype(np.float32)), expected)


@pytest.mark.parametrize("as_pil", [False, True], ids=["array", "pil_F"])
def test_float_pixels_above_1_raise_naming_the_fix(as_pil):
  """A photo cast to float32 without / 255 became near white (clipped to 0..1), and a PIL
  "F" image of the same values was guessed to be 0..255: both are errors now."""
  photo = np.asarray([[0.0, 51.0, 128.0], [200.0, 254.0, 255.0]], np.float32)
  item = Image.fromarray(photo) if as_pil else photo
  with pytest.raises(images.ImageError, match=r"maximum 255; .*\[0, 1\]: divide .* by 255"):
    images.read(item)
  # The fix the message names gives the photo's own 8-bit pixels (0.2 * 255 = 51).
  fixed = Image.fromarray(photo / 255) if as_pil else photo / 255
  np.testing.assert_array_equal(images.read(fixed), _grey(photo.astype(np.uint8)))


def test_a_float_overshoot_up_to_1_5_clips_and_above_it_raises():
  """A resampling filter's overshoot (1.02) is clipped to white; 1.6 is taken for 0..255."""
  np.testing.assert_array_equal(
    images.read(np.asarray([[0.0, 1.02]], np.float32)), _grey(np.asarray([[0, 255]], np.uint8))
  )
  with pytest.raises(images.ImageError, match="maximum 1.6"):
    images.read(np.asarray([[0.0, 1.6]], np.float32))


@pytest.mark.parametrize("as_pil", [False, True], ids=["array", "pil_F"])
def test_float_pixels_far_below_0_raise_as_normalised_pixels(as_pil):
  """Pixels normalised with a mean and std, passed as an image, were clipped at 0: a dark
  picture (here -2.1..0.06) turned black without a word. -0.5 is an overshoot, clipped."""
  normalised = np.asarray([[-2.11, -1.0], [0.0, 0.06]], np.float32)
  with pytest.raises(images.ImageError, match=r"minimum -2.11; .* preprocessed=True"):
    images.read(Image.fromarray(normalised) if as_pil else normalised)
  with pytest.raises(images.ImageError, match="minimum -0.51"):
    images.read(np.asarray([[-0.51, 1.0]], np.float32))


def _png_with_transparent_colour(pixels: np.ndarray, colour) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG", transparency=colour)
  return buffer.getvalue()


def test_a_transparent_colour_of_a_grey_or_rgb_png_is_white_like_an_alpha_channel():
  """Only palette images had their tRNS colour composited: the same black-on-transparent
  icon came out black saved as RGB or grey, white saved as RGBA or palette."""
  rgb = np.zeros((2, 3, 3), np.uint8)
  rgb[0, 0] = (200, 10, 10)  # one opaque red pixel, the rest transparent black
  want = np.full((2, 3, 3), 255, np.uint8)
  want[0, 0] = (200, 10, 10)
  assert Image.open(io.BytesIO(_png_with_transparent_colour(rgb, (0, 0, 0)))).mode == "RGB"
  np.testing.assert_array_equal(images.decode(_png_with_transparent_colour(rgb, (0, 0, 0))), want)
  rgba = np.concatenate([rgb, np.zeros((2, 3, 1), np.uint8)], axis=-1)
  rgba[0, 0, 3] = 255
  np.testing.assert_array_equal(images.decode(_png(rgba)), want)
  grey = np.asarray([[90, 0, 0], [0, 0, 0]], np.uint8)
  got = images.decode(_png_with_transparent_colour(grey, 0))
  np.testing.assert_array_equal(got[..., 0], [[90, 255, 255], [255, 255, 255]])


def _pgm(maxval: int, values) -> bytes:
  values = np.asarray(values)
  data = values.astype(">u2" if maxval > 255 else "u1").tobytes()
  return b"P5\n%d %d\n%d\n" % (values.shape[1], values.shape[0], maxval) + data


def test_a_dark_16_bit_pgm_is_not_taken_for_8_bit():
  """PIL opens a PGM of more than 8 bits as "I" (values scaled to 0..65535); one whose
  values all lay in 0..255 was read as 8-bit, 257x too bright: 200 of 65535 became 200."""
  assert Image.open(io.BytesIO(_pgm(65535, [[0, 200]]))).mode == "I"
  np.testing.assert_array_equal(images.decode(_pgm(65535, [[0, 200]])), _grey([[0, 1]]))
  np.testing.assert_array_equal(images.decode(_pgm(65535, [[0, 65535]])), _grey([[0, 255]]))
  # 10-bit: PIL scales 1023 to 65535.
  np.testing.assert_array_equal(images.decode(_pgm(1023, [[0, 1023]])), _grey([[0, 255]]))
  np.testing.assert_array_equal(images.decode(_pgm(255, [[0, 200]])), _grey([[0, 200]]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("as_pil", [False, True], ids=["array", "pil_F"])
def test_nan_or_infinite_float_pixels_raise(bad, as_pil):
  pixels = np.asarray([[0.0, 0.5], [bad, 1.0]], np.float32)
  with pytest.raises(images.ImageError, match="NaN or infinite pixels"):
    images.read(Image.fromarray(pixels) if as_pil else pixels)


def test_a_16_bit_png_decodes_like_its_8_bit_version():
  ramp = np.linspace(0.0, 1.0, 48 * 64).reshape(48, 64)
  bits8 = np.round(ramp * 255).astype(np.uint8)
  bits16 = np.round(ramp * 65535).astype(np.uint16)
  encoded = _png(bits16)
  assert Image.open(io.BytesIO(encoded)).mode == "I;16"
  got, reference = images.decode(encoded), images.decode(_png(bits8))
  assert abs(got.mean() - reference.mean()) < 1
  assert np.abs(got.astype(int) - reference).max() <= 1
  np.testing.assert_array_equal(reference, _grey(bits8))


def test_pil_32_bit_integer_and_float_grey_images_scale_to_8_bits():
  values = np.asarray([[0, 51, 128], [200, 254, 255]])
  expected = _grey(values)
  as_16_bit = Image.fromarray((values * 257).astype(np.int32))
  assert as_16_bit.mode == "I"
  np.testing.assert_array_equal(images.read(as_16_bit), expected)
  as_unit = Image.fromarray((values / 255).astype(np.float32))
  assert as_unit.mode == "F"
  np.testing.assert_array_equal(images.read(as_unit), expected)
  with pytest.raises(images.ImageError, match=r"\[0, 70000\]"):
    images.read(Image.fromarray(np.asarray([[0, 70000]], np.int32)))


def test_a_pil_32_bit_integer_image_of_8_bit_values_reads_as_its_int32_array():
  """Mode "I" with values 0..255 was always scaled as 16-bit (255 -> 1: black), where
  the same int32 array reads as 8-bit."""
  values = np.asarray([[0, 1, 100], [128, 254, 255]], np.int32)
  image = Image.fromarray(values)
  assert image.mode == "I"
  np.testing.assert_array_equal(images.read(image), _grey(values))
  np.testing.assert_array_equal(images.read(values), _grey(values))


@pytest.mark.parametrize(
  "item, shape",
  [
    (Image.new("RGB", (0, 5)), (5, 0, 3)),
    (Image.new("L", (4, 0)), (0, 4)),
    (np.zeros((0, 4, 3), np.uint8), (0, 4, 3)),
    (np.zeros((3, 0), np.float32), (3, 0)),
  ],
  ids=["pil_rgb", "pil_grey", "array_rgb", "array_grey"],
)
def test_empty_images_raise_a_shape_error(item, shape):
  """A zero-size PIL image reached the resize (ZeroDivisionError, not an ImageError)."""
  with pytest.raises(images.ImageShapeError, match=rf"image of shape {re.escape(str(shape))}"):
    images.read(item)


def test_encoded_bytes_read_like_the_file_and_other_objects_are_named():
  """A PNG file's bytes (from a web request, say) read as the pixels they encode; None or
  a number was "array of shape () is not an image"."""
  pixels = np.random.default_rng(7).integers(0, 256, (3, 5, 3)).astype(np.uint8)
  for encoded in (_png(pixels), bytearray(_png(pixels)), memoryview(_png(pixels))):
    np.testing.assert_array_equal(images.read(encoded), pixels)
  for item, name in [(None, "NoneType"), (5, "int"), ({"image": 1}, "dict")]:
    with pytest.raises(images.ImageError, match=f"^{name} is not an image: pass a path"):
      images.read(item)
  with pytest.raises(images.ImageError) as error:
    images.read(b"not an image")
  assert "BytesIO" not in str(error.value) and "cannot identify image file" in str(error.value)
