"""Optimizer: decoupled weight decay, Adafactor's decays and update clipping, schedule,
the temperature's range, masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from coca_jax import config as config_lib
from coca_jax import losses, optim
from coca_jax.models import coca
from configs import base, tiny

TEMPERATURE_RANGE = coca.log_inv_temperature_range(tiny.get_config().model.temperature)


def optim_config(**overrides):
  c = tiny.get_config().optim
  for k, v in overrides.items():
    c[k] = v
  return c


def make_optimizer(c, total_steps):
  return optim.make_optimizer(c, total_steps, TEMPERATURE_RANGE)


def path_name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


@functools.cache
def base_param_tree():
  """The Base config's parameters (ShapeDtypeStructs, nothing allocated) and their
  logical axis names, as nested dicts."""
  return param_tree(base.get_config().model)


def param_tree(model_config):
  """model_config's parameters (ShapeDtypeStructs) and their logical axis names."""
  model = nnx.eval_shape(lambda: coca.build(model_config))
  params = nnx.state(model, nnx.Param)
  names = jax.tree.map(
    lambda v: v.get_metadata()["out_sharding"],
    params,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return nnx.to_pure_dict(params), nnx.to_pure_dict(names)


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
  _, schedule = make_optimizer(c, total_steps=100)
  np.testing.assert_allclose(
    [schedule(s) for s in (0, 5, 10, 55, 100)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6
  )


def test_decoupled_weight_decay_on_zero_gradient():
  c = optim_config(lr=0.5, warmup_fraction=0.1, weight_decay=0.01, decay="linear")
  total = 100
  optimizer, _ = make_optimizer(c, total)
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


# Every parameter of the model by its own name (the last path component), sorted by
# hand: no decay for biases, norm scales, the temperature, position embeddings and the
# [CLS] embedding; decay for every matrix: kernels, the attention projections, the token
# embedding table and the attentional poolers' learned queries ([Q, D] tables).
NO_DECAY_NAMES = {
  "bias",
  "query_bias",
  "value_bias",
  "out_bias",
  "scale",
  "log_inv_temperature",
  "pos_embedding",
  "cls_embedding",
}
DECAY_NAMES = {"kernel", "query", "key", "value", "out", "token_embedding", "queries"}


def test_weight_decay_mask_on_the_base_model():
  params, _ = base_param_tree()
  mask = optim.decay_mask(params, tuple(base.get_config().optim.no_decay))
  unknown, wrong, seen = [], [], set()

  def check(path, decays):
    name = path_name(path[-1:])
    seen.add(name)
    if name not in NO_DECAY_NAMES | DECAY_NAMES:
      unknown.append(path_name(path))
    elif decays != (name in DECAY_NAMES):
      wrong.append(f"{path_name(path)} ({'decayed' if decays else 'not decayed'})")

  jax.tree_util.tree_map_with_path(check, mask)
  assert not unknown, f"parameters this test does not sort yet: {unknown}"
  assert not wrong, f"weight decay mask is wrong for: {wrong}"
  assert seen == NO_DECAY_NAMES | DECAY_NAMES  # every name above is in the real tree
  for path in ("log_inv_temperature", "vision/pos_embedding", "text/pos_embedding"):
    assert path_name_lookup(mask, path) is False, path
  assert path_name_lookup(mask, "text/cls_embedding") is False
  # Every decayed parameter is a matrix or more (one layer's, for stacks).
  for path, shape in jax.tree_util.tree_leaves_with_path(params):
    if path_name(path[-1:]) in DECAY_NAMES:
      assert shape.ndim - int(optim.is_stacked(path)) >= 2, path_name(path)


def test_no_vector_is_decayed_in_open_clips_layout():
  """The layout switch alone (as `bench open_clip` uses it) leaves every vector, one
  layer's for stacks, undecayed, as open_clip does (its rule: fewer than 2 dimensions):
  the ViT's class token and its position too."""
  c = base.get_config()
  config_lib.open_clip_layout(c.model, vision_width=768, vision_heads=12, pooler_heads=8)
  params, _ = param_tree(c.model)
  mask = optim.decay_mask(params, tuple(c.optim.no_decay))
  decayed_vectors = [
    path_name(path)
    for (path, decays), shape in zip(
      jax.tree_util.tree_leaves_with_path(mask), jax.tree.leaves(params)
    )
    if decays and shape.ndim - int(optim.is_stacked(path)) < 2
  ]
  assert not decayed_vectors
  assert path_name_lookup(mask, "vision/class_embedding") is False


def path_name_lookup(tree, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _find(state, kind):
  return [
    s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind)) if isinstance(s, kind)
  ][0]


@pytest.mark.parametrize("beta2", [0.999, 0.3])
def test_second_moment_decay_and_momentum_follow_the_config(beta2):
  c = optim_config(
    lr=1.0, warmup_fraction=0.0, weight_decay=0.0, beta1=0.9, beta2=beta2, update_clip=1e9
  )
  optimizer, _ = make_optimizer(c, 100)
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
  optimizer, _ = make_optimizer(c, 10)
  state = optimizer.init({"w": jnp.zeros((6, 8))})
  factored = _find(state, optax.FactoredState)
  assert factored.v_row["w"].shape == (6,) and factored.v_col["w"].shape == (8,)


def clip_each_layer(update: np.ndarray, threshold: float) -> np.ndarray:
  """Unstacked Adafactor's clipping, u / max(1, RMS(u) / threshold), layer by layer."""
  return np.stack([u / max(1.0, np.sqrt(np.mean(u**2)) / threshold) for u in update])


def test_update_clipping_is_per_layer_for_stacked_params():
  threshold = 0.5
  rng = np.random.default_rng(0)
  # Layers with update RMS about 0.01, 0.4, 3 and 50: two under the threshold, two over.
  scales = np.array([0.01, 0.4, 3.0, 50.0])[:, None, None]
  stacked = (rng.normal(size=(4, 3, 5)) * scales).astype(np.float32)
  matrix = (rng.normal(size=(3, 5)) * 4.0).astype(np.float32)
  vector = (rng.normal(size=(5,)) * 0.1).astype(np.float32)
  updates = {
    "text": {"unimodal": {"layers": {"mlp": {"kernel": jnp.asarray(stacked)}}}},
    "kernel": jnp.asarray(matrix),
    "bias": jnp.asarray(vector),
  }
  clip = optim.clip_by_layer_rms(threshold)
  clipped, _ = clip.update(updates, clip.init(updates))

  clipped_stack = np.asarray(clipped["text"]["unimodal"]["layers"]["mlp"]["kernel"])
  np.testing.assert_allclose(clipped_stack, clip_each_layer(stacked, threshold), rtol=1e-5)
  layer_rms = np.sqrt(np.mean(clipped_stack**2, axis=(1, 2)))
  np.testing.assert_allclose(layer_rms[2:], threshold, rtol=1e-5)  # each clipped to 0.5
  np.testing.assert_array_equal(clipped_stack[:2], stacked[:2])  # untouched
  # Unstacked parameters: one RMS over the whole parameter, as before (optax's).
  matrix_rms = np.sqrt(np.mean(matrix.astype(np.float64) ** 2))
  np.testing.assert_allclose(clipped["kernel"], matrix * threshold / matrix_rms, rtol=1e-5)
  np.testing.assert_array_equal(clipped["bias"], vector)  # RMS about 0.1: untouched
  block, _ = optax.clip_by_block_rms(threshold).update(updates, optax.EmptyState())
  np.testing.assert_allclose(clipped["kernel"], block["kernel"], rtol=1e-6)
  np.testing.assert_allclose(clipped["bias"], block["bias"], rtol=1e-6)


def test_update_clip_zero_turns_clipping_off():
  """config.optim.update_clip=0 (as grad_clip_norm=0 means "off") divided every update by
  infinity: the run trained nothing, and exited 0 (review helper-85)."""
  updates = {"kernel": np.full((4, 3), 5.0, np.float32), "bias": np.arange(3.0, dtype=np.float32)}
  clip = optim.clip_by_layer_rms(0.0)
  clipped, _ = clip.update(updates, clip.init(updates))
  np.testing.assert_array_equal(clipped["kernel"], updates["kernel"])
  np.testing.assert_array_equal(clipped["bias"], updates["bias"])


def test_optimizer_clips_each_layer_of_a_stack():
  """First Adafactor step, unfactored: second-moment decay 0, so the scaled update is
  sign(gradient) (0 where the gradient is 0). Layer 0 has RMS 1 and is clipped to 0.5;
  layer 1 (one nonzero of 20) has RMS 0.22 and is not clipped."""
  c = optim_config(
    lr=1.0, warmup_fraction=0.0, weight_decay=0.0, beta1=0.9, update_clip=0.5, factored_min_dim=99
  )
  optimizer, _ = make_optimizer(c, 100)
  stacked_grad = np.zeros((2, 4, 5), np.float32)
  stacked_grad[0] = -3.0
  stacked_grad[1, 2, 3] = 7.0
  grads = {
    "vision": {"blocks": {"layers": {"kernel": jnp.asarray(stacked_grad)}}},
    "kernel": jnp.full((4, 5), 2.0),
  }
  params = jax.tree.map(jnp.zeros_like, grads)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  clipped = clip_each_layer(np.sign(stacked_grad), 0.5)
  assert clipped[0, 0, 0] == -0.5 and clipped[1, 2, 3] == 1.0
  # Momentum 0.9 without debiasing keeps 0.1 of the first update; lr 1, descent.
  stacked_update = updates["vision"]["blocks"]["layers"]["kernel"]
  np.testing.assert_allclose(stacked_update, -0.1 * clipped, rtol=1e-6)
  np.testing.assert_allclose(updates["kernel"], np.full((4, 5), -0.1 * 0.5), rtol=1e-6)


def test_stacked_params_are_those_with_a_layers_axis():
  """`optim.is_stacked` (a "layers" key in the path) agrees with the real model's logical
  axis names: stacked exactly where axis 0 is named "layers"."""
  params, names = base_param_tree()
  wrong = []

  def check(path, axis_names):
    layers_axis = len(axis_names) > 0 and axis_names[0] == "layers"
    if optim.is_stacked(path) != layers_axis or "layers" in axis_names[1:]:
      wrong.append(f"{path_name(path)} {axis_names}")

  jax.tree_util.tree_map_with_path(check, names, is_leaf=lambda x: isinstance(x, tuple))
  assert not wrong, f"is_stacked disagrees with the logical axis names of: {wrong}"
  stacked = [p for p, _ in jax.tree_util.tree_leaves_with_path(params) if optim.is_stacked(p)]
  assert len(stacked) == 15 + 15 + 24  # vision blocks, unimodal and multimodal layers


def tiny_model_parts(config):
  """(graphdef, params) of the tiny model: zeros but for the temperature (its init);
  no random initialisation, which takes seconds here."""
  abstract = nnx.eval_shape(lambda: coca.build(config.model))
  graphdef, params = nnx.split(abstract, nnx.Param)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.to_pure_dict(params))
  params["log_inv_temperature"] = jnp.float32(np.log(1 / config.model.temperature.init))
  return graphdef, params


@pytest.mark.slow  # ~5 s
def test_update_that_would_leave_the_range_stops_at_the_bound():
  config = tiny.get_config()
  graphdef, initial = tiny_model_parts(config)
  low, high = coca.log_inv_temperature_range(config.model.temperature)
  assert (low, high) == (0.0, pytest.approx(np.log(100.0)))  # tau in [0.01, 1]
  # lr 100: a step moves the scalar by about 100 * 0.1 (momentum) = 10, out of [0, 4.6].
  c = optim_config(lr=100.0, warmup_fraction=0.0, weight_decay=0.0)
  optimizer, _ = optim.make_optimizer(c, 100, (low, high))
  params, state = initial, optimizer.init(initial)

  @jax.jit
  def step(params, state, temperature_grad):
    grads = jax.tree.map(jnp.zeros_like, params)
    grads["log_inv_temperature"] = jnp.float32(temperature_grad)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, state = step(params, state, -1.0)  # descent raises log(1/tau): tau falls
  assert params["log_inv_temperature"] == np.float32(high)
  tau = nnx.merge(graphdef, params).temperature()
  np.testing.assert_allclose(float(tau), 0.01, rtol=1e-6)
  params, state = step(params, state, 1.0)  # back inside: parked on the bound, not stuck
  assert low < params["log_inv_temperature"] < high
  params, state = step(params, state, 1.0)  # momentum now points down, past the low bound
  assert params["log_inv_temperature"] == np.float32(low)
  # Every other parameter had zero gradient and stays exactly where it was.
  del params["log_inv_temperature"], initial["log_inv_temperature"]
  jax.tree.map(np.testing.assert_array_equal, params, initial)


@pytest.mark.parametrize("temperature_range", [(0.01, 1.0), (0.02, 5.0), (1e-3, 50.0)])
def test_keep_in_range_never_leaves_the_range(temperature_range):
  """Many parameter values and updates, also ranges across zero, where
  param + (bound - param) is not always the bound in float32."""
  t_min, t_max = temperature_range
  low, high = np.float32(np.log(1 / t_max)), np.float32(np.log(1 / t_min))
  rng = np.random.default_rng(0)
  param = rng.uniform(low, high, 100_000).astype(np.float32)
  update = (rng.normal(size=param.shape) * (high - low)).astype(np.float32)
  keep = optim.keep_in_range("log_inv_temperature", float(low), float(high))
  params = {"log_inv_temperature": jnp.asarray(param), "other": jnp.asarray(param)}
  updates = {"log_inv_temperature": jnp.asarray(update), "other": jnp.asarray(update)}
  kept, _ = keep.update(updates, keep.init(params), params)
  new = np.asarray(optax.apply_updates(params, kept)["log_inv_temperature"])

  assert low <= new.min() and new.max() <= high
  inside = (param + update >= low) & (param + update <= high)
  assert 0.1 < inside.mean() < 0.9
  kept_update = np.asarray(kept["log_inv_temperature"])
  np.testing.assert_array_equal(kept_update[inside], update[inside])  # untouched in range
  bound = np.where(param + update < low, low, high)[~inside]
  np.testing.assert_allclose(new[~inside], bound, rtol=0, atol=1e-6)
  if low >= 0:  # e.g. the paper's [0, log 100]: exactly on the bound
    np.testing.assert_array_equal(new[~inside], bound)
  np.testing.assert_array_equal(kept["other"], update)  # only the named parameter


def contrastive_loss_reference(log_inv_temperature: float, similarity: np.ndarray) -> float:
  """Symmetric InfoNCE (Eq. 1) in float64 from the [B, B] cosine similarities."""
  logits = similarity * np.exp(log_inv_temperature)

  def cross_entropy(z):
    z = z - z.max(axis=1, keepdims=True)
    return np.mean(np.log(np.exp(z).sum(axis=1)) - np.diag(z))

  return cross_entropy(logits) + cross_entropy(logits.T)  # Eq. 1: both directions summed


@pytest.mark.parametrize("where", ["low", "inside", "high"])
def test_loss_gradient_reaches_the_temperature_inside_and_on_the_bounds(where):
  config = tiny.get_config()
  graphdef, params = tiny_model_parts(config)
  low, high = coca.log_inv_temperature_range(config.model.temperature)
  value = np.float32({"low": low, "inside": 0.5 * (low + high), "high": high}[where])
  params["log_inv_temperature"] = jnp.asarray(value)
  rng = np.random.default_rng(1)
  image, text = (rng.normal(size=(6, 16)) for _ in range(2))
  image, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (image, text))

  def loss(params):  # as the train step: the model rebuilt from its params
    temperature = nnx.merge(graphdef, params).temperature()
    return losses.contrastive_loss(image.astype(np.float32), text.astype(np.float32), temperature)[
      0
    ]

  grad = float(jax.grad(loss)(params)["log_inv_temperature"])
  s, h, similarity = float(value), 1e-5, image @ text.T
  reference = (
    contrastive_loss_reference(s + h, similarity) - contrastive_loss_reference(s - h, similarity)
  ) / (2 * h)
  assert abs(reference) > 1e-3
  np.testing.assert_allclose(grad, reference, rtol=1e-3)


def test_legacy_names_recognise_only_the_old_layouts():
  """Checkpoints of the chain before its layout was fixed (tests/test_optim_layout.py
  resumes them): global-norm clipping's element shifted the rest by one; without weight
  decay its count is the learning rate's."""
  expected = {("params", "w"), ("opt_state", "0", "v", "w"), ("opt_state", "3", "count")}
  expected.add(("opt_state", "4", "count"))
  shifted = {("params", "w"), ("opt_state", "1", "v", "w"), ("opt_state", "4", "count")}
  assert optim.legacy_names(expected, shifted | {("opt_state", "5", "count")}) == {
    ("params", "w"): ("params", "w"),
    ("opt_state", "0", "v", "w"): ("opt_state", "1", "v", "w"),
    ("opt_state", "3", "count"): ("opt_state", "4", "count"),
    ("opt_state", "4", "count"): ("opt_state", "5", "count"),
  }
  # No decay element: its count is read from the learning rate's.
  assert optim.legacy_names(expected, shifted)[("opt_state", "4", "count")] == (
    "opt_state",
    "4",
    "count",
  )
  assert optim.legacy_names(expected, expected) is None
  assert optim.legacy_names(expected, {("params", "w"), ("opt_state", "0", "v", "w")}) is None
