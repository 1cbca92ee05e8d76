"""Mesh, logical-axis rules and shardings.

Model code names axes logically (`batch`, `embed`, `mlp`, ...); the config's
`sharding_rules` table maps each logical name to mesh axes ("data", "fsdp", "tensor")
or to None (replicated). Nothing else in the code names a mesh axis.
"""

import jax
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh and rules context."""
  rules = flax_spmd.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules))


def logical_to_spec(logical_axes, rules) -> PartitionSpec:
  """Maps logical axis names to a mesh PartitionSpec; an unknown name is an error."""
  table = dict(rules)
  mesh_axes = []
  for name in logical_axes:
    if name is None:
      mesh_axes.append(None)
    elif name not in table:
      raise KeyError(f"logical axis {name!r} has no entry in config.sharding_rules")
    else:
      mesh_axes.append(table[name])
  return PartitionSpec(*mesh_axes)
