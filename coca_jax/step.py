"""train_step and eval_step: pure functions of (state, batch), jitted with explicit shardings.

Legend: B global batch, A gradient-accumulation micro-batches, T text length.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from coca_jax import losses, sharding
from coca_jax.state import Setup, StateLayout, model_from_params


def _loss_fn(config, graphdef):
  def loss_fn(params, batch):
    model = model_from_params(graphdef, params)
    outputs = model(batch)
    loss, terms = losses.total_loss(outputs, batch, config.loss)
    return loss, dict(terms, temperature=outputs["temperature"])

  return loss_fn


def _split_micro_batches(batch, accum_steps: int):
  """[B, ...] -> [A, B/A, ...] keeping every micro-batch spread over the batch shards."""

  def split(x):
    if x.shape[0] % accum_steps:
      raise ValueError(
        f"batch of {x.shape[0]} is not divisible by config.train.grad_accum_steps={accum_steps}"
      )
    # Row r goes to micro-batch r % A: each device's local rows feed every micro-batch.
    y = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(y, (None, "batch") + (None,) * (x.ndim - 1))

  return jax.tree.map(split, batch)


def make_train_step(config, run: Setup):
  """Returns train_step(state, batch) -> (state, metrics), jitted, state donated.

  Metrics (scalars, left on device): loss, contrastive_loss, captioning_loss,
  contrastive_accuracy, temperature, grad_norm, param_norm, learning_rate.
  With config.train.grad_accum_steps = A > 1 the gradient is the mean over A
  micro-batches; the contrastive loss then sees B/A negatives per example, not B (the
  price of accumulation for a contrastive loss).
  """
  optimizer, schedule, state_layout = run.optimizer, run.schedule, run.layout
  loss_fn = _loss_fn(config, state_layout.graphdef)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  accum_steps = config.train.grad_accum_steps

  def train_step(state, batch):
    params = state["params"]
    if accum_steps == 1:
      (_, terms), grads = grad_fn(params, batch)
    else:
      micro_batches = _split_micro_batches(batch, accum_steps)

      def accumulate(carry, micro_batch):
        (_, micro_terms), micro_grads = grad_fn(params, micro_batch)
        return jax.tree.map(jnp.add, carry, (micro_grads, micro_terms)), None

      (_, terms_shape), grads_shape = jax.eval_shape(
        grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches)
      )
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, terms_shape))
      (grads, terms), _ = jax.lax.scan(accumulate, zeros, micro_batches)
      grads, terms = jax.tree.map(lambda x: x / accum_steps, (grads, terms))
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    metrics = dict(
      terms,
      grad_norm=optax.global_norm(grads),
      param_norm=optax.global_norm(params),
      learning_rate=schedule(state["step"]),
    )
    return dict(params=params, opt_state=opt_state, step=state["step"] + 1), metrics

  return _jit(config, train_step, state_layout, donate=True)


def make_eval_step(config, state_layout: StateLayout):
  """Returns eval_step(state, batch) -> metrics (losses without an update), jitted."""
  loss_fn = _loss_fn(config, state_layout.graphdef)

  def eval_step(state, batch):
    _, terms = loss_fn(state["params"], batch)
    return terms

  return _jit(config, eval_step, state_layout, donate=False)


def _jit(config, fn, state_layout: StateLayout, donate: bool):
  """jit with the state's shardings in and out, batch sharded over its leading axis."""
  mesh = state_layout.mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(
    mesh, sharding.logical_to_spec(("batch",), config.sharding_rules)
  )

  def traced(state, batch):
    with nnx.logical_axis_rules(config.sharding_rules):
      return fn(state, batch)

  out_shardings = (state_layout.shardings, replicated) if donate else replicated
  jitted = jax.jit(
    traced,
    in_shardings=(state_layout.shardings, batch_sharding),
    out_shardings=out_shardings,
    donate_argnums=(0,) if donate else (),
  )

  def call(state, batch):
    with jax.set_mesh(mesh):
      return jitted(state, batch)

  call.jitted = jitted
  call.mesh = mesh
  return call
