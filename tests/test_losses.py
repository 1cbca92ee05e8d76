"""Losses against an independent NumPy implementation and hand-made cases."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from coca_jax import losses
from coca_jax.models import coca
from configs import tiny


def np_log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def np_contrastive(img, txt, tau):
  logits = img @ txt.T / tau
  n = len(img)
  i2t = -np_log_softmax(logits, 1)[np.arange(n), np.arange(n)].mean()
  t2i = -np_log_softmax(logits, 0)[np.arange(n), np.arange(n)].mean()
  return i2t + t2i  # the paper's Eq. 1: both directions summed


def normalized(rng, shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(0)
  img, txt = normalized(rng, (6, 5)), normalized(rng, (6, 5))
  loss, acc = losses.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), 0.07)
  np.testing.assert_allclose(
    float(loss), np_contrastive(img.astype(np.float64), txt.astype(np.float64), 0.07), rtol=1e-5
  )
  expected_acc = np.mean(np.argmax(img @ txt.T, 1) == np.arange(6))
  assert float(acc) == expected_acc


def test_contrastive_logits_ask_for_full_float32_precision():
  """Where a float32 dot defaults to bfloat16 passes (TPUs), the logits' would; CPUs
  ignore the setting, so it is read from the traced computation."""
  img = jnp.zeros((4, 8), jnp.float32)
  dots = [
    eqn.params["precision"]
    for eqn in jax.make_jaxpr(losses.contrastive_logits)(img, img, 0.07).eqns
    if eqn.primitive.name == "dot_general"
  ]
  assert dots == [(jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)]


def test_identical_pairs_at_small_temperature_give_near_zero_loss():
  rng = np.random.default_rng(1)
  emb = normalized(rng, (8, 16))
  loss, acc = losses.contrastive_loss(jnp.asarray(emb), jnp.asarray(emb), 0.005)
  assert float(loss) < 1e-3 and float(acc) == 1.0


def test_captioning_loss_matches_numpy_and_ignores_masked_tokens():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, size=(3, 5)).astype(np.int32)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], np.int32)
  nll = -np.take_along_axis(np_log_softmax(logits.astype(np.float64), -1), labels[..., None], -1)[
    ..., 0
  ]
  expected = (nll * mask).sum() / mask.sum()
  got = losses.captioning_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  # Garbage in masked positions changes nothing.
  logits2 = np.where(mask[..., None] == 1, logits, 1e3 * rng.normal(size=logits.shape)).astype(
    np.float32
  )
  labels2 = np.where(mask == 1, labels, 3)
  got2 = losses.captioning_loss(jnp.asarray(logits2), jnp.asarray(labels2), jnp.asarray(mask))
  np.testing.assert_allclose(float(got2), float(got), rtol=1e-6)


def test_total_loss_weights_the_terms():
  """L = w_con * InfoNCE + w_cap * caption loss, both terms by NumPy; weights other than
  the paper's 1 and 2, so that a weight left out shows."""
  rng = np.random.default_rng(3)
  img, txt = normalized(rng, (4, 8)), normalized(rng, (4, 8))
  logits = rng.normal(size=(4, 6, 9)).astype(np.float32)
  labels = rng.integers(0, 9, (4, 6))
  mask = np.array([[1] * 6, [1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], np.int32)
  outputs = dict(
    image_embedding=jnp.asarray(img),
    text_embedding=jnp.asarray(txt),
    logits=jnp.asarray(logits),
    temperature=jnp.float32(0.07),
  )
  batch = dict(text=dict(labels=jnp.asarray(labels), mask=jnp.asarray(mask)))
  cfg = ml_collections.ConfigDict(dict(contrastive_weight=0.3, caption_weight=1.7))
  loss, _ = losses.total_loss(outputs, batch, cfg)
  nll = -np.take_along_axis(np_log_softmax(logits.astype(np.float64), -1), labels[..., None], -1)
  caption = (nll[..., 0] * mask).sum() / mask.sum()
  contrastive = np_contrastive(img.astype(np.float64), txt.astype(np.float64), 0.07)
  np.testing.assert_allclose(float(loss), 0.3 * contrastive + 1.7 * caption, rtol=1e-5)


@pytest.mark.slow  # ~15 s of compiles
def test_one_gradient_step_lowers_the_loss():
  config = tiny.get_config()
  model = coca.build(config.model)
  rng = np.random.default_rng(4)
  ids = rng.integers(3, 64, size=(8, 8)).astype(np.int32)
  batch = dict(
    image=jnp.asarray(rng.normal(size=(8, 16, 16, 3)).astype(np.float32)),
    text=dict(
      ids=jnp.asarray(ids),
      labels=jnp.asarray(np.roll(ids, -1, 1)),
      mask=jnp.ones((8, 8), jnp.int32),
    ),
  )
  graphdef, params = nnx.split(model)

  def loss_fn(p):
    return losses.total_loss(nnx.merge(graphdef, p)(batch), batch, config.loss)[0]

  loss0, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  optimizer = optax.sgd(0.05)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  loss1 = jax.jit(loss_fn)(optax.apply_updates(params, updates))
  assert float(loss1) < float(loss0)


def test_contrastive_loss_is_eq_1_by_hand():
  """Eq. 1 of the paper sums both directions: with every logit equal (identical texts),
  each direction's cross-entropy is log B, so L_con = 2 log B (open_clip's mean: log B)."""
  emb = np.tile(np.array([[0.6, 0.8]], np.float32), (4, 1))
  loss, _ = losses.contrastive_loss(jnp.asarray(emb), jnp.asarray(emb), 0.07)
  np.testing.assert_allclose(float(loss), 2 * np.log(4), rtol=1e-6)
