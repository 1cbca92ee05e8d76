"""Optimizer: decoupled weight decay, Adafactor's decays, schedule, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from coca_jax import optim
from configs import base, tiny


def optim_config(**overrides):
  c = tiny.get_config().optim
  for k, v in overrides.items():
    c[k] = v
  return c


def test_paper_defaults():
  c = base.get_config()
  assert (c.optim.lr, c.optim.beta1, c.optim.beta2, c.optim.weight_decay) == (
    8e-4,
    0.9,
    0.999,
    0.01,
  )
  assert (c.optim.warmup_fraction, c.optim.decay, c.train.steps) == (0.02, "linear", 500_000)
  assert (c.loss.contrastive_weight, c.loss.caption_weight) == (1.0, 2.0)
  assert c.data.global_batch_size == 65_536


def test_schedule_warmup_then_linear_decay():
  c = optim_config(lr=1.0, warmup_fraction=0.1, decay="linear", end_lr_fraction=0.0)
  _, schedule = optim.make_optimizer(c, total_steps=100)
  np.testing.assert_allclose(
    [schedule(s) for s in (0, 5, 10, 55, 100)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6
  )


def test_decoupled_weight_decay_on_zero_gradient():
  c = optim_config(lr=0.5, warmup_fraction=0.1, weight_decay=0.01, decay="linear")
  total = 100
  optimizer, _ = optim.make_optimizer(c, total)
  params = {"dense": {"kernel": jnp.full((4, 3), 2.0), "bias": jnp.full((3,), 2.0)}}
  state = optimizer.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for step in range(7):
    updates, state = optimizer.update(zeros, state, params)
    new = optax.apply_updates(params, updates)
    lr_mult = min(step / 10, 1.0)  # warmup over 10% of 100 steps; peak lr 0.5
    np.testing.assert_allclose(
      new["dense"]["kernel"], params["dense"]["kernel"] * (1 - 0.5 * lr_mult * 0.01), rtol=1e-6
    )
    np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])  # masked out
    params = new


def test_mask_excludes_biases_norms_and_temperature():
  params = {
    "log_inv_temperature": 1.0,
    "vision": {"norm": {"scale": 1.0, "bias": 1.0}, "blocks": {"mlp": {"up": {"kernel": 1.0}}}},
  }
  mask = optim.decay_mask(params, tiny.get_config().optim.no_decay)
  assert mask == {
    "log_inv_temperature": False,
    "vision": {
      "norm": {"scale": False, "bias": False},
      "blocks": {"mlp": {"up": {"kernel": True}}},
    },
  }


def _find(state, kind):
  return [
    s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind)) if isinstance(s, kind)
  ][0]


@pytest.mark.parametrize("beta2", [0.999, 0.3])
def test_second_moment_decay_and_momentum_follow_the_config(beta2):
  c = optim_config(
    lr=1.0, warmup_fraction=0.0, weight_decay=0.0, beta1=0.9, beta2=beta2, update_clip=1e9
  )
  optimizer, _ = optim.make_optimizer(c, 100)
  params = {"w": jnp.zeros((5,))}  # a vector: not factored
  state = optimizer.init(params)
  g1, g2 = np.full(5, 2.0, np.float32), np.full(5, 3.0, np.float32)
  _, state = optimizer.update({"w": jnp.asarray(g1)}, state, params)
  _, state = optimizer.update({"w": jnp.asarray(g2)}, state, params)
  # Adafactor's decay at the second step is 1 - 2^-0.8 = 0.4257, capped at beta2.
  d = min(1 - 2.0**-0.8, beta2)
  v = d * g1**2 + (1 - d) * g2**2  # first step: decay 0, so v1 = g1^2
  np.testing.assert_allclose(_find(state, optax.FactoredState).v["w"], v, rtol=1e-5)
  u1, u2 = g1 / np.abs(g1), g2 / np.sqrt(v)
  mu = 0.9 * (0.1 * u1) + 0.1 * u2  # momentum beta1 = 0.9, no debiasing
  np.testing.assert_allclose(_find(state, optax.EmaState).ema["w"], mu, rtol=1e-5)


def test_matrices_get_factored_second_moments():
  c = optim_config(factored_min_dim=4)
  optimizer, _ = optim.make_optimizer(c, 10)
  state = optimizer.init({"w": jnp.zeros((6, 8))})
  factored = _find(state, optax.FactoredState)
  assert factored.v_row["w"].shape == (6,) and factored.v_col["w"].shape == (8,)
