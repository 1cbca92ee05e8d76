"""Mesh, logical-axis rules and shardings.

Model code names axes logically (`batch`, `embed`, `mlp`, ...); the config's
`sharding_rules` table maps each logical name to mesh axes ("data", "fsdp", "tensor")
or to None (replicated). Nothing else in the code names a mesh axis.
"""

import math

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves `config.mesh` sizes (one may be -1: all remaining devices)."""
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh ({described}): sizes must be positive, at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh ({described}) does not divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"config.mesh ({described}) has {math.prod(sizes)} devices but {num_devices} are present"
    )
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all).

  Axis types are Auto (GSPMD propagation): with Explicit axes a scanned stack of
  sharded weights fails the scan carry type check (see LIBRARY_FACTS.md).
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  # jax.make_mesh orders the devices by the physical topology (ICI rings on TPU), also
  # for the devices of a compile-only topology (AOT).
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def logical_to_spec(logical_axes, rules) -> PartitionSpec:
  """Maps logical axis names to a mesh PartitionSpec; an unknown name is an error."""
  # Rules read back from JSON (config.json) hold lists where the config has tuples.
  table = {name: tuple(axes) if isinstance(axes, list) else axes for name, axes in rules}
  mesh_axes = []
  for name in logical_axes:
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no entry in config.sharding_rules")
    mesh_axes.append(None if name is None else table[name])
  return PartitionSpec(*mesh_axes)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh and rules context."""
  rules = flax_spmd.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules))


def param_specs(abstract_model, rules) -> dict:
  """Nested dict (like the params) of PartitionSpecs from each Param's logical names."""
  params = nnx.state(abstract_model, nnx.Param)
  specs = jax.tree.map(
    lambda v: logical_to_spec(v.get_metadata()["out_sharding"], rules),
    params,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return specs.to_pure_dict()


def like_params_specs(tree, params_shapes, params_specs):
  """PartitionSpecs for a tree (e.g. optimizer state) holding params-shaped subtrees.

  Every subtree with the params' structure gets the params' specs, leaf by leaf; a
  leaf whose shape lost a dimension (Adafactor's factored row/column statistics) drops
  that dimension from the spec; anything else (step counts) is replicated.
  """
  structure = jax.tree.structure(params_shapes)

  def is_params_like(x):
    return jax.tree.structure(x) == structure

  def leaf_spec(leaf, param, spec):
    shape, pshape = tuple(leaf.shape), tuple(param.shape)
    if shape == pshape:
      return spec
    if len(shape) == len(pshape) - 1:
      for dropped in range(len(pshape)):
        if pshape[:dropped] + pshape[dropped + 1 :] == shape:
          entries = list(spec) + [None] * (len(pshape) - len(spec))
          return PartitionSpec(*(entries[:dropped] + entries[dropped + 1 :]))
    return PartitionSpec()

  def assign(node):
    if is_params_like(node):
      return jax.tree.map(leaf_spec, node, params_shapes, params_specs)
    return PartitionSpec()

  return jax.tree.map(assign, tree, is_leaf=is_params_like)


def named(mesh: Mesh, specs):
  """PartitionSpec tree -> NamedSharding tree."""
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )


def batch_specs(batch_tree, rules):
  """Every batch array is split over its leading (batch) axis."""
  return jax.tree.map(
    lambda x: logical_to_spec(("batch",) + (None,) * (len(x.shape) - 1), rules), batch_tree
  )


def global_batch(host_batch, mesh: Mesh, rules):
  """Host-local numpy batch -> global jax.Arrays sharded over the batch axis.

  Each process passes only its own rows (local batch = global / data replicas); this
  is correct with any number of processes.
  """
  shardings = named(mesh, batch_specs(host_batch, rules))
  return jax.tree.map(jax.make_array_from_process_local_data, shardings, host_batch)


def host_data_shard(mesh: Mesh, rules, global_batch_size: int) -> tuple[int, int]:
  """(shard_index, num_shards) of the rows this process feeds, from the batch sharding.

  Processes whose devices hold the same batch rows (e.g. tensor parallelism across
  hosts) get the same shard index and read the same data: the index is the data-replica
  index, not the process index.
  """
  spec = logical_to_spec(("batch",), rules)
  indices = NamedSharding(mesh, spec).addressable_devices_indices_map((global_batch_size,))
  rows = sorted({(s[0].start or 0, s[0].stop or global_batch_size) for s in indices.values()})
  start, stop = rows[0][0], rows[-1][1]
  if any(b[0] != a[1] for a, b in zip(rows, rows[1:])) and len(rows) > 1:
    raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {rows}")
  local = stop - start
  if global_batch_size % local:
    raise ValueError(
      f"global batch {global_batch_size} is not a multiple of the local batch {local}"
    )
  return start // local, global_batch_size // local
