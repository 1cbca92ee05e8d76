"""Gradient accumulation is exact: A micro-batches give the full batch's gradient and losses
(pretraining, with a VQA head, and video batches).

The reference is the same step with A = 1 on the same global batch, whose losses are
themselves checked against NumPy in test_losses.py and test_sharding.py. Tolerance, for
float32 sums taken in another order: the whole gradient to 1e-5 of its norm; each leaf to
1e-3 of its own largest entry (at initialisation the poolers' and cross-attention's
query/key gradients are sums of cancelling terms: merely permuting the batch rows moves
them by 2.5e-4 of their scale); every updated parameter to 1e-5 absolute (parameters are
O(1); the first Adafactor update moves an entry by up to lr = 8e-4).
"""

import jax
import numpy as np
import optax
import pytest

from coca_jax import sharding
from coca_jax import state as state_lib
from coca_jax import step as step_lib
from coca_jax.data import synthetic
from configs import tiny

BATCH = 32
ACCUM = 4


def config_with(accum_steps: int, mesh_shape):
  c = tiny.get_config()
  c.data.global_batch_size = BATCH
  c.train.grad_accum_steps = accum_steps
  c.loss.contrastive_weight = 1.0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
  return c


def real_batch(config) -> dict:
  """Synthetic rows with captions of 0..6 tokens: real padding, unequal token counts."""
  rows = synthetic.batch(0, 0, range(BATCH), 16, config.data.max_text_len, 64)
  return rows


def grads_metrics_params(config, batch, train_step: bool):
  """(gradient, loss terms, updated parameters or None) from the initial state.

  With `train_step` the terms and parameters come from the trainer's jitted step (and
  its metrics), else only the gradient function runs (one compile less per config).
  """
  devices = jax.devices()[: config.mesh.data * config.mesh.fsdp * config.mesh.tensor]
  run = state_lib.setup(config, devices)
  gradients = step_lib.make_gradients(config, run.layout.graphdef, run.layout.shardings["params"])
  grad_step = step_lib._jit(
    config, lambda state, b: gradients(state["params"], b), run.layout, donate=False
  )
  global_rows = sharding.global_batch(batch, run.mesh, config.sharding_rules)
  grads, terms = jax.device_get(grad_step(state_lib.create(config, run), global_rows))
  if not train_step:
    return grads, terms, None
  state, metrics = step_lib.make_train_step(config, run)(state_lib.create(config, run), global_rows)
  return grads, jax.device_get(metrics), jax.device_get(state["params"])


def numpy_contrastive_loss(config, params, batch) -> float:
  """Symmetric InfoNCE (Eq. 1) over all B pairs, in NumPy, from the model's embeddings."""
  model = state_lib.model_from_params(
    state_lib.setup(config, jax.devices()[:1]).layout.graphdef, params
  )
  image_embedding, _ = model.encode_image(batch["image"])
  text_embedding, _ = model.encode_text(batch["text"]["ids"], batch["text"]["mask"])
  logits = np.asarray(image_embedding) @ np.asarray(text_embedding).T / float(model.temperature())
  diag = np.diag(logits)
  rows = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1) - diag
  cols = np.log(np.exp(logits - logits.max(0)).sum(0)) + logits.max(0) - diag
  return rows.mean() + cols.mean()  # Eq. 1: both directions summed


@pytest.mark.parametrize(
  "mesh_shape",
  # Both slow (~50 s and more): the quick loop keeps its 3-minute budget.
  [
    pytest.param((1, 1, 1), marks=pytest.mark.slow),
    pytest.param((2, 4, 1), marks=pytest.mark.slow),
  ],
  ids=["1_device", "8_devices"],
)
def test_accumulated_gradient_equals_the_full_batch_gradient(mesh_shape):
  full_config, accum_config = config_with(1, mesh_shape), config_with(ACCUM, mesh_shape)
  batch = real_batch(full_config)
  # The micro-batches (rows r % A) hold different numbers of real tokens, so a mean of
  # micro-batch caption means would differ from the global token mean.
  mask = batch["text"]["mask"]
  tokens_per_micro_batch = [int(mask[i::ACCUM].sum()) for i in range(ACCUM)]
  assert len(set(tokens_per_micro_batch)) > 1, tokens_per_micro_batch

  # The trainer's step (updated parameters, grad_norm) on the mesh, where it is slow.
  train_step = mesh_shape != (1, 1, 1)
  full_grads, full_metrics, full_params = grads_metrics_params(full_config, batch, train_step)
  grads, metrics, params = grads_metrics_params(accum_config, batch, train_step)

  def close_to_scale(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * max(float(np.abs(b).max()), 1e-12))

  jax.tree.map(close_to_scale, grads, full_grads)
  difference = jax.tree.map(lambda a, b: a - b, grads, full_grads)
  assert optax.tree.norm(difference) < 1e-5 * optax.tree.norm(full_grads)
  assert abs(float(grads["log_inv_temperature"])) > 0  # the temperature does learn
  for name in ("loss", "contrastive_loss", "captioning_loss", "contrastive_accuracy"):
    np.testing.assert_allclose(metrics[name], full_metrics[name], rtol=1e-5, err_msg=name)
  if train_step:
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), params, full_params
    )
    np.testing.assert_allclose(metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-4)
  # And independently of the A = 1 step: InfoNCE over all 32 pairs, not 8 per micro-batch.
  one_device = config_with(ACCUM, (1, 1, 1))
  initial = state_lib.create(one_device, state_lib.setup(one_device, jax.devices()[:1]))
  want = numpy_contrastive_loss(one_device, jax.device_get(initial["params"]), batch)
  np.testing.assert_allclose(metrics["contrastive_loss"], want, rtol=1e-5)


def eval_terms_and_temp_memory(config, batch) -> tuple[dict, int]:
  """The eval step's terms on the initial state (one device) and its compiled temp bytes."""
  run = state_lib.setup(config, jax.devices()[:1])
  eval_step = step_lib.make_eval_step(config, run.layout)
  global_rows = sharding.global_batch(batch, run.mesh, config.sharding_rules)
  with jax.set_mesh(run.mesh):
    compiled = eval_step.jitted.lower(run.layout.abstract, global_rows).compile()
  terms = jax.device_get(compiled(state_lib.create(config, run), global_rows))
  return terms, compiled.memory_analysis().temp_size_in_bytes


def without_accumulation(config):
  full = config.copy_and_resolve_references()
  full.train.grad_accum_steps = 1
  return full


def assert_same_gradient_and_terms(config, batch, names):
  """A micro-batches vs the same config with A = 1, on one device (tolerances above):
  the gradient and the train and eval steps' terms."""
  full = without_accumulation(config)
  full_grads, full_terms, _ = grads_metrics_params(full, batch, train_step=False)
  grads, terms, _ = grads_metrics_params(config, batch, train_step=False)
  difference = jax.tree.map(lambda a, b: a - b, grads, full_grads)
  assert optax.tree.norm(difference) < 1e-5 * optax.tree.norm(full_grads)
  eval_terms, _ = eval_terms_and_temp_memory(config, batch)
  for name in names:
    np.testing.assert_allclose(terms[name], full_terms[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(eval_terms[name], full_terms[name], rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_eval_runs_micro_batches_and_gives_the_full_batch_terms():
  """Eval with A micro-batches needs a training micro-batch's activation memory, not the
  full batch's (it ran all B at once), and its InfoNCE is still over all B pairs."""
  config = config_with(ACCUM, (1, 1, 1))
  config.model.text.vocab_size = 4096  # the [B, T, V] logits dominate, as at scale
  batch = real_batch(config)
  terms, memory = eval_terms_and_temp_memory(config, batch)
  full_terms, full_memory = eval_terms_and_temp_memory(without_accumulation(config), batch)
  for name in ("loss", "contrastive_loss", "captioning_loss", "contrastive_accuracy"):
    np.testing.assert_allclose(terms[name], full_terms[name], rtol=1e-5, err_msg=name)
  initial = state_lib.create(config, state_lib.setup(config, jax.devices()[:1]))
  want = numpy_contrastive_loss(config, jax.device_get(initial["params"]), batch)
  np.testing.assert_allclose(terms["contrastive_loss"], want, rtol=1e-5)
  assert memory < 0.5 * full_memory, (memory, full_memory)


@pytest.mark.slow
def test_accumulation_with_a_vqa_head_equals_the_full_batch():
  config = config_with(ACCUM, (1, 1, 1))
  config.model.vqa.num_answers = 5
  batch = real_batch(config)
  rng = np.random.default_rng(0)
  batch["answer_scores"] = np.minimum(rng.integers(0, 4, size=(BATCH, 5)) / 3, 1).astype(np.float32)
  names = ("loss", "contrastive_loss", "captioning_loss", "vqa_loss", "vqa_accuracy")
  assert_same_gradient_and_terms(config, batch, names)


@pytest.mark.slow
def test_accumulation_of_video_batches_equals_the_full_batch():
  config = config_with(ACCUM, (1, 1, 1))
  config.model.video.num_classes = 3
  size = config.model.vision.image_size
  rng = np.random.default_rng(0)
  batch = dict(
    video=rng.normal(size=(BATCH, 2, size, size, 3)).astype(np.float32),
    label=rng.integers(0, 3, size=BATCH).astype(np.int32),
  )
  assert_same_gradient_and_terms(config, batch, ("loss", "video_loss", "video_accuracy"))
