"""The optimizer state's layout is the same whatever grad_clip_norm and weight_decay are:
a resume may turn gradient clipping on and weight decay off (both were refused: the
chain's elements, and so the state's entry names, depended on them). Checkpoints written
in the old layouts are read into today's, and training continues exactly as the old
chain would have continued it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_runs import tiny_config

from coca_jax import checkpoint, optim
from coca_jax import state as state_lib
from coca_jax.models import coca

pytestmark = pytest.mark.slow  # eager optimizer updates of the tiny model: ~80 s


def old_chain(config) -> optax.GradientTransformation:
  """make_optimizer as it was before the layout was fixed (reference for old checkpoints):
  clip_by_global_norm an element of its own where grad_clip_norm > 0, the weight decay
  element only where weight_decay > 0; the same transforms otherwise."""
  cfg = config.optim
  multiplier = optim.lr_multiplier(cfg, config.train.steps)

  def schedule(step):
    return cfg.lr * multiplier(step)

  def second_moment_decay(step, exponent):
    return jnp.minimum(1.0 - (step + 1.0) ** -exponent, cfg.beta2)

  parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
  parts += [
    optax.scale_by_factored_rms(
      factored=True,
      decay_rate=optim.SECOND_MOMENT_EXPONENT,
      min_dim_size_to_factor=cfg.factored_min_dim,
      decay_rate_fn=second_moment_decay,
    ),
    optim.clip_by_layer_rms(cfg.update_clip),
    optax.ema(cfg.beta1, debias=False),
    optax.scale_by_learning_rate(schedule),
  ]
  if cfg.weight_decay > 0:
    mask = lambda p: optim.decay_mask(p, tuple(cfg.no_decay))  # noqa: E731
    parts.append(optim.decoupled_weight_decay(cfg.weight_decay, schedule, mask))
  temperature = coca.log_inv_temperature_range(config.model.temperature)
  parts.append(optim.keep_in_range("log_inv_temperature", *temperature))
  chain = optax.chain(*parts)
  return optim.freeze(chain, _params(config), state_lib.frozen_patterns(config))


def _params(config):
  return jax.eval_shape(state_lib._init_fn(config.model, optax.identity(), 0))["params"]


def config_with(clip: float, decay: float, frozen=()):
  c = tiny_config(6, optim=dict(grad_clip_norm=clip, weight_decay=decay, lr=0.05))
  c.train.frozen = frozen
  return c


def gradients(params, seed):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return tree.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def train(optimizer, params, opt_state, seeds):
  """Updates of `optimizer` on the gradients of `seeds` (one step each)."""
  for seed in seeds:
    updates, opt_state = optimizer.update(gradients(params, seed), opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, opt_state


def save(workdir, config, params, opt_state, step):
  mngr = checkpoint.manager(str(workdir), config.train)
  checkpoint.save(mngr, dict(params=params, opt_state=opt_state, step=np.int32(step)), {})
  mngr.wait_until_finished()
  mngr.close()


def restore(workdir, config, devices=None):
  run = state_lib.setup(config, devices)
  mngr = checkpoint.manager(str(workdir), config.train, read_only=True)
  state, _ = checkpoint.restore(mngr, run.layout)
  return run, state


def assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


@pytest.mark.parametrize(
  "clip,decay,frozen",
  [(0.5, 0.01, ()), (0.0, 0.0, ()), (0.5, 0.0, ("vision",))],
)
def test_old_layouts_resume_as_the_old_chain_continues(tmp_path, clip, decay, frozen):
  """Two updates of the old chain, saved; restored by today's code onto a mesh whose
  device order is a permutation (as a TPU slice's is); its third update is the old
  chain's third (clipping binding: gradient norms are ~30, the clip 0.5)."""
  config = config_with(clip, decay, frozen)
  state = state_lib.create(config, state_lib.setup(config))
  old = old_chain(config)
  params, opt_state = train(old, state["params"], old.init(state["params"]), [1, 2])
  save(tmp_path, config, params, opt_state, step=2)
  permuted = [jax.devices()[i] for i in (5, 2, 7, 0, 3, 6, 1, 4)]
  run, restored = restore(tmp_path, config, permuted)
  assert_close(restored["params"], params)
  expected, _ = train(old, params, opt_state, [3])
  got, _ = train(run.optimizer, restored["params"], restored["opt_state"], [3])
  assert_close(got, expected)


def test_a_resume_turns_clipping_on_and_weight_decay_off(tmp_path):
  """The state of a run without clipping and with weight decay restores into a config
  with clipping and without decay (it had been 'checkpoint step 2 holds entries the
  config has no place for'), every optimizer moment as saved."""
  before, after = config_with(0.0, 0.01), config_with(0.5, 0.0)
  run = state_lib.setup(before)
  state = state_lib.create(before, run)
  params, opt_state = train(run.optimizer, state["params"], state["opt_state"], [1, 2])
  save(tmp_path, before, params, opt_state, step=2)
  run_after, restored = restore(tmp_path, after)
  assert_close(restored["opt_state"], opt_state)
  # The decay's count went on while it was off, so turning it on again finds the step.
  _, resumed = train(run_after.optimizer, restored["params"], restored["opt_state"], [3])
  counts = resumed[optim.CHAIN.index("lr")].count, resumed[optim.CHAIN.index("weight_decay")].count
  assert [int(c) for c in counts] == [3, 3]
