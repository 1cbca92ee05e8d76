"""Mesh, logical-axis rules and shardings.

Model code names axes logically (`batch`, `embed`, `mlp`, ...); the config's
`sharding_rules` table maps each logical name to mesh axes ("data", "fsdp", "tensor")
or to None (replicated). Nothing else in the code names a mesh axis.
"""

import dataclasses
import functools
import math

import jax
import numpy as np
from absl import logging
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
  """A config.mesh that does not fit the devices, a parameter or the batch."""


@dataclasses.dataclass(frozen=True)
class MeshNeeds:
  """What an automatic mesh must divide: parameter dimensions and the batch.

  fsdp_dims: sizes of every parameter dimension sharded over "fsdp".
  batch_rows: rows of one (micro-)batch, split over `batch_axes` (the mesh axes the
    rules give the logical "batch" axis); 0 = no batch constraint.
  tensor_dims: sizes of every parameter dimension sharded over "tensor" (logical
    `heads`, `mlp` and `vocab` under the default rules): config.mesh.tensor must divide
    each of them.
  other_dims: (size, mesh axes) of every other sharded parameter dimension: over several
    mesh axes at once (a rule such as ("embed", ("fsdp", "tensor"))) or over "data"; the
    product of the axes' sizes must divide it.
  names: (size, mesh axes, parameter path) of the first parameter with each sharded
    dimension, for errors to name.
  """

  fsdp_dims: tuple[int, ...] = ()
  batch_rows: int = 0
  batch_axes: tuple[str, ...] = ("data", "fsdp")
  tensor_dims: tuple[int, ...] = ()
  other_dims: tuple[tuple[int, tuple[str, ...]], ...] = ()
  names: tuple[tuple[int, tuple[str, ...], str], ...] = dataclasses.field(default=(), compare=False)

  @classmethod
  def of(cls, params_shapes, params_specs, batch_rows: int, rules) -> "MeshNeeds":
    """From abstract params, their PartitionSpecs and the rules' "batch" entry."""
    splits: dict[tuple[int, tuple[str, ...]], str] = {}  # first parameter of each split
    for (path, shape), spec in zip(
      jax.tree_util.tree_flatten_with_path(params_shapes)[0],
      jax.tree.leaves(params_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
    ):
      for size, axes in zip(shape.shape, spec):
        if _axes_tuple(axes):
          splits.setdefault((int(size), _axes_tuple(axes)), jax.tree_util.keystr(path))

    def sizes_over(axis):
      return tuple(sorted({size for size, axes in splits if axis in axes}))

    batch_axes = _axes_tuple(logical_to_spec(("batch",), rules)[0])
    return cls(
      sizes_over("fsdp"),
      int(batch_rows),
      batch_axes,
      sizes_over("tensor"),
      tuple(sorted(split for split in splits if split[1] not in (("fsdp",), ("tensor",)))),
      tuple((size, axes, path) for (size, axes), path in splits.items()),
    )

  def indivisible(self, shape: dict) -> list[tuple[int, tuple[str, ...]]]:
    """(size, mesh axes) of the dimensions a mesh of `shape` ({axis: size}) does not divide."""
    splits = [(s, ("fsdp",)) for s in self.fsdp_dims]
    splits += [(s, ("tensor",)) for s in self.tensor_dims] + list(self.other_dims)
    return [(s, axes) for s, axes in splits if s % math.prod(shape[a] for a in axes)]

  def parameter(self, size: int, axes: tuple[str, ...]) -> str:
    """Names the first parameter whose dimension of `size` is split over mesh axes that
    include all of `axes`, as " (parameter PATH)" for a message; "" when none is known."""
    for s, split, path in self.names:
      if s == size and set(axes) <= set(split):
        return f" (parameter {path})"
    return ""


def _axes_tuple(axes) -> tuple[str, ...]:
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def mesh_shape(
  mesh_config, num_devices: int, needs: MeshNeeds = MeshNeeds(), devices=None
) -> tuple[tuple[int, ...], str]:
  """Resolves `config.mesh` sizes to (shape, why).

  Explicit sizes are used as they are (`check_divisible` checks the parameters against
  the mesh); one -1 takes the remaining devices. With data = fsdp = -1 (automatic, the
  default) tensor stays as configured and must divide every dimension in
  `needs.tensor_dims` (a MeshError lists the sizes that do); fsdp is the largest divisor
  of the devices left by tensor that divides every sharded parameter dimension in
  `needs` (`fsdp_dims`, `other_dims`), keeps the batch
  split into whole rows and, given `devices`, lays out on their physical topology
  (`jax.make_mesh` on a TPU slice needs each axis to be a product of whole physical
  axes: 1,024 of a v4 8x16x16 slice is not); data takes the rest. FSDP as wide as the
  parameters allow shards the state most; data parallelism over the rest costs a
  gradient all-reduce of the (fsdp-sharded) gradients over "data".
  """
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if any(s == 0 or s < -1 for s in sizes) or sizes[2] == -1 and -1 in sizes[:2]:
    raise MeshError(
      f"config.mesh ({described}): sizes must be positive or -1 (data = fsdp = -1: automatic)"
    )
  if sizes[0] == sizes[1] == -1:
    return _automatic(sizes[2], num_devices, needs, described, devices)
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise MeshError(f"config.mesh ({described}) does not divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise MeshError(
      f"config.mesh ({described}) has {math.prod(sizes)} devices but {num_devices} are present"
    )
  return tuple(sizes), f"config.mesh ({described}) over {num_devices} devices"


def slice_count(devices) -> int:
  """How many slices `devices` span: TPU slices joined over the data-centre network, or
  the hosts of a multi-node GPU run (XLA gives each host its own slice index)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def device_array(shape: tuple[int, ...], devices, split_physical_axes: bool = False):
  """`devices` as an array of `shape` ("data", "fsdp", "tensor") in the order of their
  physical topology (jax.make_mesh's: ICI rings on a TPU slice; compile-only devices too).

  Devices of several slices (multi-slice TPU, multi-node GPU), which jax.make_mesh
  refuses ("does not support multi-slice topologies"): a hybrid mesh whose slice factor
  lies on "data" (on "data" x "fsdp" where data alone is not a multiple of it), so that
  only data parallelism crosses the slower network between slices. split_physical_axes:
  lay out a shape whose axes are not products of whole physical axes (tensor=2 on a v4
  slice), which jax.make_mesh refuses on v4, v5p and v6e (NotImplementedError otherwise).
  """
  from jax.experimental import mesh_utils

  devices = list(devices)
  slices = slice_count(devices)
  if slices == 1:
    if split_physical_axes:
      return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return jax.make_mesh(shape, MESH_AXES, devices=devices).devices
  data, fsdp, tensor = shape
  on_data = math.gcd(data, slices)
  if fsdp % (slices // on_data):
    raise MeshError(
      f"mesh data={data} x fsdp={fsdp}: the {len(devices)} devices span {slices} slices "
      f"(nodes), which data (or data x fsdp) must split into whole slices; set "
      f"config.mesh.data to a multiple of {slices}"
    )
  dcn = (on_data, slices // on_data, 1)
  ici = tuple(size // across for size, across in zip(shape, dcn))
  return mesh_utils.create_hybrid_device_mesh(
    ici, dcn, devices, allow_split_physical_axes=split_physical_axes
  )


def _lays_out(shape: tuple[int, ...], devices, split_physical_axes: bool = False) -> bool:
  """Whether `device_array` can place `shape` on `devices` (their physical topology)."""
  if devices is None:
    return True
  try:
    device_array(shape, devices, split_physical_axes)
  except (NotImplementedError, MeshError):  # jax's words for "no physical assignment"
    return False
  return True


def _automatic(tensor: int, num_devices: int, needs: MeshNeeds, described: str, devices):
  if num_devices % tensor:
    raise MeshError(f"config.mesh ({described}): tensor={tensor} does not divide {num_devices}")
  # tensor is the configured size: no data x fsdp choice mends a dimension it does not divide.
  for size in needs.tensor_dims:
    if size % tensor:
      fitting = [
        t
        for t in range(1, num_devices + 1)
        if num_devices % t == 0 and all(s % t == 0 for s in needs.tensor_dims)
      ]
      raise MeshError(
        f"config.mesh ({described}): config.mesh.tensor={tensor} does not divide the "
        f"tensor-sharded parameter dimension of {size}{needs.parameter(size, ('tensor',))}; "
        f"tensor sizes that divide every tensor-sharded dimension (their gcd: "
        f"{math.gcd(*needs.tensor_dims)}) and the {num_devices} devices: "
        f"{', '.join(map(str, fitting))}"
      )
  rest = num_devices // tensor

  def shape(fsdp: int) -> dict:
    return dict(data=rest // fsdp, fsdp=fsdp, tensor=tensor)

  def batch_whole(fsdp: int) -> bool:
    ways = math.prod(shape(fsdp)[a] for a in needs.batch_axes)
    return not needs.batch_rows or needs.batch_rows % ways == 0

  # fsdp = 1 divides every dimension split over "fsdp" alone. When no candidate splits the
  # batch into whole rows (with the default rules the batch is split data x fsdp ways
  # whatever the choice), the largest is kept and the batch check of the caller names the
  # batch size.
  candidates = [d for d in range(rest, 0, -1) if rest % d == 0]
  # Devices of several slices (nodes): fsdp within one, data across them, where it can.
  slices = 1 if devices is None else slice_count(devices)
  candidates = [d for d in candidates if (rest // d) % slices == 0] or candidates
  dividing = [d for d in candidates if not needs.indivisible(shape(d))]
  if not dividing:  # only with rules splitting a parameter over "data" or several axes
    size, axes = needs.indivisible(shape(1))[0]
    raise MeshError(
      f"config.mesh ({described}): no data x fsdp split of the {rest} devices left by "
      f"tensor={tensor} divides the parameter dimension of {size}{needs.parameter(size, axes)}"
      f" split over mesh axes {axes}; set config.mesh.data, fsdp and tensor explicitly"
    )
  placed = [d for d in dividing if _lays_out((rest // d, d, tensor), devices)]
  split = ""
  if not placed:  # e.g. tensor=2 on a v4 slice, whose physical axes are 4 x 4 x 4
    placed = [d for d in dividing if _lays_out((rest // d, d, tensor), devices, True)]
    split = "; no split lays out on whole physical axes (an axis splits an ICI ring)"
  if not placed:
    raise MeshError(
      f"config.mesh ({described}): no data x fsdp split of {rest} devices lays out on their "
      "topology; set config.mesh.data and config.mesh.fsdp explicitly"
    )
  fsdp = next((d for d in placed if batch_whole(d)), placed[0])
  gcd = math.gcd(*needs.fsdp_dims) if needs.fsdp_dims else "none"
  why = (
    f"automatic (config.mesh.data = fsdp = -1): fsdp={fsdp}, the largest divisor of the "
    f"{rest} devices left by tensor={tensor} that divides every fsdp-sharded parameter "
    f"dimension (their gcd: {gcd})"
  )
  if fsdp != dividing[0]:
    skipped = [d for d in dividing if d > fsdp]
    why += (
      f" and both lays out on the devices' topology and splits the batch of "
      f"{needs.batch_rows} rows into whole rows ({', '.join(map(str, skipped))} do not)"
    )
  return (rest // fsdp, fsdp, tensor), why + f"; data={rest // fsdp} takes the rest{split}"


def make_mesh(mesh_config, devices=None, needs: MeshNeeds = MeshNeeds()) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all); see `mesh_shape`.

  Axis types are Auto (GSPMD propagation): with Explicit axes a scanned stack of
  sharded weights fails the scan carry type check ("scan body function carry input and
  carry output must have equal types"), seen with jax 0.10.2.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape, _ = mesh_shape(mesh_config, len(devices), needs, devices)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    array = device_array(shape, devices)
  except NotImplementedError:  # not on whole physical axes: jax suggests splitting them
    logging.warning(
      "mesh %s: an axis is not a product of whole physical axes of the devices' topology; "
      "laid out splitting a physical axis (its collectives cross ring segments)",
      dict(zip(MESH_AXES, shape)),
    )
    array = device_array(shape, devices, split_physical_axes=True)
  return Mesh(array, MESH_AXES, axis_types=auto)


def check_divisible(params, shardings, mesh_config) -> None:
  """Raises MeshError naming the first parameter whose sharded dimension the mesh does not
  divide: its path and shape, the dimension, the mesh axes and the config.mesh keys to
  change. Without it jax fails at the first array with an IndivisibleError that names
  neither the parameter nor the config.

  params: tree of arrays or ShapeDtypeStructs; shardings: the same tree of NamedShardings;
  mesh_config: config.mesh, quoted in the message.
  """
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, leaf), named_sharding in zip(flat_params, jax.tree.leaves(shardings)):
    mesh_sizes = named_sharding.mesh.shape
    for dim, (size, axes) in enumerate(zip(leaf.shape, named_sharding.spec)):
      axes = _axes_tuple(axes)
      ways = math.prod(mesh_sizes[a] for a in axes)
      if size % ways:
        keys = " x ".join(f"config.mesh.{a}" for a in axes)
        now = " x ".join(str(mesh_sizes[a]) for a in axes)
        configured = ", ".join(f"{k}={v}" for k, v in dict(mesh_config).items())
        raise MeshError(
          f"parameter {jax.tree_util.keystr(path)} {tuple(leaf.shape)}: dimension {dim} "
          f"({size}) is split over mesh axes {axes} = {ways} ways, which does not divide it; "
          f"choose {keys} (now {now}; config.mesh: {configured}) so that "
          f"{'their product' if len(axes) > 1 else 'it'} divides {size}"
        )


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


def _spec_ways(mesh: Mesh, spec: PartitionSpec) -> int:
  """How many ways the mesh splits the first dimension of an array with `spec`."""
  axes = spec[0] if len(spec) else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def batch_ways(mesh: Mesh, rules) -> int:
  """How many ways the batch axis is split over the mesh (its batch shards)."""
  return _spec_ways(mesh, logical_to_spec(("batch",), rules))


@dataclasses.dataclass(frozen=True, eq=False)
class DataShard:
  """The batch rows one process feeds: its host batch.

  `rows` are the global batch rows the process's devices hold, sorted: host batch row j
  is global row `rows[j]`. Processes holding the same rows (a tensor-parallel group that
  spans hosts) share `index` and must feed the same host batch.
  """

  index: int  # the shard: rank of `rows` among the distinct row sets, by first row
  count: int  # how many distinct shards; len(rows) * count == global batch
  rows: np.ndarray
  # Each of the process's devices -> the slice of the host batch it receives.
  device_rows: dict = dataclasses.field(repr=False)


def describe_rows(rows: np.ndarray, limit: int = 6) -> str:
  """Sorted row indices as inclusive ranges: "0-3, 16-19"."""
  breaks = np.flatnonzero(np.diff(rows) != 1) + 1
  runs = [(int(r[0]), int(r[-1])) for r in np.split(rows, breaks) if len(r)]
  text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:limit])
  if len(runs) > limit:
    text += f", ... ({len(rows)} rows in {len(runs)} runs)"
  return text


@functools.lru_cache(maxsize=16)
def _data_shards(mesh: Mesh, spec: PartitionSpec, global_batch_size: int) -> dict:
  ways = _spec_ways(mesh, spec)
  if global_batch_size % ways:
    raise ValueError(
      f"global batch {global_batch_size} is not divisible by the {ways} batch shards of mesh "
      f"{dict(mesh.shape)}"
    )
  indices = NamedSharding(mesh, spec).devices_indices_map((global_batch_size,))
  slices: dict[int, set] = {}
  device_slices: dict[int, dict] = {}
  for device, index in indices.items():
    start, stop, _ = index[0].indices(global_batch_size)
    slices.setdefault(device.process_index, set()).add((start, stop))
    device_slices.setdefault(device.process_index, {})[device] = (start, stop)
  rows = {p: np.concatenate([np.arange(a, b) for a, b in sorted(s)]) for p, s in slices.items()}
  # Distinct row sets, ranked by their first row; each keeps one process to name.
  distinct: dict[bytes, tuple[int, np.ndarray]] = {}
  for p in sorted(rows):
    r = rows[p]
    if len(np.unique(r)) != len(r):  # devices' slices overlap without being equal
      raise ValueError(f"process {p}'s devices hold overlapping batch rows {describe_rows(r)}")
    distinct.setdefault(r.tobytes(), (p, r))
  ranked = sorted(distinct.values(), key=lambda pr: int(pr[1][0]))
  first_p, first_r = ranked[0]
  for p, r in ranked[1:]:
    if len(r) != len(first_r):
      raise ValueError(
        f"process {p} holds {len(r)} batch rows ({describe_rows(r)}) but process {first_p} "
        f"holds {len(first_r)} ({describe_rows(first_r)}): every process must feed a host "
        "batch of the same size"
      )
  owner = np.full(global_batch_size, -1)
  for p, r in ranked:
    taken = owner[r]
    if (taken >= 0).any():
      q = int(taken[taken >= 0][0])
      raise ValueError(
        f"process {p}'s batch rows ({describe_rows(r)}) partially overlap process {q}'s "
        f"({describe_rows(rows[q])}): processes must hold the same rows or disjoint rows"
      )
    owner[r] = p
  # The mesh holds every row, so disjoint equal sets cover the global batch.
  assert (owner >= 0).all(), "the mesh's devices do not cover the global batch"
  rank = {key: i for i, key in enumerate(r.tobytes() for _, r in ranked)}
  shards = {}
  for p, r in rows.items():
    r.setflags(write=False)
    # r is sorted and holds all of a device's rows start .. stop - 1, consecutively.
    at = {d: int(np.searchsorted(r, a)) for d, (a, _) in device_slices[p].items()}
    on_devices = {d: slice(at[d], at[d] + b - a) for d, (a, b) in device_slices[p].items()}
    shards[p] = DataShard(rank[r.tobytes()], len(ranked), r, on_devices)
  return shards


def data_shards(mesh: Mesh, rules, global_batch_size: int) -> dict[int, DataShard]:
  """{process index: DataShard} for every process owning devices of `mesh`.

  A pure function of the mesh's devices (each knows its `process_index`): it describes
  every host of a slice from any one host, or from none (compile-only topologies).

  A process's rows are the union of its devices' batch rows, whatever the device order
  (on TPU, `jax.make_mesh` orders devices by the ICI topology, so a host's rows are
  usually not contiguous). Shards are disjoint, equal in size and cover the global
  batch; processes with the same row set share a shard, ranked by first row. Raises
  ValueError naming a process and its rows when no such split exists (row sets that
  partially overlap or differ in size).
  """
  return _data_shards(mesh, logical_to_spec(("batch",), rules), int(global_batch_size))


def host_shard(
  mesh: Mesh, rules, global_batch_size: int, process_index: int | None = None
) -> DataShard:
  """The DataShard of a process (default: this process): `index`, `count` and the global
  `rows` of its host batch (see `data_shards`).

  Host batch row j lands at global row `rows[j]` (`global_batch`): a source whose
  example r is a pure function of the global row r generates `[example(r) for r in
  rows]` and gives the same global batch under any number of processes."""
  process = jax.process_index() if process_index is None else process_index
  shards = data_shards(mesh, rules, global_batch_size)
  if process not in shards:
    raise ValueError(
      f"process {process} holds no device of the mesh (processes {sorted(shards)} do)"
    )
  return shards[process]


def global_batch(host_batch, mesh: Mesh, rules):
  """Host-local numpy batch -> global jax.Arrays sharded over the batch axis.

  Each process passes only its own data shard: local batch = global / count rows
  (`host_shard`). Host row j lands at global row `host_shard(mesh, rules, global).rows[j]`
  (the process's rows in increasing order): each device gets the host rows of its own
  slice of the global batch, in the mesh's device order. Correct for any device order and
  any number of processes.
  """
  leaves = jax.tree.leaves(host_batch)
  local = leaves[0].shape[0]
  if any(x.shape[0] != local for x in leaves):
    raise ValueError(f"host batch leaves differ in rows: {[x.shape[0] for x in leaves]}")
  # How many shards a batch is split into does not depend on its size: ask at one row
  # per batch shard.
  ways = batch_ways(mesh, rules)
  num_shards = host_shard(mesh, rules, ways).count
  size = local * num_shards
  if size % ways:
    raise ValueError(
      f"host batch of {local} rows x {num_shards} data shards = global batch {size}, "
      f"which the {ways} batch shards of mesh {dict(mesh.shape)} do not divide"
    )
  on_devices = host_shard(mesh, rules, size).device_rows

  def put(x, named_sharding):
    shape = (size,) + tuple(x.shape[1:])
    devices = list(named_sharding.addressable_devices_indices_map(shape))
    arrays = jax.device_put([x[on_devices[d]] for d in devices], devices)
    return jax.make_array_from_single_device_arrays(shape, named_sharding, arrays)

  return jax.tree.map(put, host_batch, named(mesh, batch_specs(host_batch, rules)))
