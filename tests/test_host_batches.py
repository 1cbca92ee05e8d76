"""Host data shards for any device order: every process of real TPU slice topologies
(compile-only devices from libtpu, which know their process), and host batches laid out on
a permuted mesh of the 8 forced host devices.

On TPU slices `jax.make_mesh` orders devices by the ICI topology, so a host's batch rows
are not contiguous; the expectations here come from the mesh's device array itself (the
batch is split over ("data", "fsdp") in row-major order), not from the code under test.
"""

import dataclasses
import functools
import importlib

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh

from coca_jax import aot, sharding
from coca_jax import state as state_lib
from coca_jax.config import SHARDING_RULES

needs_libtpu = pytest.mark.skipif(
  aot.xla_bridge.get_tpu_library_path() is None, reason="libtpu is not installed"
)


def mesh_config(data, fsdp, tensor):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


@functools.cache
def topology(name):
  return aot.topology_devices(name)


def reference_rows(mesh, global_batch):
  """{process: sorted global rows} straight from the mesh's device array positions."""
  data, fsdp, _ = mesh.devices.shape
  per_block = global_batch // (data * fsdp)
  rows = {}
  for (i, j, _), device in np.ndenumerate(mesh.devices):
    block = i * fsdp + j
    rows.setdefault(device.process_index, set()).update(
      range(block * per_block, (block + 1) * per_block)
    )
  return {p: np.array(sorted(r)) for p, r in rows.items()}


def check_every_process(mesh, global_batch):
  """Checks all processes' shards against `reference_rows`; returns the shard indices."""
  want = reference_rows(mesh, global_batch)
  assert sorted(want) == sorted({d.process_index for d in mesh.devices.flat})
  # Distinct row sets ranked by first row: the expected shard indices.
  distinct = sorted({tuple(r) for r in want.values()}, key=lambda r: r[0])
  indices = {}
  for p, rows in want.items():
    got = sharding.host_shard(mesh, SHARDING_RULES, global_batch, process_index=p).rows
    np.testing.assert_array_equal(got, rows, err_msg=f"process {p}")
    shard = sharding.host_shard(mesh, SHARDING_RULES, global_batch, process_index=p)
    index, count = shard.index, shard.count
    assert (index, count) == (distinct.index(tuple(rows)), len(distinct)), f"process {p}"
    assert count * len(rows) == global_batch
    indices[p] = index
    # Each device receives the host rows holding its own global rows.
    layout = shard.device_rows
    mine = [d for d in mesh.devices.flat if d.process_index == p]
    assert set(layout) == set(mine)
    data, fsdp, _ = mesh.devices.shape
    per_block = global_batch // (data * fsdp)
    for (i, j, _), device in np.ndenumerate(mesh.devices):
      if device.process_index == p:
        block = i * fsdp + j
        np.testing.assert_array_equal(
          got[layout[device]], np.arange(block * per_block, (block + 1) * per_block)
        )
  # Shards are disjoint and cover the global batch.
  np.testing.assert_array_equal(np.sort(np.concatenate(distinct)), np.arange(global_batch))
  # The whole check, as the compile report runs it.
  assert aot.check_host_batches(mesh, SHARDING_RULES, global_batch) == (
    global_batch // len(distinct),
    None,
  )
  return indices, want


@needs_libtpu
@pytest.mark.parametrize(
  "name, shape",
  [
    ("v4:4x4x4", (1, -1, 1)),
    ("v4:4x4x4", (4, -1, 1)),
    ("v4:8x8x16", (1, -1, 1)),
    ("v4:8x8x16", (8, -1, 1)),
    ("v5e:16x16", (1, -1, 1)),
    ("v5e:16x16", (4, -1, 1)),
    ("v5p:4x4x4", (1, -1, 1)),
    ("v5p:4x4x4", (4, -1, 1)),
  ],
)
def test_every_process_of_a_slice_feeds_its_own_rows(name, shape):
  devices = topology(name)
  mesh = sharding.make_mesh(mesh_config(*shape), devices)
  global_batch = 2 * len(devices)
  indices, rows = check_every_process(mesh, global_batch)
  assert sorted(indices.values()) == list(range(len(rows)))  # one process per shard
  # The case that used to fail: hosts' rows are not contiguous in the batch.
  assert any(np.any(np.diff(r) != 1) for r in rows.values())


@needs_libtpu
@pytest.mark.parametrize(
  "config_name, name, want",
  [
    # The paper's pod (Section 4.1: 2,048 v4 chips), width 1408 = 2^7 x 11.
    ("coca", "v4:8x16x16", {"data": 16, "fsdp": 128, "tensor": 1}),
    ("base", "v5e:16x16", {"data": 1, "fsdp": 256, "tensor": 1}),  # width 768 = 2^8 x 3
    # Large (width 1024) divides over 1,024 devices, but 1,024 is no product of the
    # physical axes 8, 16, 16: the largest that is (256) is taken.
    ("large", "v4:8x16x16", {"data": 8, "fsdp": 256, "tensor": 1}),
  ],
)
def test_paper_configs_get_an_automatic_mesh_their_pods_can_run(config_name, name, want):
  # The default config.mesh, resolved by the trainer's own setup on the slice's devices
  # (nothing is compiled); its host batches must split over every process too.
  config = importlib.import_module(f"configs.{config_name}").get_config()
  run = state_lib.setup(config, topology(name))
  assert dict(run.mesh.shape) == want, run.mesh_reason
  assert f"fsdp={want['fsdp']}" in run.mesh_reason
  check_every_process(run.mesh, config.data.global_batch_size)


@needs_libtpu
@pytest.mark.parametrize("name, shape", [("v4:4x4x4", (1, -1, 4)), ("v5e:16x16", (1, -1, 4))])
def test_tensor_parallel_groups_across_hosts_share_a_shard(name, shape):
  devices = topology(name)
  mesh = sharding.make_mesh(mesh_config(*shape), devices)
  indices, rows = check_every_process(mesh, 4 * len(devices))
  processes = len(rows)
  assert len(set(indices.values())) < processes  # some hosts hold the same rows
  for p in rows:
    for q in rows:
      assert (indices[p] == indices[q]) == np.array_equal(rows[p], rows[q])


@needs_libtpu
def test_the_aot_report_says_when_hosts_read_the_same_rows():
  """v4-32 (4 hosts) with a data axis inside each host and tensor=8 across them: one data
  shard, which all 4 hosts read (4x the input work); the report's host-batches line said
  only 'ok' (helper-93). The count comes from the processes' row sets."""
  devices = topology("v4:2x2x4")
  mesh = sharding.make_mesh(mesh_config(2, 1, 8), devices)
  _, rows = check_every_process(mesh, 64)
  distinct = len({tuple(r) for r in rows.values()})
  assert (len(rows), distinct) == (4, 1)
  note = aot.shared_shards(len(rows), distinct)
  assert note.startswith(" (1 distinct shard(s): 4 hosts read each, the same rows")
  assert aot.shared_shards(4, 4) == ""


@needs_libtpu
def test_rows_that_cannot_be_split_name_the_process():
  # v5e:4x4: 4 processes of 4 chips. Lay the mesh out by hand (data=1, fsdp=8, tensor=2):
  # each batch block is held by the two devices of its tensor pair.
  devices = topology("v5e:4x4")
  by_process = {}
  for d in devices:
    by_process.setdefault(d.process_index, []).append(d)

  def mesh_of(block_owners):
    taken = {p: iter(ds) for p, ds in by_process.items()}
    pairs = [[next(taken[p]) for p in owners] for owners in block_owners]
    return Mesh(np.array(pairs).reshape(1, 8, 2), sharding.MESH_AXES)

  # Process 1 holds blocks 0-1 only (8 rows of 16 over 8 blocks: 4 rows), process 0 four.
  unequal = mesh_of([(1, 1), (1, 1), (0, 2), (0, 2), (0, 3), (0, 3), (2, 3), (2, 3)])
  with pytest.raises(ValueError, match=r"process 0 holds 8 batch rows \(4-11\) but process 1"):
    sharding.host_shard(unequal, SHARDING_RULES, 16, process_index=2)
  # Processes 0 and 1 share blocks 0-1, but not 2-5.
  overlapping = mesh_of([(0, 1), (0, 1), (0, 2), (0, 2), (1, 3), (1, 3), (2, 3), (2, 3)])
  with pytest.raises(ValueError, match=r"process 1's batch rows \(0-3, 8-11\) partially overlap"):
    sharding.data_shards(overlapping, SHARDING_RULES, 16)
  local, error = aot.check_host_batches(overlapping, SHARDING_RULES, 16)
  assert local is None and "process 1's batch rows (0-3, 8-11)" in error


PERMUTATION = [5, 2, 7, 0, 3, 6, 1, 4]


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (4, 1, 2)])
def test_global_batch_on_a_permuted_mesh_puts_rows_where_host_shard_says(shape):
  devices = [jax.devices()[i] for i in PERMUTATION]
  mesh = sharding.make_mesh(mesh_config(*shape), devices)
  assert [d.id for d in mesh.devices.flat] == [d.id for d in devices]  # not re-sorted
  global_size = 16
  shard = sharding.host_shard(mesh, SHARDING_RULES, global_size)
  index, count = shard.index, shard.count
  assert (index, count) == (0, 1)  # one process feeds everything
  rows = sharding.host_shard(mesh, SHARDING_RULES, global_size).rows
  rng = np.random.default_rng(0)
  host = dict(
    image=rng.normal(size=(global_size, 4, 4, 3)).astype(np.float32),
    text=dict(ids=rng.integers(0, 100, (global_size, 5)).astype(np.int32)),
  )
  batch = sharding.global_batch(host, mesh, SHARDING_RULES)
  placed = jax.device_get(batch)
  for got, sent in zip(jax.tree.leaves(placed), jax.tree.leaves(host)):
    np.testing.assert_array_equal(got[rows], sent)
  # Device by device: the device at mesh position (i, j, k) holds batch block i * fsdp + j.
  data, fsdp, _ = mesh.devices.shape
  per_block = global_size // (data * fsdp)
  where = {device: (i * fsdp + j) * per_block for (i, j, _), device in np.ndenumerate(mesh.devices)}
  for leaf, sent in zip(jax.tree.leaves(batch), jax.tree.leaves(host)):
    assert len(leaf.addressable_shards) == 8
    for shard in leaf.addressable_shards:
      start = where[shard.device]
      want = sent[np.searchsorted(rows, np.arange(start, start + per_block))]
      np.testing.assert_array_equal(np.asarray(shard.data), want)


def test_a_host_batch_the_mesh_cannot_split_is_named():
  mesh = sharding.make_mesh(mesh_config(1, 8, 1))
  with pytest.raises(ValueError, match="host batch of 12 rows x 1 data shards = global batch 12"):
    sharding.global_batch(dict(x=np.zeros((12, 2))), mesh, SHARDING_RULES)
  with pytest.raises(ValueError, match="global batch 12 is not divisible by the 8 batch shards"):
    sharding.host_shard(mesh, SHARDING_RULES, 12)


@dataclasses.dataclass(frozen=True)
class FakeGpu:
  """A GPU of a multi-node run as XLA describes it: each host (boot id) is its own slice."""

  id: int
  process_index: int
  slice_index: int
  platform: str = "gpu"
  device_kind: str = "NVIDIA H100 80GB HBM3"


def test_a_multi_node_gpu_mesh_puts_the_nodes_on_data():
  """jax.make_mesh refuses devices of several slices ("does not support multi-slice
  topologies"), and XLA gives every GPU host its own slice: every multi-node GPU run
  failed while building its mesh. Now a hybrid mesh, nodes along "data" (fsdp within a
  node) where the sizes allow, data x fsdp where data alone cannot take them."""
  devices = [FakeGpu(i, i // 8, i // 8) for i in range(16)]  # 2 nodes x 8 GPUs
  shape, why = sharding.mesh_shape(mesh_config(-1, -1, 1), 16, sharding.MeshNeeds(), devices)
  assert shape == (2, 8, 1), why  # the automatic mesh keeps fsdp inside a node
  array = sharding.device_array((2, 8, 1), devices)
  np.testing.assert_array_equal(
    [[d.slice_index for d in row.ravel()] for row in array], [[0] * 8, [1] * 8]
  )
  # data=4: two data rows per node.
  array = sharding.device_array((4, 4, 1), devices)
  assert [{d.slice_index for d in row.ravel()} for row in array] == [{0}, {0}, {1}, {1}]
  # data=1: fsdp spans both nodes (slower, but it runs).
  array = sharding.device_array((1, 16, 1), devices)
  assert [d.slice_index for d in array.ravel()] == [0] * 8 + [1] * 8
  three = [FakeGpu(i, i // 4, i // 4) for i in range(12)]  # 3 nodes x 4 GPUs
  with pytest.raises(
    sharding.MeshError, match=r"span 3 slices .* config.mesh.data to a multiple of 3"
  ):
    sharding.device_array((2, 2, 3), three)


@needs_libtpu
def test_a_mesh_off_the_physical_axes_splits_them_with_a_warning(caplog):
  """tensor=2 on a v4 slice (physical axes 4 x 4 x 4): the automatic mesh found no split
  and said to set data and fsdp, which then raised jax's NotImplementedError (a traceback,
  naming allow_split_physical_axes, which no config key sets)."""
  devices = topology("v4:4x4x4")
  shape, why = sharding.mesh_shape(mesh_config(-1, -1, 2), 64, sharding.MeshNeeds(), devices)
  assert shape[2] == 2 and "splits an ICI ring" in why
  with caplog.at_level("WARNING"):
    mesh = sharding.make_mesh(mesh_config(2, 32, 1), devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 32, "tensor": 1}
  assert "not a product of whole physical axes" in caplog.text
  check_every_process(mesh, 128)
