"""fingerprint.of against a NumPy computation of the same sums, on meshes of real pods'
device orders, and what it tells apart."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coca_jax import fingerprint


def reference(x: np.ndarray) -> int:
  """Sum over elements of bits(x) * (2 * 0x9E3779B1 * flat_index + 1), modulo 2**32."""
  if x.dtype == np.bool_:
    bits = x.astype(np.uint64)
  else:
    bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64)
  index = np.arange(x.size, dtype=np.uint64)
  weights = (index * ((2 * 0x9E3779B1) % 2**32) + 1) % 2**32
  return int((bits.ravel() * weights % 2**32).sum() % 2**32)


def tree():
  rng = np.random.default_rng(0)
  return {
    "kernel": rng.standard_normal((8, 6, 4)).astype(np.float32),
    "scale": rng.standard_normal((8,)).astype(jnp.bfloat16),
    "step": np.int32(7),
    "mask": rng.random((4, 8)) < 0.5,
  }


def test_each_array_sums_its_bits_as_numpy_does():
  values = tree()
  got = fingerprint.of({k: jnp.asarray(v) for k, v in values.items()})
  want = {k: f"{np.dtype(v.dtype).name}:{reference(np.asarray(v)):08x}" for k, v in values.items()}
  assert got == want


def test_the_value_does_not_depend_on_the_mesh_or_the_device_order():
  """Sharded 2-D over a mesh built from a permuted device list (as a pod's ICI order is),
  the sums equal those of the unsharded arrays."""
  values = tree()
  unsharded = fingerprint.of({k: jnp.asarray(v) for k, v in values.items()})
  devices = np.random.default_rng(1).permutation(np.array(jax.devices()))
  mesh = jax.sharding.Mesh(devices.reshape(4, 2), ("data", "model"))
  spec = jax.sharding.PartitionSpec
  specs = {"kernel": spec("data", "model"), "scale": spec("data"), "step": spec()}
  specs["mask"] = spec("model", "data")
  sharded = {
    k: jax.device_put(v, jax.sharding.NamedSharding(mesh, specs[k])) for k, v in values.items()
  }
  assert fingerprint.of(sharded) == unsharded


@pytest.mark.parametrize(
  "change",
  ["sign bit", "lowest bit", "two values swapped", "the whole array"],
)
def test_a_changed_value_is_found_and_named(change):
  values = {k: jnp.asarray(v) for k, v in tree().items()}
  recorded = fingerprint.of(values)
  kernel = np.asarray(values["kernel"]).copy()
  bits = kernel.view(np.uint32)
  if change == "sign bit":
    bits[3, 2, 1] ^= np.uint32(1 << 31)
  elif change == "lowest bit":
    bits[0, 0, 0] ^= np.uint32(1)
  elif change == "two values swapped":
    kernel[1, 2, 3], kernel[5, 4, 0] = kernel[5, 4, 0], kernel[1, 2, 3]
  else:
    kernel = kernel[::-1].copy()
  assert fingerprint.differing(recorded, dict(values, kernel=jnp.asarray(kernel))) == ["kernel"]
  assert fingerprint.differing(recorded, values) == []


def test_entries_recorded_otherwise_or_not_at_all_are_not_compared():
  """A restore that cast an entry (another dtype) or one saved before fingerprints."""
  values = {k: jnp.asarray(v) for k, v in tree().items()}
  recorded = fingerprint.of(values)
  del recorded["step"]
  cast = dict(values, kernel=values["kernel"].astype(jnp.bfloat16), step=jnp.int32(8))
  assert fingerprint.differing(recorded, cast) == []
