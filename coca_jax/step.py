"""train_step and eval_step: pure functions of (state, batch), jitted with explicit shardings.

Legend: B global batch, A gradient-accumulation micro-batches, T text length.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from coca_jax import losses, optim, sharding
from coca_jax.state import Setup, StateLayout, frozen_patterns, model_from_params


def _model_fn(config, graphdef):
  """params -> the model, with the gradients of config.train.frozen parameters stopped:
  their gradient is zero and autodiff runs no backward pass through a frozen tower (a
  frozen image encoder's backward would otherwise run in full, only to be discarded by
  the optimizer's `optim.freeze` and counted in grad_norm)."""
  patterns = frozen_patterns(config)

  def model_fn(params):
    if patterns:
      mask = optim.frozen_mask(params, patterns)
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, mask)
    return model_from_params(graphdef, params)

  return model_fn


def _loss_fn(config, graphdef):
  model_fn = _model_fn(config, graphdef)

  def loss_fn(params, batch):
    model = model_fn(params)
    outputs = model(batch)
    loss, terms = losses.total_loss(outputs, batch, config.loss)
    return loss, dict(terms, temperature=outputs["temperature"])

  return loss_fn


def check_batch_size(config, mesh) -> None:
  """Raises sharding.MeshError unless config.data.global_batch_size splits into the mesh's
  batch shards x config.train.grad_accum_steps micro-batches: before the trainer restores
  or builds any state (minutes on a pod), not at the first step's compile."""
  shards = sharding.batch_ways(mesh, config.sharding_rules)
  accum = config.train.grad_accum_steps
  global_batch = config.data.global_batch_size
  if global_batch % (shards * accum):
    raise sharding.MeshError(
      f"config.data.global_batch_size={global_batch} is not divisible by {shards} batch shards x "
      f"config.train.grad_accum_steps={accum}"
    )


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


def _merge_micro_batches(x: jax.Array) -> jax.Array:
  """[A, B/A, ...] -> [B, ...], the inverse of `_split_micro_batches` (rows back in order)."""
  y = x.swapaxes(0, 1).reshape(-1, *x.shape[2:])
  return sharding.constrain(y, ("batch",) + (None,) * (x.ndim - 2))


def _micro_batch_parts(outputs: dict, micro_batch: dict) -> dict:
  """A micro-batch's share of the full batch's terms: its caption cross-entropy summed
  over real tokens, and with a VQA head its VQA loss and accuracy (means)."""
  text = micro_batch["text"]
  caption_sum, _ = losses.captioning_loss_sum(outputs["logits"], text["labels"], text["mask"])
  parts = dict(caption=caption_sum)
  if "vqa_logits" in outputs:
    parts["vqa_loss"] = losses.vqa_loss(outputs["vqa_logits"], micro_batch["answer_scores"])
    parts["vqa_accuracy"] = losses.vqa_accuracy(outputs["vqa_logits"], micro_batch["answer_scores"])
  return parts


def _full_batch_terms(loss_config, contrastive, accuracy, temperature, parts, tokens) -> dict:
  """losses.total_loss's terms (and temperature) of the full batch from its A micro-batches:
  the InfoNCE `contrastive` / `accuracy` over all B pairs; `parts` stacked [A] from
  `_micro_batch_parts`: the caption loss is their token sums over the batch's `tokens`,
  the VQA terms the mean of the micro-batches' means (micro-batches of equal size)."""
  cap = jnp.sum(parts["caption"]) / tokens
  terms = dict(contrastive_loss=contrastive, captioning_loss=cap, contrastive_accuracy=accuracy)
  if "vqa_loss" in parts:
    terms.update(vqa_loss=jnp.mean(parts["vqa_loss"]), vqa_accuracy=jnp.mean(parts["vqa_accuracy"]))
  return dict(terms, loss=losses.weighted_total(terms, loss_config), temperature=temperature)


def _real_tokens(batch) -> jax.Array:
  return jnp.maximum(jnp.sum(batch["text"]["mask"].astype(jnp.float32)), 1.0)


def make_gradients(config, graphdef, param_shardings=None):
  """Returns gradients(params, batch) -> (grads, terms): the full-batch loss's gradient.

  With config.train.grad_accum_steps = A > 1 the batch runs as A micro-batches and the
  result is still the gradient of the FULL batch's loss (GradCache, Gao et al. 2021;
  BASIC, Pham et al. 2021):
    1. embed every micro-batch, keeping no activations: image and text embeddings [B, E];
    2. the contrastive loss over all B pairs and its gradient with respect to the
       embeddings and the temperature (cheap: [B, B] logits);
    3. run each micro-batch again, forward and backward, on a surrogate whose gradient
       is the embeddings' cached gradients back-propagated plus its captioning loss's
       share: sum over its real tokens / real tokens of the whole batch (a global
       token mean, not a mean of micro-batch means).
  Pass 1 costs one extra forward of the image encoder and the unimodal decoder. With a
  VQA head the surrogate adds each micro-batch's VQA loss / A (a per-example mean over
  micro-batches of equal size). A video batch has only the video head's per-example
  mean loss: its gradient is the mean of the micro-batches' gradients. The accumulator
  has the parameters' shardings (`param_shardings`, NamedSharding tree).
  terms: those of losses.total_loss, and temperature.
  """
  accum_steps = config.train.grad_accum_steps
  loss_fn = _loss_fn(config, graphdef)
  model_fn = _model_fn(config, graphdef)
  if accum_steps == 1:

    def gradients(params, batch):
      (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
      return grads, terms

    return gradients

  contrastive_weight = config.loss.contrastive_weight
  caption_weight = config.loss.caption_weight
  vqa_weight = config.loss.vqa_weight

  def constrain_like_params(tree):
    if param_shardings is None:
      return tree
    return jax.lax.with_sharding_constraint(tree, param_shardings)

  def embed(params, micro_batch):
    model = model_fn(params)
    image_embedding, _ = model.encode_image(micro_batch["image"])
    text = micro_batch["text"]
    text_embedding, _ = model.encode_text(text["ids"], text["mask"])
    return image_embedding, text_embedding

  def contrastive(params, image_embedding, text_embedding):
    temperature = model_fn(params).temperature()
    loss, accuracy = losses.contrastive_loss(image_embedding, text_embedding, temperature)
    return contrastive_weight * loss, (loss, accuracy, temperature)

  def mean_gradients(params, batch):
    """The gradient of a loss that is a mean over examples: the micro-batches' mean."""

    def accumulate(grads, micro_batch):
      (_, terms), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(params, micro_batch)
      return constrain_like_params(jax.tree.map(jnp.add, grads, micro_grads)), terms

    zeros = constrain_like_params(jax.tree.map(jnp.zeros_like, params))
    grads, terms = jax.lax.scan(accumulate, zeros, _split_micro_batches(batch, accum_steps))
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    return grads, jax.tree.map(lambda t: jnp.mean(t, axis=0), terms)

  def gradients(params, batch):
    if "video" in batch:
      return mean_gradients(params, batch)
    micro_batches = _split_micro_batches(batch, accum_steps)
    # 1. Embeddings of every micro-batch; nothing is differentiated, nothing kept.
    image_embedding, text_embedding = jax.lax.map(lambda mb: embed(params, mb), micro_batches)
    # 2. Global InfoNCE; its gradient flows to the temperature here, to the towers in 3.
    (_, (con, accuracy, temperature)), (grads, image_grad, text_grad) = jax.value_and_grad(
      contrastive, argnums=(0, 1, 2), has_aux=True
    )(params, _merge_micro_batches(image_embedding), _merge_micro_batches(text_embedding))
    embedding_grads = _split_micro_batches((image_grad, text_grad), accum_steps)
    tokens = _real_tokens(batch)

    def surrogate(params, micro_batch, image_grad, text_grad):
      outputs = model_fn(params)(micro_batch)
      parts = _micro_batch_parts(outputs, micro_batch)
      value = (
        jnp.sum(outputs["image_embedding"] * image_grad)
        + jnp.sum(outputs["text_embedding"] * text_grad)
        + caption_weight * parts["caption"] / tokens
      )
      if "vqa_loss" in parts:
        value += vqa_weight * parts["vqa_loss"] / accum_steps
      return value, parts

    # 3. Each micro-batch again, forward and backward.
    def accumulate(grads, scanned):
      micro_batch, (image_grad, text_grad) = scanned
      micro_grads, parts = jax.grad(surrogate, has_aux=True)(
        params, micro_batch, image_grad, text_grad
      )
      return constrain_like_params(jax.tree.map(jnp.add, grads, micro_grads)), parts

    grads, parts = jax.lax.scan(
      accumulate, constrain_like_params(grads), (micro_batches, embedding_grads)
    )
    return grads, _full_batch_terms(config.loss, con, accuracy, temperature, parts, tokens)

  return gradients


def make_train_step(config, run: Setup):
  """Returns train_step(state, batch) -> (state, metrics), jitted, state donated.

  Metrics (scalars, left on device): loss, contrastive_loss, captioning_loss,
  contrastive_accuracy, temperature, grad_norm, param_norm, learning_rate (and
  vqa_loss / vqa_accuracy with a VQA head, video_loss / video_accuracy on video batches). With
  config.train.grad_accum_steps = A > 1 the gradient and the losses are the full
  batch's (see `make_gradients`): every example still sees B - 1 negatives.
  """
  optimizer, schedule, state_layout = run.optimizer, run.schedule, run.layout
  gradients = make_gradients(config, state_layout.graphdef, state_layout.shardings["params"])

  def train_step(state, batch):
    params = state["params"]
    grads, terms = gradients(params, batch)
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
  """Returns eval_step(state, batch) -> metrics (losses without an update), jitted.

  With config.train.grad_accum_steps = A > 1 the batch runs as A forward passes, so an
  eval batch needs no more activation memory than a training micro-batch; the terms are
  still the full batch's (one InfoNCE over all B pairs, the caption loss's global token
  mean), as in `make_gradients`.
  """
  accum_steps = config.train.grad_accum_steps
  loss_fn = _loss_fn(config, state_layout.graphdef)
  model_fn = _model_fn(config, state_layout.graphdef)

  def micro_batched(params, batch):
    micro_batches = _split_micro_batches(batch, accum_steps)
    if "video" in batch:  # per-example means over micro-batches of equal size
      terms = jax.lax.map(lambda mb: loss_fn(params, mb)[1], micro_batches)
      return jax.tree.map(lambda t: jnp.mean(t, axis=0), terms)

    def forward(micro_batch):
      outputs = model_fn(params)(micro_batch)
      embeddings = outputs["image_embedding"], outputs["text_embedding"]
      return embeddings, _micro_batch_parts(outputs, micro_batch)

    (image_embedding, text_embedding), parts = jax.lax.map(forward, micro_batches)
    temperature = model_fn(params).temperature()
    con, accuracy = losses.contrastive_loss(
      _merge_micro_batches(image_embedding), _merge_micro_batches(text_embedding), temperature
    )
    return _full_batch_terms(config.loss, con, accuracy, temperature, parts, _real_tokens(batch))

  def eval_step(state, batch):
    if accum_steps > 1:
      return micro_batched(state["params"], batch)
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
