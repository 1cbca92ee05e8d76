"""Adafactor with momentum, update clipping and decoupled weight decay (Section 4.1).

The paper trains with Adafactor, beta1 = 0.9, beta2 = 0.999 and decoupled weight decay
0.01. Weight decay is decoupled as in AdamW (Loshchilov & Hutter 2019) and PyTorch's
AdamW: it bypasses the gradient and Adafactor's scaling and clipping, and shrinks each
decayed parameter by lr(t) * 0.01 per step. (Scaling by the schedule's multiplier alone,
without the peak lr, would shrink parameters by up to 1% per step: e^-2500 over the
paper's 500k steps, which no run could mean.)

Our reading of beta2 = 0.999, as in "Scaling Vision Transformers" (Zhai et al. 2021):
Adafactor's step-dependent second-moment decay 1 - t^-0.8, capped at 0.999. A
constant 0.999 from step 1 would need bias correction (Adafactor has none): the
step-dependent rate is Adafactor's own way of averaging the first steps without bias,
and the cap makes the long-run decay the paper's 0.999.
"""

import jax
import jax.numpy as jnp
import optax

SECOND_MOMENT_EXPONENT = 0.8  # Adafactor's decay 1 - t^-0.8 (Shazeer & Stern 2018)


def lr_multiplier(optim_config, total_steps: int) -> optax.Schedule:
  """Schedule in [0, 1]: linear warmup over warmup_fraction, then linear or cosine decay."""
  warmup = int(round(optim_config.warmup_fraction * total_steps))
  decay_steps = max(total_steps - warmup, 1)
  end = optim_config.end_lr_fraction
  if optim_config.decay == "linear":
    decay = optax.linear_schedule(1.0, end, decay_steps)
  elif optim_config.decay == "cosine":
    decay = optax.cosine_decay_schedule(1.0, decay_steps, alpha=end)
  else:
    raise ValueError(f"config.optim.decay={optim_config.decay!r}; use 'linear' or 'cosine'")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), decay], [warmup])


def decay_mask(params, no_decay: tuple[str, ...]):
  """True for parameters that get weight decay: no path component contains a no_decay substring."""

  def wants_decay(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    return not any(pattern in name for name in names for pattern in no_decay)

  return jax.tree_util.tree_map_with_path(wants_decay, params)


def decoupled_weight_decay(
  rate: float, learning_rate: optax.Schedule, mask
) -> optax.GradientTransformation:
  """Adds -rate * learning_rate(step) * param to the (already scaled) update, where masked in.

  optax.add_decayed_weights placed earlier in the chain would be rescaled by Adafactor's
  clipping and momentum; this runs last, on the final update, so the decay is exactly
  rate * lr(t) * param.
  """

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    factor = rate * learning_rate(state.count)
    updates = jax.tree.map(
      lambda u, p, m: u - factor * p if m else u,
      updates,
      params,
      mask(params) if callable(mask) else mask,
    )
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def make_optimizer(
  optim_config, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, learning-rate schedule) from `config.optim`."""
  cfg = optim_config
  multiplier = lr_multiplier(cfg, total_steps)

  def schedule(step):
    return cfg.lr * multiplier(step)

  beta2_cap = cfg.beta2

  def second_moment_decay(step, exponent):
    return jnp.minimum(1.0 - (step + 1.0) ** -exponent, beta2_cap)

  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts += [
    optax.scale_by_factored_rms(
      factored=True,
      decay_rate=SECOND_MOMENT_EXPONENT,
      min_dim_size_to_factor=cfg.factored_min_dim,
      decay_rate_fn=second_moment_decay,
    ),
    optax.clip_by_block_rms(cfg.update_clip),
    optax.ema(cfg.beta1, debias=False),  # momentum on the clipped update
    optax.scale_by_learning_rate(schedule),
  ]
  if cfg.weight_decay > 0:
    parts.append(
      decoupled_weight_decay(
        cfg.weight_decay, schedule, lambda p: decay_mask(p, tuple(cfg.no_decay))
      )
    )
  return optax.chain(*parts), schedule
