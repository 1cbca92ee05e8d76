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

Update clipping is Adafactor's (Shazeer & Stern 2018, Section 6): each parameter's
update is divided by max(1, RMS(update) / update_clip). Our transformer stacks keep
their layers in one scanned parameter with a leading `layers` axis, so a stacked
parameter is clipped layer by layer, exactly as unstacked Adafactor clips each layer's
own parameter; one RMS over the whole stack would let one layer's large update shrink
every other layer's.

The learnable temperature is clamped here, after each update, into its configured
range (as CLIP clamps its logit scale), not clipped in the forward pass: a forward
clip's gradient is zero past the bound, so momentum could park the parameter there.

Frozen parameters (`config.train.frozen`, e.g. the image encoder when finetuning) are
split off with `optax.partition`: they get `optax.set_to_zero()` updates and no
optimizer state, and the rest of the chain (weight decay, clipping) never sees them.
"""

import re

import jax
import jax.numpy as jnp
import optax

from coca_jax import config as config_lib
from coca_jax import params as params_lib

SECOND_MOMENT_EXPONENT = 0.8  # Adafactor's decay 1 - t^-0.8 (Shazeer & Stern 2018)
# make_optimizer's chain, in order; a state path names an element by its index
# (opt_state/<i>/...), and these are the same whatever the settings (`legacy_names`).
CHAIN = ("second_moment", "clip_by_layer_rms", "momentum", "lr", "weight_decay", "keep_in_range")


# config.optim key -> (whether a value is in range, the range in words).
RANGES = {
  "lr": (lambda v: v > 0, "> 0"),
  "warmup_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
  "end_lr_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
  "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
  "beta2": (lambda v: 0 < v <= 1, "in (0, 1]"),
  "weight_decay": (lambda v: v >= 0, ">= 0 (0: off)"),
  "update_clip": (lambda v: v >= 0, ">= 0 (0: off)"),
  "grad_clip_norm": (lambda v: v >= 0, ">= 0 (0: off)"),
}


def check(optim_config) -> None:
  """ValueError naming the key of an optimizer setting outside its range (RANGES): a
  negative lr would train by gradient ascent, a warmup fraction above 1 never reach the
  peak, an end fraction above 1 climb past it, beta1 >= 1 diverge; a negative weight
  decay or clipping threshold had meant "off" silently."""
  for key, (in_range, words) in RANGES.items():
    config_lib.check_number(optim_config[key], f"optim.{key}", in_range, words)


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


def check_no_decay(params, no_decay: tuple[str, ...]) -> None:
  """ValueError naming config.optim.no_decay for a pattern that no path component of
  `params` (all of them, frozen ones included) contains, but config.NO_DECAY's, written
  for every layout, or for an empty one (in every name): PyTorch's "LayerNorm.weight"
  matched nothing here, and every norm scale and the temperature were decayed, silently."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = {name for path, _ in flat for name in params_lib.path_names(path)}
  for pattern in no_decay:
    if pattern and (pattern in config_lib.NO_DECAY or any(pattern in n for n in names)):
      continue
    problem = "is in no parameter's name" if pattern else "is empty: it exempts every parameter"
    raise ValueError(
      f"config.optim.no_decay pattern {pattern!r} {problem}; the patterns are substrings "
      "of path components ('bias', 'scale' of the norms, 'pos_embedding'); names here: "
      f"{', '.join(sorted(names)[:12])}, ..."
    )


def decay_mask(params, no_decay: tuple[str, ...]):
  """True for parameters that get weight decay: no path component contains a no_decay
  substring (`check_no_decay` checks the patterns once, against every parameter: inside
  `freeze`'s partition this sees the trained ones alone)."""

  def wants_decay(path, _):
    names = params_lib.path_names(path)
    return not any(pattern in name for name in names for pattern in no_decay)

  return jax.tree_util.tree_map_with_path(wants_decay, params)


def is_stacked(path) -> bool:
  """Whether the parameter at `path` (a pytree key path) has a leading layers axis.

  `models.layers.LayerStack` keeps its nnx.vmap-ed blocks (out_axes=0) in the attribute
  `layers`, so a stacked parameter's path reads `<stack>/layers/<block's path>` and
  axis 0 is the layer axis (logical name "layers"); no other module or parameter is
  named `layers`. tests/test_optim.py checks this against the logical axis names of
  the real model.
  """
  return any(getattr(k, "key", None) == "layers" for k in path)


def clip_by_layer_rms(threshold: float) -> optax.GradientTransformation:
  """Adafactor's update clipping: update / max(1, RMS(update) / threshold); threshold 0:
  no clipping (the element stays in the chain: a resume may turn clipping on or off).

  The RMS is per parameter, and per layer for stacked parameters (`is_stacked`): over
  every axis but the leading layers axis, each layer's slice clipped on its own.
  """
  threshold = threshold or float("inf")  # 0 had divided every update by infinity

  def clip(path, update):
    axes = tuple(range(1, update.ndim)) if is_stacked(path) else None
    mean_square = jnp.mean(jnp.square(update.astype(jnp.float32)), axis=axes, keepdims=True)
    divisor = jnp.maximum(1.0, jnp.sqrt(mean_square) / threshold)
    return (update / divisor).astype(update.dtype)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def keep_in_range(name: str, low: float, high: float) -> optax.GradientTransformation:
  """Changes the update of each parameter named `name` so that param + update lies in
  [low, high]: clip(param + update) - param where it would leave the range.

  Runs last in the chain, so `optax.apply_updates` lands the parameter on the bound
  (exactly where the bound's spacing allows it; see below) and never outside.
  """

  def keep(path, update, param):
    if getattr(path[-1], "key", None) != name:
      return update
    new = param + update
    target = jnp.clip(new, low, high)
    update = jnp.where(new == target, update, target - param)
    # target - param is rounded: param + it can miss the bound by half an ulp of the
    # difference, past the bound when |target - param| > |target|. One ulp inwards
    # puts it back in range.
    landed = param + update
    update = jnp.where(landed > high, jnp.nextafter(update, -jnp.inf), update)
    return jnp.where(landed < low, jnp.nextafter(update, jnp.inf), update)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(f"keep_in_range({name!r}) needs the params in optimizer.update")
    return jax.tree_util.tree_map_with_path(keep, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


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
    if rate > 0:  # rate 0 keeps its step count: a resume may turn the decay on
      factor = rate * learning_rate(state.count)
      updates = jax.tree.map(
        lambda u, p, m: u - factor * p if m else u,
        updates,
        params,
        mask(params) if callable(mask) else mask,
      )
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def after_global_norm_clip(
  max_norm: float, transform: optax.GradientTransformation
) -> optax.GradientTransformation:
  """`transform` on the gradients clipped to global norm `max_norm`
  (optax.clip_by_global_norm; 0: not clipped). The state is `transform`'s alone, the same
  with clipping on or off, so that a resume may turn it on (optax.chain would give the
  clipping an element of its own, which shifts the index of every later one)."""
  clip = optax.clip_by_global_norm(max_norm) if max_norm > 0 else optax.identity()

  def update(updates, state, params=None):
    updates, _ = clip.update(updates, clip.init(updates), params)
    return transform.update(updates, state, params)

  return optax.GradientTransformation(transform.init, update)


def make_optimizer(
  optim_config, total_steps: int, log_inv_temperature_range: tuple[float, float]
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, learning-rate schedule) from `config.optim`.

  log_inv_temperature_range: the (low, high) bounds of the model's `log_inv_temperature`
  (`models.coca.log_inv_temperature_range(config.model.temperature)`), kept after every
  update.
  """
  cfg = optim_config
  multiplier = lr_multiplier(cfg, total_steps)

  def schedule(step):
    return cfg.lr * multiplier(step)

  beta2_cap = cfg.beta2

  def second_moment_decay(step, exponent):
    return jnp.minimum(1.0 - (step + 1.0) ** -exponent, beta2_cap)

  # The same elements at the same places (CHAIN) whatever the settings: the state's paths
  # name an element by its place, and a resume may turn clipping or weight decay on or off.
  parts = [
    after_global_norm_clip(
      cfg.grad_clip_norm,
      optax.scale_by_factored_rms(
        factored=True,
        decay_rate=SECOND_MOMENT_EXPONENT,
        min_dim_size_to_factor=cfg.factored_min_dim,
        decay_rate_fn=second_moment_decay,
      ),
    ),
    clip_by_layer_rms(cfg.update_clip),
    optax.ema(cfg.beta1, debias=False),  # momentum on the clipped update
    optax.scale_by_learning_rate(schedule),
    decoupled_weight_decay(
      cfg.weight_decay, schedule, lambda p: decay_mask(p, tuple(cfg.no_decay))
    ),
    keep_in_range("log_inv_temperature", *log_inv_temperature_range),
  ]
  assert len(parts) == len(CHAIN)
  return optax.chain(*parts), schedule


def legacy_names(expected: set, stored: set) -> dict | None:
  """How to read the optimizer state of a checkpoint written before the chain's layout
  was fixed (CHAIN, 2026-12-01). That chain began with optax.clip_by_global_norm's empty
  state where grad_clip_norm > 0 (every later index one higher), and had no weight decay
  element where weight_decay was 0. `expected`, `stored`: the state's entry names (tuples
  of path components) in today's layout and in the checkpoint. Returns {expected name:
  stored name} for the old layout whose names are exactly `stored`, the weight decay's
  step count read from the learning rate's where the checkpoint has none (both count the
  optimizer's updates); None when `stored` is no old layout (or today's)."""
  decay, lr = CHAIN.index("weight_decay"), CHAIN.index("lr")

  def index_at(name) -> int | None:  # where the chain index is in an opt_state name
    if name[0] != "opt_state":
      return None
    return next((at for at, part in enumerate(name) if part.isdigit()), None)

  for shift, had_decay in ((1, True), (0, False), (1, False)):
    mapping = {}
    for name in expected:
      at = index_at(name)
      if at is None:
        mapping[name] = name
        continue
      i = int(name[at])
      if not had_decay and i == decay:
        i = lr
      elif not had_decay and i > decay:
        i -= 1
      mapping[name] = (*name[:at], str(i + shift), *name[at + 1 :])
    if set(mapping.values()) == stored:
      return mapping
  return None


FROZEN, TRAINED = "frozen", "trained"  # the labels of `freeze`'s partition


def _path_name(path) -> str:
  return "/".join(params_lib.path_names(path))


def _matches(pattern: str, name: str) -> bool:
  """re.search of `pattern` in `name`, or a plain substring (also when not a valid regex)."""
  try:
    found = re.search(pattern, name) is not None
  except re.error:
    found = False
  return found or pattern in name


def frozen_mask(params, patterns, key: str = "config.train.frozen"):
  """True for each parameter whose '/'-joined path ("vision/blocks/layers/mlp/up/kernel")
  matches one of `patterns` (regexes or substrings); a pattern matching none is an error,
  and so is an empty one (it matches every path). `key`: the config key the patterns
  come from, named in those errors (config.train.init_exclude uses the same syntax)."""
  names = [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for pattern in patterns:
    if not pattern:  # a substring of every path: `--config.train.frozen=` froze everything
      raise ValueError(
        f"{key}={tuple(patterns)!r} holds an empty pattern, which would match every "
        f"parameter; for none write --{key}='()'"
      )
    if not any(_matches(pattern, name) for name in names):
      tops = sorted({name.split("/")[0] for name in names})
      try:
        re.compile(pattern)
        invalid = ""
      except re.error as e:  # then read as a plain substring, which matched nothing either
        invalid = f" (not a valid regular expression: {e})"
      raise ValueError(
        f"{key} pattern {pattern!r} matches no parameter{invalid}; paths are "
        f"'/'-joined, e.g. {names[0]!r}, under: {', '.join(tops)}"
      )
  return jax.tree_util.tree_map_with_path(
    lambda path, _: any(_matches(p, _path_name(path)) for p in patterns), params
  )


def matching_names(params, patterns, key: str = "config.train.frozen") -> list[str]:
  """The '/'-joined paths of the parameters `patterns` match (`frozen_mask`'s rules and
  errors; frozen or init_exclude patterns, named by `key`), in tree order."""
  mask = frozen_mask(params, patterns, key)
  return [_path_name(p) for p, frozen in jax.tree_util.tree_flatten_with_path(mask)[0] if frozen]


def freeze(optimizer: optax.GradientTransformation, params, patterns):
  """`optimizer` on the parameters not matched by `patterns` (see `frozen_mask`); the
  matched ones get zero updates and hold no optimizer state. No patterns: `optimizer`.

  params: the params tree (arrays or ShapeDtypeStructs) whose structure updates will have.
  """
  if not patterns:
    return optimizer
  labels = jax.tree.map(lambda f: FROZEN if f else TRAINED, frozen_mask(params, patterns))
  return optax.partition({TRAINED: optimizer, FROZEN: optax.set_to_zero()}, labels)


def trained_only(tree, mask):
  """`tree` (params-shaped) with its frozen leaves (`mask` True) replaced by
  optax.MaskedNode: the structure of the params-shaped parts of `freeze`'s state."""
  return jax.tree.map(lambda x, f: optax.MaskedNode() if f else x, tree, mask)
