"""The train state: a plain pytree {params, opt_state, step}, created already sharded.

One abstract copy (`jax.eval_shape` of the init) gives the shardings, the jitted init's
`out_shardings` and the Orbax restore target; no full replica of the parameters is ever
materialised on one device.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from coca_jax import optim, sharding
from coca_jax import params as params_lib
from coca_jax.models import coca


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """What is known about the state before any array exists."""

  graphdef: nnx.GraphDef  # the model's structure; params merge into it
  abstract: dict  # ShapeDtypeStruct tree of the state
  shardings: dict  # NamedSharding tree of the state
  mesh: Mesh  # the mesh of those shardings


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a run builds before its first array: mesh, optimizer, state layout."""

  mesh: Mesh
  mesh_reason: str  # how config.mesh became this mesh's shape
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule  # step -> learning rate
  layout: StateLayout


def setup(config, devices=None) -> Setup:
  """Mesh over `devices` (default: all) from config.mesh, optimizer and schedule from
  config.optim, and the state layout: the one setup chain of train, aot, export, benches.

  An automatic config.mesh (data = fsdp = -1) is resolved against the model's
  parameter dimensions and the (micro-)batch; `Setup.mesh_reason` says what was chosen
  and why (the trainer logs it, the AOT report prints it). Raises sharding.MeshError,
  naming the parameter and the config.mesh key, when the mesh does not divide a sharded
  parameter dimension."""
  devices = jax.devices() if devices is None else list(devices)
  optimizer, schedule = optim.make_optimizer(
    config.optim,
    config.train.steps,
    coca.log_inv_temperature_range(config.model.temperature),
  )
  abstract_model = nnx.eval_shape(lambda: coca.build(config.model))
  abstract_params = nnx.state(abstract_model, nnx.Param).to_pure_dict()
  optimizer = optim.freeze(optimizer, abstract_params, frozen_patterns(config))
  if config.optim.weight_decay > 0:  # no_decay's pattern errors now, not at the compile
    optim.check_no_decay(abstract_params, tuple(config.optim.no_decay))
  accum = config.train.grad_accum_steps
  batch = config.data.global_batch_size
  needs = sharding.MeshNeeds.of(
    abstract_params,
    sharding.param_specs(abstract_model, config.sharding_rules),
    batch // accum if batch % accum == 0 else batch,
    config.sharding_rules,
  )
  _, reason = sharding.mesh_shape(config.mesh, len(devices), needs, devices)
  mesh = sharding.make_mesh(config.mesh, devices, needs)
  state_layout = layout(config, optimizer, mesh)
  # Here, naming the parameter and config.mesh, not at the first array (an IndivisibleError).
  sharding.check_divisible(
    state_layout.abstract["params"], state_layout.shardings["params"], config.mesh
  )
  return Setup(mesh, reason, optimizer, schedule, state_layout)


def frozen_patterns(config) -> tuple[str, ...]:
  """config.train.frozen (absent from configs written before it existed)."""
  return tuple(config.train.get("frozen", ()))


def _init_fn(model_config, optimizer, seed):
  def init(loaded=None):
    model = coca.build(model_config, seed)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    if loaded:  # {path names: array} replacing the fresh values (init_from)
      params = jax.tree_util.tree_map_with_path(
        lambda path, fresh: loaded.get(params_lib.path_names(path), fresh), params
      )
    return dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros([], jnp.int32))

  return init


def layout(config, optimizer: optax.GradientTransformation, mesh: Mesh) -> StateLayout:
  """Abstract state and shardings for `config` on `mesh`."""
  abstract_model = nnx.eval_shape(lambda: coca.build(config.model))
  graphdef = nnx.split(abstract_model)[0]
  abstract = jax.eval_shape(_init_fn(config.model, optimizer, config.train.seed))
  param_specs = sharding.param_specs(abstract_model, config.sharding_rules)
  # Frozen parameters have no optimizer state: its params-shaped parts lack them.
  frozen = optim.frozen_mask(abstract["params"], frozen_patterns(config))
  specs = dict(
    params=param_specs,
    opt_state=sharding.like_params_specs(
      abstract["opt_state"],
      optim.trained_only(abstract["params"], frozen),
      optim.trained_only(param_specs, frozen),
    ),
    step=jax.sharding.PartitionSpec(),
  )
  shardings = sharding.named(mesh, specs)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  return StateLayout(graphdef=graphdef, abstract=abstract, shardings=shardings, mesh=mesh)


def create(config, run: Setup, loaded: dict | None = None) -> dict:
  """Initialises the state directly into its shardings.

  loaded: {path names: array} (init_from) replacing those parameters of the fresh init;
  the optimizer state is initialised from the result. Its arrays are donated.
  """
  init = jax.jit(
    _init_fn(config.model, run.optimizer, config.train.seed),
    out_shardings=run.layout.shardings,
    donate_argnums=(0,) if loaded else (),
  )
  with jax.set_mesh(run.mesh), nnx.logical_axis_rules(config.sharding_rules):
    return init(loaded) if loaded else init()


def model_from_params(graphdef: nnx.GraphDef, params: dict) -> coca.CoCa:
  """A CoCa module whose parameters are `params` (a nested dict of arrays)."""
  return nnx.merge(graphdef, params)
