"""coca_jax.data.images.read / decode: array dtypes and PIL modes to 8-bit RGB."""

import io

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


def test_float_arrays_are_0_to_1_clipped():
  values = np.asarray([[-0.5, 0.0, 0.2], [0.5, 1.0, 2.0]])
  # 0.2 * 255 = 51; 0.5 * 255 = 127.5 rounds to even 128.
  expected = _grey([[0, 0, 51], [128, 255, 255]])
  np.testing.assert_array_equal(images.read(values), expected)
  np.testing.assert_array_equal(images.read(values.astype(np.float32)), expected)


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
  as_255 = Image.fromarray(values.astype(np.float32))
  assert as_unit.mode == as_255.mode == "F"
  np.testing.assert_array_equal(images.read(as_unit), expected)
  np.testing.assert_array_equal(images.read(as_255), expected)
  with pytest.raises(images.ImageError, match=r"\[0, 70000\]"):
    images.read(Image.fromarray(np.asarray([[0, 70000]], np.int32)))
